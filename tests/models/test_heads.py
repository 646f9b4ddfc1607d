import torch

from mimkit.models import PatchGrid, PixelShuffleHead


def test_pixel_shuffle_head_maps_each_token_to_its_own_patch():
    grid = PatchGrid.make((8, 12), 4, 3)
    head = PixelShuffleHead(16, 4, 3, grid.shape)
    tokens = torch.randn(2, grid.num_patches, 16)
    out = head(tokens)
    assert out.shape == (2, 3, 8, 12)
    changed = tokens.clone()
    changed[:, 4] += 1.0  # token of patch (row 1, col 1)
    diff = (head(changed) - out).abs().sum(dim=(0, 1)) > 0
    assert diff[4:8, 4:8].all() and diff.sum() == 16


def test_non_square_patches_match_the_square_layout_rule():
    head = PixelShuffleHead(8, (2, 4), 1, (3, 2))
    out = head(torch.randn(1, 6, 8))
    assert out.shape == (1, 1, 6, 8)
