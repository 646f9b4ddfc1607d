"""Small mimkit MAE checkpoints written without the trainer."""

from __future__ import annotations

import pytest
import torch

from mimkit.config import PretrainConfig
from mimkit.interop import save_method_checkpoint
from mimkit.methods import build_method


def make_method(img_size=16, channels=3, norm_pix=True, decoder="tiny", seed=0, patch_size=4, **model):
    """A ViT-Tiny MAE whose trainable weights are all non-trivial (no zero biases, no unit norms)."""
    torch.manual_seed(seed)
    hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    cfg = PretrainConfig(
        method={"name": "mae", "norm_pix": norm_pix},
        model={"encoder": "vit_tiny", "patch_size": patch_size, "decoder": decoder, **model},
        data={"img_size": list(hw), "channels": channels, "mean": [0.5] * channels, "std": [0.25] * channels},
    )
    method = build_method(cfg, hw, channels)
    with torch.no_grad():
        for p in method.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return method.eval(), cfg, hw


@pytest.fixture
def write_ckpt(tmp_path):
    def write(name="model.pt", img_size=16, channels=3, norm_pix=True, extra=None, **kw):
        method, cfg, hw = make_method(img_size, channels, norm_pix, **kw)
        meta = {"img_size": list(hw), "channels": channels, "mean": [0.5] * channels, "std": [0.25] * channels}
        path = save_method_checkpoint(method, cfg, meta, tmp_path / name, **(extra or {}))
        return path, method, cfg

    return write


def images(channels, hw, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, *hw, generator=g)


def noise(num_patches, batch=2, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, num_patches, generator=g)


def assert_same_state(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


@pytest.fixture
def h():
    """Helper functions (test modules cannot import conftest under pytest's importlib mode)."""
    import types

    return types.SimpleNamespace(make_method=make_method, images=images, noise=noise, assert_same_state=assert_same_state)
