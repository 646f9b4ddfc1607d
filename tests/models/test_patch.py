import pytest
import torch

from mimkit.models import PatchGrid


@pytest.mark.parametrize("size,patch,chans", [((28, 28), 4, 1), ((32, 48), 8, 3), ((16, 24), (4, 8), 7)])
def test_patchify_round_trip(size, patch, chans):
    grid = PatchGrid.make(size, patch, chans)
    x = torch.randn(2, chans, *size)
    p = grid.patchify(x)
    assert p.shape == (2, grid.num_patches, grid.patch_dim)
    assert torch.equal(grid.unpatchify(p), x)


def test_patch_layout_is_row_col_channel_in_raster_order():
    grid = PatchGrid.make((4, 6), 2, 3)
    x = torch.randn(1, 3, 4, 6)
    p = grid.patchify(x)
    # patch 4 is grid row 1, col 1 -> pixels rows 2..3, cols 2..3; values ordered (row, col, channel)
    expected = x[0, :, 2:4, 2:4].permute(1, 2, 0).reshape(-1)
    assert torch.equal(p[0, 4], expected)


def test_expand_mask_marks_the_patch_pixels():
    grid = PatchGrid.make((4, 6), 2, 1)
    mask = torch.zeros(1, 6, dtype=torch.bool)
    mask[0, 4] = True
    pix = grid.expand_mask(mask)[0, 0]
    assert pix.sum() == 4 and pix[2:4, 2:4].all()


def test_indivisible_size_is_an_error():
    with pytest.raises(ValueError, match="not divisible"):
        PatchGrid.make(30, 4, 1)
    with pytest.raises(ValueError, match="expected images"):
        PatchGrid.make(28, 4, 1).patchify(torch.zeros(1, 3, 28, 28))
