import math

import torch
from method_helpers import falls, fashion_mnist, small_method, train_metrics

from mimkit.methods.cl_mim import CLMIM
from mimkit.methods.simmim import SimMIM
from mimkit.models.moco_head import info_nce

SMALL = ("method.mlp_dim=128", "method.out_dim=64")


def _batch(b=8, size=16, seed0=0):
    g = torch.Generator().manual_seed(seed0)
    image = torch.randn(b, 1, size, size, generator=g)
    other = torch.randn(b, 1, size, size, generator=g)  # stands in for the second augmented view
    return {"image": image, "seed": torch.arange(b) + seed0, "views": [image, other]}


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def test_lam_zero_is_exactly_simmim_and_lam_one_is_pure_moco():
    torch.manual_seed(0)
    hybrid = small_method("cl_mim", 16, 1, "method.lam=0", *SMALL, depth=2)
    simmim = small_method("simmim", 16, 1, depth=2)
    simmim.load_state_dict({k: v for k, v in hybrid.state_dict().items() if k in simmim.state_dict()})
    batch = _batch()
    out = hybrid(batch)
    ref = simmim({"image": batch["image"], "seed": batch["seed"]})["loss"]
    assert torch.equal(out["loss"], ref) and torch.equal(out["mim_loss"], ref)
    assert out["cl_loss"] > 0  # the CL branch ran (and is logged), with weight 0
    out["loss"].backward()
    ref.backward()
    mine, theirs = _grads(hybrid), _grads(simmim)
    for name, g in theirs.items():  # the same gradients on the shared backbone, mask token and pixel head
        torch.testing.assert_close(mine[name], g, rtol=0, atol=0)
    assert all((g == 0).all() for n, g in mine.items() if n.startswith(("projector.", "predictor.")))

    moco = small_method("cl_mim", 16, 1, "method.lam=1", *SMALL, depth=2)
    out = moco(batch)
    assert torch.equal(out["loss"], out["cl_loss"])
    out["loss"].backward()
    assert (moco.mask_token.grad == 0).all() and all((p.grad == 0).all() for p in moco.head.parameters())
    assert moco.projector.mlp.layers[0].weight.grad.abs().sum() > 0


def test_info_nce_positives_are_the_diagonal():
    tau = 0.2
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    k = torch.tensor([[3.0, 0.0], [0.0, 0.5]])  # cosine logits: identity / tau
    # row i: -log(e^{1/tau} / (e^{1/tau} + e^0)), the same for both rows; times 2 tau
    expected = 2 * tau * math.log(1 + math.exp(-1 / tau))
    torch.testing.assert_close(info_nce(q, k, tau), torch.tensor(expected))
    # the same keys in swapped order: each query's positive is now orthogonal to it
    torch.testing.assert_close(info_nce(q, k.flip(0), tau), torch.tensor(2 * tau * math.log(1 + math.exp(1 / tau))))
    # three items at 60/120 degrees: hand-computed cosines 1, 0.5, -0.5
    a = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2], [-0.5, math.sqrt(3) / 2]])
    cos = a @ a.T
    rows = [-(cos[i, i] / tau) + torch.logsumexp(cos[i] / tau, 0) for i in range(3)]
    torch.testing.assert_close(info_nce(a, a, tau), 2 * tau * torch.stack(rows).mean())
    # keys are targets: no gradient flows into them
    kk = k.clone().requires_grad_(True)
    qq = q.clone().requires_grad_(True)
    info_nce(qq, kk, tau).backward()
    assert kk.grad is None and qq.grad.abs().sum() > 0


def test_symmetric_loss_pairs_each_view_with_the_other_views_keys():
    m = small_method("cl_mim", 16, 1, *SMALL, depth=1)
    q1, q2, k1, k2 = torch.randn(4, 6, 64).unbind(0)
    tau = m.cfg.temperature
    torch.testing.assert_close(m.contrastive_loss([q1, q2], [k1, k2]), info_nce(q1, k2, tau) + info_nce(q2, k1, tau))
    # a query that predicts the other view's key exactly scores better than one that predicts its own view's
    assert m.contrastive_loss([k2, k1], [k1, k2]) < m.contrastive_loss([k1, k2], [k1, k2])


