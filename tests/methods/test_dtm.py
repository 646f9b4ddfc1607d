"""DTM (card C16): token morphing on a frozen teacher's targets; zero merges is plain per-token distillation."""

import pytest
import torch

from method_helpers import falls, fashion_mnist, small_method, train_metrics

from mimkit.targets.token_morphing import morph, token_groups


def _dtm(teacher_checkpoint, *overrides, depth=4):
    torch.manual_seed(0)
    return small_method("dtm", (28, 28), 1, "data.mean=[0.286]", "data.std=[0.353]",
                        f"method.teacher.source={teacher_checkpoint}", *overrides, depth=depth)


def _hand_per_token_smooth_l1(pred, target, beta=2.0):
    diff = (pred - target).abs()
    return torch.where(diff < beta, 0.5 * diff ** 2 / beta, diff - 0.5 * beta).mean(-1).mean()


@pytest.mark.parametrize("off", ["method.n1=0", "method.morph=false"])
def test_zero_merges_is_plain_per_token_distillation_exactly(teacher_checkpoint, off):
    method = _dtm(teacher_checkpoint, off).eval()
    images, seeds = fashion_mnist(8), torch.arange(8)
    batch = {"image": images, "seed": seeds}
    out = method(batch)
    pred = method.predict(images, method.make_mask(batch))
    target = method.teacher.features(images)[0].float()
    assert pred.shape == target.shape == (8, 1 + 49, method.teacher.embed_dim)   # all tokens, class token too
    assert torch.equal(out["loss"], _hand_per_token_smooth_l1(pred, target))
    assert float(out["merges"]) == 0.0 and float(out["groups"]) == 50.0


def test_morphing_changes_the_loss_and_uses_the_targets_groups(teacher_checkpoint):
    method = _dtm(teacher_checkpoint, "method.n1=1.0", "method.k_max=2").eval()
    images, seeds = fashion_mnist(8), torch.arange(8)
    batch = {"image": images, "seed": seeds}
    schedule = method.schedule(seeds)
    assert len(schedule) == 2 and schedule == method.schedule(seeds)        # seeded by the batch
    pred = method.predict(images, method.make_mask(batch))
    target = method.targets(images)
    loss, groups = method.morphed_loss(pred, target, schedule)
    want = 0.0
    for k, r in schedule:       # by hand: the groups of the TARGET, applied to both
        sigma = token_groups(target, k, r)
        assert torch.equal(sigma[:, 0, 0], torch.ones(8))                   # class token alone
        want = want + _hand_per_token_smooth_l1(morph(pred, sigma), morph(target, sigma))
    assert torch.allclose(loss, want / 2)
    assert groups < 50 and torch.equal(method(batch)["loss"], loss)
    assert not torch.allclose(loss, _hand_per_token_smooth_l1(pred, target))


def test_teacher_is_frozen_and_not_saved(teacher_checkpoint):
    method = _dtm(teacher_checkpoint)
    assert not any(k.startswith("teacher") for k in method.state_dict())
    teacher_params = list(method.teacher.encoder.parameters())
    assert teacher_params and not any(p.requires_grad for p in teacher_params)
    assert {id(p) for p in teacher_params}.isdisjoint(id(p) for p in method.parameters())
    out = method({"image": fashion_mnist(4), "seed": torch.arange(4)})
    out["loss"].backward()
    assert all(p.grad is None for p in teacher_params)
    assert method.mask_token.grad is not None and method.head.weight.grad is not None


def test_needs_the_data_normalisation(teacher_checkpoint):
    from mimkit.config import load_config
    from mimkit.methods.dtm import DTM

    cfg = load_config(overrides=["method=dtm", f"method.teacher.source={teacher_checkpoint}", "model.depth=2"])
    with pytest.raises(ValueError, match="data.mean"):
        DTM.from_config(cfg.method, cfg.model, (28, 28), 1, data=None)


def test_loss_falls_on_fashion_mnist(teacher_checkpoint):
    method = _dtm(teacher_checkpoint, depth=2)
    rows = train_metrics(method, fashion_mnist(256), steps=20, lr=1e-3, batch_size=16)
    assert falls([r["loss"] for r in rows])
    merges = [r["merges"] for r in rows]
    assert max(merges) > 0 and all(r["groups"] + r["merges"] == 50 for r in rows)
    assert all(0.0 <= r["pred_sim"] <= 1.0 for r in rows)
