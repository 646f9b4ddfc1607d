"""Presets below ViT-Tiny and width/heads set from the config: the shapes asked for, timm-loadable weights."""

import pytest
import timm
import torch

from mimkit.config import ConfigError, load_config
from mimkit.models import VisionTransformer


@pytest.mark.parametrize("name,width,depth,heads", [("vit_nano", 96, 6, 3), ("vit_micro", 128, 6, 4)])
def test_small_presets_have_their_widths_and_load_into_timm_with_the_same_output(name, width, depth, heads):
    torch.manual_seed(0)
    ours = VisionTransformer.from_preset(name, 28, 4, 1).eval()
    assert (ours.embed_dim, ours.depth, ours.num_heads) == (width, depth, heads)
    theirs = timm.create_model(ours.timm_name, pretrained=False, **ours.timm_kwargs()).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(theirs.forward_features(x), ours(x), atol=1e-5)


def test_width_depth_and_heads_are_settable_in_the_config():
    cfg = load_config(None, ["model.encoder=vit_nano", "model.embed_dim=64", "model.num_heads=2", "model.depth=3"])
    enc = VisionTransformer.from_config(cfg.model, 28, 1)
    assert (enc.embed_dim, enc.depth, enc.num_heads) == (64, 3, 2)
    assert enc.patch_embed.proj.weight.shape[0] == 64 and enc.blocks[0].attn.num_heads == 2


def test_heads_that_do_not_divide_the_width_are_refused_naming_both_fields():
    cfg = load_config(None, ["model.encoder=vit_nano", "model.num_heads=5"])
    with pytest.raises(ValueError, match=r"model.embed_dim=96 .* model.num_heads=5"):
        VisionTransformer.from_config(cfg.model, 28, 1)
    with pytest.raises(ConfigError, match="model.embed_dim"):
        load_config(None, ["model.embed_dim=4"])