def test_momentum_encoder_gets_no_gradient_and_follows_its_cosine_schedule():
    torch.manual_seed(0)
    m = small_method("cl_mim", 16, 1, *SMALL, depth=1)
    assert isinstance(m, CLMIM) and isinstance(m, SimMIM)
    t = m.teacher.module
    assert set(t.keys()) == {"encoder", "projector"}
    for (name, p), (_, s) in zip(t.named_parameters(), torch.nn.ModuleDict(m.student()).named_parameters()):
        assert not p.requires_grad and torch.equal(p, s), name  # a frozen copy at the start
    assert m.momentum(0.0) == 0.99 and m.momentum(1.0) == 1.0 and abs(m.momentum(0.5) - 0.995) < 1e-12

    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    m.train()
    m.begin_step(5, 20)
    m(_batch())["loss"].backward()
    assert all(p.grad is None for p in t.parameters())
    before = [p.clone() for p in t.parameters()]
    opt.step()
    m.end_step(5, 20)
    mom = 0.5 * (1 + math.cos(math.pi * 5 / 20)) * 0.01  # 1 - momentum, MoCo v3's adjust_moco_momentum
    student = list(torch.nn.ModuleDict(m.student()).parameters())
    moved = 0
    for old, new, s in zip(before, t.parameters(), student):
        torch.testing.assert_close(new, old * (1 - mom) + s.detach() * mom)
        moved += int(not torch.equal(new, old))
    assert moved > 0
    # at the end of the schedule (momentum 1) the momentum encoder stays put
    frozen = [p.clone() for p in t.parameters()]
    m(_batch(seed0=3))["loss"].backward()
    opt.step()
    m.end_step(20, 20)
    assert all(torch.equal(a, b) for a, b in zip(frozen, t.parameters()))


def test_keys_use_each_views_batch_statistics_and_views_are_mocos():
    m = small_method("cl_mim", 16, 1, *SMALL, "method.crop_scale=[0.3,1.0]", depth=1)
    specs = CLMIM.view_specs(m.cfg)
    assert len(specs) == 2 and all(s.crop_scale == (0.3, 1.0) for s in specs)
    assert specs[0].blur_p == 1.0 and specs[1].solarize_p == 0.2  # BYOL's asymmetric pair (MoCo v3's)
    batch = _batch(b=12)
    keys = m.keys(batch["views"])
    for k in keys:  # the last BatchNorm has no affine: batch-normalised keys are centred per dimension
        torch.testing.assert_close(k.mean(0), torch.zeros(k.shape[1]), atol=1e-5, rtol=0)
    assert not m.teacher.module.training and not any(x.training for x in m.teacher.module.modules())
    # batches without views (validation, pictures) use the image twice
    out = m({"image": batch["image"], "seed": batch["seed"]})
    assert torch.isfinite(out["loss"])


def test_training_on_fashion_mnist_lowers_both_losses_and_logs_diagnostics():
    torch.manual_seed(0)
    m = small_method("cl_mim", 28, 1, "method.mlp_dim=256", depth=2)
    rows = train_metrics(m, fashion_mnist(192), steps=30, batch_size=24, view_specs=CLMIM.view_specs(m.cfg))
    # 30 steps: SimMIM's L1 falls ~15%, the InfoNCE term (InfoNCE over 24 images, momentum 0.99) ~6%, and the
    # total, which the CL term dominates at lam = 0.5 (~2.4 vs ~0.9), ~8% (means over 8-step windows)
    assert falls([r["loss"] for r in rows], window=8, factor=0.95), [r["loss"] for r in rows]
    assert falls([r["mim_loss"] for r in rows], window=8), [r["mim_loss"] for r in rows]
    assert falls([r["cl_loss"] for r in rows], window=8, factor=0.98), [r["cl_loss"] for r in rows]
    last = rows[-1]
    for key in ("mim_loss", "cl_loss", "cl_acc", "proj_sim", "target_sim", "feature_sim", "momentum"):
        assert math.isfinite(last[key]), key
    # no collapse: class tokens of different images are not one vector, keys are spread (centred by BN)
    assert max(r["feature_sim"] for r in rows[-5:]) < 0.98 and abs(last["target_sim"]) < 0.2, last
