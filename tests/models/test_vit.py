import math

import pytest
import timm
import torch
import torch.nn.functional as F

from mimkit.models import VisionTransformer
from mimkit.models.pos_embed import sincos_2d


def test_parameter_names_and_shapes_match_timm():
    ours = VisionTransformer.from_preset("vit_tiny", (24, 32), 4, 5)
    theirs = timm.create_model(ours.timm_name, pretrained=False, **ours.timm_kwargs())
    a = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert a == b


def test_visible_only_forward_equals_encoding_the_gathered_tokens():
    torch.manual_seed(0)
    enc = VisionTransformer(16, 4, 3, embed_dim=32, depth=2, num_heads=2).eval()
    x = torch.randn(2, 3, 16, 16)
    keep = torch.tensor([[0, 5, 9], [15, 1, 2]])
    out = enc(x, ids_keep=keep)
    tokens = enc.embed(x)
    manual = enc.forward_tokens(torch.stack([tokens[0, keep[0]], tokens[1, keep[1]]]))
    assert out.shape == (2, 4, 32)
    torch.testing.assert_close(out, manual)
    # with all patches it is a plain ViT over 1 + N tokens
    assert enc(x).shape == (2, 17, 32)


def test_position_embeddings_are_fixed_sincos():
    enc = VisionTransformer(16, 4, 1, embed_dim=32, depth=1, num_heads=2)
    assert not enc.pos_embed.requires_grad
    assert torch.equal(enc.pos_embed[0, 0], torch.zeros(32))
    pe = sincos_2d(32, (2, 3))
    # first half encodes the column, second half the row: patch (row 1, col 2) is index 5
    omega0 = 1.0
    assert math.isclose(pe[5, 0].item(), math.sin(2 * omega0), abs_tol=1e-6)
    assert math.isclose(pe[5, 16].item(), math.sin(1 * omega0), abs_tol=1e-6)
    assert math.isclose(pe[5, 8].item(), math.cos(2 * omega0), abs_tol=1e-6)


def test_block_at_maps_depth_fractions_to_blocks_for_any_depth():
    import pytest

    from mimkit.models.vit import block_at

    assert [block_at(f, 12) for f in (0.25, 0.5, 0.75, 1.0)] == [2, 5, 8, 11]  # 1-based 3, 6, 9, 12
    assert [block_at(f, 2) for f in (0.1, 0.25, 1.0)] == [0, 0, 1]  # never below the first block
    with pytest.raises(ValueError, match="fractions must be in"):
        block_at(0.0, 4)


def test_cls_attention_scores_match_the_analysis_reading_and_the_plain_forward():
    from mimkit.eval.analysis import attention_maps
    from mimkit.models import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, in_chans=1, embed_dim=24, depth=2, num_heads=3).eval()
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        out, scores = vit.forward_with_cls_attention(x)
        assert torch.allclose(out, vit(x), atol=1e-5)
    full = attention_maps(vit, x, layers=[1])[0]  # [B, H, T, T]
    assert scores.shape == (3, 16)
    assert torch.allclose(scores, full[:, :, 0, 1:].mean(1), atol=1e-5)


def test_smaller_images_get_the_position_table_resampled_to_their_grid():
    # DINO/iBOT's local crops: a 12 x 12 image at patch 4 is a 3 x 3 grid whose positions span the 7 x 7 table
    vit = VisionTransformer(28, 4, 1, embed_dim=64, depth=2, num_heads=4)
    small = torch.randn(2, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    tokens = vit.embed(small)
    assert tokens.shape == (2, 9, 64)
    # by hand: each 4 x 4 patch times the projection, plus the sincos table resampled bicubically (DINO)
    w, b = vit.patch_embed.proj.weight, vit.patch_embed.proj.bias
    patches = small.unfold(2, 4, 4).unfold(3, 4, 4).reshape(2, 9, 16)  # raster order, one channel
    table = sincos_2d(64, (7, 7), cls_token=False).view(1, 7, 7, 64).permute(0, 3, 1, 2)
    resized = F.interpolate(table, size=(3, 3), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(tokens, patches @ w.view(64, 16).T + b + resized.reshape(1, 9, 64))
    # the corner tokens' positions are nearer the table's corners than its centre
    corner, centre = resized[0, 0, 0], table[0, :, 3, 3]
    assert (corner - table[0, :, 0, 0]).norm() < (corner - centre).norm()
    # the native size is the plain path, bit for bit, and the whole encoder runs on the small images
    full = torch.randn(2, 1, 28, 28)
    assert torch.equal(vit.embed_resized(full), vit.embed(full))
    assert vit(small).shape == (2, 10, 64)
    with pytest.raises(ValueError, match="not divisible by patch size"):
        vit.embed(torch.randn(1, 1, 10, 10))
