"""The patch-aggregation branch reads only the last class token and the early patch tokens."""

import pytest
import torch

from mimkit.models.aggregation_head import PatchAggregationHead, early_layer_index
from mimkit.models.vit import VisionTransformer


def test_branch_depends_on_last_cls_and_early_patches_only():
    vit = VisionTransformer(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=4, num_heads=2)
    head = PatchAggregationHead.for_encoder(vit, depth=2)
    images = torch.randn(2, 1, 16, 16)
    early = early_layer_index(2, vit.depth)
    _, taps = vit.run_blocks(vit.embed(images), taps=(early, -1))
    out = head(taps[-1][:, :1], taps[early][:, 1:])
    assert out.shape == (2, 17, 32)
    # gradients reach the early blocks and, through the class token only, the late ones
    out.sum().backward()
    assert vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert vit.blocks[3].mlp.fc2.weight.grad.abs().sum() > 0
    # changing late-layer patch tokens (not the class token) changes nothing
    last = taps[-1].detach().clone()
    last[:, 1:] += 5.0
    assert torch.equal(head(last[:, :1], taps[early][:, 1:].detach()), head(taps[-1][:, :1].detach(), taps[early][:, 1:].detach()))


def test_early_layer_index_counts_blocks_like_beit_v2():
    assert early_layer_index(9, 12) == 8
    assert early_layer_index(None, 12) == 8 and early_layer_index(None, 4) == 2
    assert early_layer_index(None, 2) == 0  # round(1.5) would be the last block
    with pytest.raises(ValueError, match="early_layers=4"):
        early_layer_index(4, 4)
