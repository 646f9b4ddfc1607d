"""The EMA cosine quantiser of VQ-KD: nearest code by cosine, straight-through gradient, a codebook moved only by
the EMA of the assigned vectors' means, k-means initialisation once on the first training batch."""

import torch
import torch.nn.functional as F

import mimkit.targets.vq as vq
from mimkit.targets.vq import EMACosineQuantizer


def fitted(k=8, d=4, decay=0.9, seed=0, **kw) -> EMACosineQuantizer:
    q = EMACosineQuantizer(k, d, decay=decay, **kw)
    g = torch.Generator().manual_seed(seed)
    q.codebook.copy_(F.normalize(torch.randn(k, d, generator=g), dim=-1))
    q.initialised.fill_(True)
    return q


def test_codes_are_the_nearest_by_cosine_whatever_the_length():
    q = fitted(16, 6)
    z = torch.randn(200, 6) * torch.rand(200, 1) * 10  # lengths must not matter
    expect = (F.normalize(z, dim=-1) @ q.codebook.T).argmax(1)
    assert torch.equal(q.codes(z), expect)
    q.eval()
    _, codes, _ = q(z)
    assert torch.equal(codes, expect)


def test_straight_through_gradient_and_a_codebook_without_gradient():
    q = fitted(8, 4).train()
    z = torch.randn(5, 3, 4, requires_grad=True)
    w = torch.randn(5, 3, 4)
    before = q.codebook.clone()
    out, codes, commit = q(z)
    assert torch.allclose(out, before[codes], atol=1e-6)  # forward value: the (pre-update) codes
    (out * w).sum().backward()
    z2 = z.detach().clone().requires_grad_(True)
    (F.normalize(z2, dim=-1) * w).sum().backward()  # straight-through: d out / d z_unit = identity
    assert torch.allclose(z.grad, z2.grad, atol=1e-6)
    assert list(q.parameters()) == [] and not q.codebook.requires_grad
    assert torch.allclose(commit, F.mse_loss(before[codes], F.normalize(z.detach(), dim=-1)))


def test_codebook_moves_only_by_the_ema_of_assigned_means():
    q = fitted(8, 4, decay=0.9).train()
    z = torch.randn(64, 4)
    before = q.codebook.clone()
    codes = q.codes(z)
    q(z)
    zn = F.normalize(z, dim=-1)
    expect = before.clone()
    for k in range(8):
        chosen = zn[codes == k]
        if len(chosen):  # unchosen codes stay exactly where they were
            mean = F.normalize(chosen.mean(0), dim=0)
            expect[k] = F.normalize(0.9 * before[k] + 0.1 * mean, dim=0)
    assert torch.allclose(q.codebook, expect, atol=1e-6)
    q.eval()
    q(torch.randn(64, 4))
    assert torch.allclose(q.codebook, expect, atol=1e-6)  # no update in evaluation


def test_kmeans_initialisation_happens_once_on_the_first_training_batch(monkeypatch):
    calls = []
    real = vq.kmeans

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(vq, "kmeans", counting)
    q = EMACosineQuantizer(16, 4, decay=0.99, kmeans_iters=10).train()
    z = torch.randn(100, 4)
    q(z)
    q(torch.randn(100, 4))
    assert calls == [100] and bool(q.initialised)
    assert torch.allclose(q.codebook.norm(dim=-1), torch.ones(16), atol=1e-5)
    # the flag travels with the state_dict: a restored quantiser does not initialise again
    state = q.state_dict()
    assert "initialised" in state and "codebook" in state and "window_counts" not in state
    fresh = EMACosineQuantizer(16, 4).train()
    fresh.load_state_dict(state)
    fresh(torch.randn(100, 4))
    assert calls == [100]


def test_fewer_vectors_than_codes_still_gives_unit_codes():
    q = EMACosineQuantizer(64, 8).train()
    q(torch.randn(10, 8))
    assert bool(q.initialised) and torch.allclose(q.codebook.norm(dim=-1), torch.ones(64), atol=1e-5)


def test_usage_counts_the_window_of_recent_batches():
    q = fitted(8, 2, usage_window=2).train()
    q.codebook.copy_(F.normalize(torch.tensor([[1.0, 0], [0, 1], [-1, 0], [0, -1]] * 2), dim=-1))
    q.decay = 1.0 - 1e-9  # keep the codes fixed for this check
    q(torch.tensor([[1.0, 0.01]]))
    assert abs(float(q.usage()) - 1 / 8) < 1e-6
    q(torch.tensor([[0.01, 1.0]]))
    assert abs(float(q.usage()) - 2 / 8) < 1e-6
    q(torch.tensor([[0.01, 1.0]]))  # the first batch left the 2-batch window
    assert abs(float(q.usage()) - 1 / 8) < 1e-6


def test_dead_code_restart_is_optional_and_moves_idle_codes_onto_badly_served_vectors():
    z = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.5, 0.5]]), dim=-1)
    for dead_after, moved in ((None, False), (1, True)):
        q = EMACosineQuantizer(3, 2, decay=0.99, dead_after=dead_after)
        q.codebook.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, -1.0]]))
        q.initialised.fill_(True)
        q.train()(z)
        # code 0 serves everything; codes 1 and 2 were idle; the worst-served vector is z[2]
        assert torch.allclose(q.codebook[1:], torch.stack([z[2], z[1]])) == moved
