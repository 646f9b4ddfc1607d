"""MaskAlign's Dynamic Alignment: W = I + 0.01 at start, S'_i = sum_j W_ij S_j, per-layer Linear heads."""

import pytest
import torch

from mimkit.models.dynamic_alignment import DynamicAlignment


def _layers(n=4, b=2, t=5, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, t, d, generator=g) for _ in range(n)]


def test_mixing_starts_at_identity_plus_one_hundredth_and_mixes_all_layers():
    da = DynamicAlignment(4, 8, 6, aligned=[2, 3])
    assert da.mixing.shape == (4, 4) and da.mixing.requires_grad
    assert torch.equal(da.mixing.detach(), torch.eye(4) + 0.01)
    s = _layers()
    mixed = da.mix(s)
    total = sum(s)
    assert torch.allclose(mixed[0], s[2] + 0.01 * total, atol=1e-6)
    assert torch.allclose(mixed[1], s[3] + 0.01 * total, atol=1e-6)
    out = da(s)
    assert [o.shape for o in out] == [(2, 5, 6)] * 2
    assert torch.allclose(out[1], da.heads[1](mixed[1]), atol=1e-6)


def test_the_mixing_is_learned_from_the_aligned_rows():
    da = DynamicAlignment(3, 8, 6, aligned=[2])
    s = _layers(3)
    da(s)[0].pow(2).mean().backward()
    grad = da.mixing.grad
    assert grad[2].abs().min() > 0 and torch.equal(grad[:2], torch.zeros(2, 3))   # only the aligned row is used


def test_no_mixing_is_the_fixed_identity_with_heads_only():
    da = DynamicAlignment(4, 8, 6, aligned=[3], mixing=False)
    assert da.mixing is None and [n for n, _ in da.named_parameters()] == ["heads.0.weight", "heads.0.bias"]
    s = _layers()
    assert da.mix(s)[0] is s[3]
    with pytest.raises(ValueError, match="distinct"):
        DynamicAlignment(4, 8, 6, aligned=[4])
    with pytest.raises(ValueError, match="expected 4"):
        da(s[:3])
