import torch
import torch.nn as nn

from mimkit.models.moco_head import MoCoMLP, batch_statistics, gather_keys, positive_is_nearest


def test_moco_mlp_is_bias_free_linears_with_bn_between_and_an_affine_free_bn_last():
    head = MoCoMLP(12, 32, 8, depth=3)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    norms = [m for m in head.modules() if isinstance(m, nn.BatchNorm1d)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(12, 32), (32, 32), (32, 8)]
    assert all(lin.bias is None for lin in linears)
    assert len(norms) == 3 and norms[-1] is head.out_norm and not head.out_norm.affine and norms[0].affine
    out = head.train()(torch.randn(16, 12))
    torch.testing.assert_close(out.mean(0), torch.zeros(8), atol=1e-5, rtol=0)  # batch-normalised output
    assert head(torch.randn(1, 12)).shape == (1, 8)  # one sample: running statistics, no error


def test_batch_statistics_switches_only_the_norms_and_restores_their_modes():
    head = MoCoMLP(6, 16, 4, depth=2).eval()
    x = torch.randn(10, 6) * 3 + 1
    with torch.no_grad(), batch_statistics(head):
        assert all(m.training for m in head.modules() if isinstance(m, nn.BatchNorm1d))
        out = head(x)
    assert not any(m.training for m in head.modules())
    torch.testing.assert_close(out.mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    assert not torch.allclose(head(x).mean(0), torch.zeros(4), atol=1e-3)  # eval mode: running statistics


def test_single_process_keys_and_top1():
    k = torch.randn(5, 3)
    keys, offset = gather_keys(k)
    assert keys is k and offset == 0
    assert positive_is_nearest(k, k) == 1.0
    assert positive_is_nearest(k, -k) == 0.0
