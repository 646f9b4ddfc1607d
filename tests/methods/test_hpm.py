import pytest
import torch
from method_helpers import cifar_samples, falls, fashion_mnist, small_method, train_metrics

from mimkit import rng
from mimkit.engine.optim import param_groups
from mimkit.masking import Mask, RandomMasking
from mimkit.methods.hpm import absolute_loss, ranking_accuracy, ranking_loss


def _hpm(size=28, channels=1, *overrides, depth=2):
    return small_method("hpm", size, channels, *overrides, depth=depth)


def _batch(b=4, c=1, size=28, seed0=0):
    g = torch.Generator().manual_seed(seed0)
    return {"image": torch.randn(b, c, size, size, generator=g), "seed": torch.arange(b) + seed0}


def test_mask_holds_exactly_m_with_the_top_alpha_share_by_score():
    hpm = _hpm()
    n, m = hpm.grid.num_patches, hpm.num_masked
    assert (n, m) == (49, 37)  # 7x7 grid, N - int(0.25 N) hidden
    b = 64
    seeds = torch.arange(b) + 1000
    scores = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(i)) for i in range(b)]).float()
    for alpha in (0.5, 0.3, 1.0):
        n_hard = int(m * alpha)
        mask = hpm.make_mask({"seed": seeds}, scores=scores, alpha=alpha)
        assert (mask.masked.sum(1) == m).all()
        assert not mask.masked.gather(1, mask.ids_keep).any()
        top = torch.zeros_like(mask.masked).scatter(1, scores.topk(n_hard, dim=1).indices, True)
        assert (mask.masked | ~top).all()  # every top-scored patch is hidden
        # the other M - n_hard hidden patches are the seed's random choice among the rest: highest noise
        noise = rng.uniform(seeds, n, stream=1).masked_fill(top, -1.0)
        rest = torch.zeros_like(top).scatter(1, noise.topk(m - n_hard, dim=1).indices, True)
        assert torch.equal(mask.masked, top | rest)
        if n_hard < m:
            # exactly n_hard are forced: the next-ranked patch is visible in some images
            nxt = scores.topk(n_hard + 1, dim=1).indices[:, -1:]
            assert not mask.masked.gather(1, nxt).all()
    # no hard share: MAE's random mask for the same seeds
    assert torch.equal(hpm.make_mask({"seed": seeds}, scores=scores, alpha=0.0).masked,
                       RandomMasking(0.75)(seeds, n).masked)
    # the mask of an image depends on its seed and scores, not on the batch around it
    full = hpm.make_mask({"seed": seeds}, scores=scores, alpha=0.5).masked
    part = hpm.make_mask({"seed": seeds[5:9]}, scores=scores[5:9], alpha=0.5).masked
    assert torch.equal(full[5:9], part)


def test_alpha_grows_with_progress_and_is_logged():
    hpm = _hpm()
    alphas = []
    for step in (0, 25, 50, 99):
        hpm.begin_step(step, 100)
        alphas.append(hpm.alpha)
    assert alphas[0] == 0.0 and alphas == sorted(alphas) and alphas[2] == pytest.approx(0.25)
    assert alphas[-1] == pytest.approx(0.495)
    assert hpm.hard_count(alphas[-1]) == 18
    out = hpm(_batch())
    assert out["alpha"].item() == pytest.approx(0.495)
    assert set(out) >= {"loss", "recon_loss", "rank_acc", "alpha"} and all(v.ndim == 0 for v in out.values())


def _manual_ranking(pred, target):
    total, count = 0.0, 0
    for pb, tb in zip(pred.tolist(), target.tolist()):
        for i in range(len(pb)):
            for j in range(len(pb)):
                if tb[j] == tb[i]:
                    continue
                p = torch.sigmoid(torch.tensor(pb[j] - pb[i], dtype=torch.float64)).item()
                total += -torch.log(torch.tensor(p if tb[j] > tb[i] else 1 - p, dtype=torch.float64)).item()
                count += 1
    return total / count


def test_ranking_loss_is_pairwise_bce_that_ignores_ties_and_detaches_targets():
    torch.manual_seed(0)
    target = torch.tensor([[1.0, 1.0, 2.0, 0.5, 2.0], [0.3, 0.1, 0.2, 0.9, 0.4]])
    pred = torch.randn(2, 5)
    torch.testing.assert_close(ranking_loss(pred, target).double().item(), _manual_ranking(pred, target))
    # an image whose losses all tie has only tie pairs: its predictions do not matter at all
    tied = torch.cat([target[1:], torch.full((1, 5), 0.7)])
    p1 = torch.randn(2, 5)
    p2 = p1.clone()
    p2[1] = torch.randn(5) * 10
    assert torch.equal(ranking_loss(p1, tied), ranking_loss(p2, tied))
    torch.testing.assert_close(ranking_loss(p1, tied), ranking_loss(p1[:1], tied[:1]))  # counted: non-tied pairs
    # targets are detached, predictions get the gradient
    t = target.clone().requires_grad_(True)
    p = pred.clone().requires_grad_(True)
    ranking_loss(p, t).backward()
    assert t.grad is None and p.grad.abs().sum() > 0
    # accuracy: order-preserving predictions are right on every non-tied pair, reversed ones on none
    assert ranking_accuracy(target * 3 + 1, target).item() == 1.0
    assert ranking_accuracy(-target, target).item() == 0.0
    assert ranking_accuracy(torch.zeros_like(target), target).item() == 0.5


@pytest.mark.parametrize("kind", ["relative", "absolute"])
def test_loss_predictor_learns_from_detached_losses_only(kind):
    # the predictor objective must not push the reconstruction head: its gradients are the same with weight 0 or 1
    # (for the ranking loss the labels are comparisons and carry no gradient anyway; the absolute variant's
    # standardised targets would)
    t = torch.rand(2, 6, requires_grad=True)
    p = torch.randn(2, 6, requires_grad=True)
    absolute_loss(p, t).backward()
    assert t.grad is None and p.grad.abs().sum() > 0
    grads = []
    for w in (0.0, 1.0):
        torch.manual_seed(0)  # the same initial weights for both
        hpm = _hpm(28, 1, f"method.pred_weight={w}", f"method.pred_loss={kind}")
        out = hpm(_batch())
        out["loss"].backward()
        assert out["pred_loss"] > 0
        grads.append([p.grad.clone() for p in list(hpm.decoder.blocks.parameters()) + list(hpm.decoder.pred.parameters())])
        moved = sum(p.grad.abs().sum() for p in hpm.loss_predictor.parameters() if p.grad is not None)
        assert (moved > 0) == (w > 0)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_teacher_scores_the_full_image_gets_no_gradient_and_follows_the_student():
    hpm = _hpm()
    batch = _batch()
    n = hpm.grid.num_patches
    b = batch["image"].shape[0]
    ids = torch.arange(n).expand(b, n)
    everything = Mask(masked=torch.zeros(b, n, dtype=torch.bool), ids_keep=ids, ids_restore=ids)
    # at the start the teacher is a copy of the whole student; it scores with every patch visible
    torch.testing.assert_close(hpm.teacher_scores(batch["image"]), hpm.predict(batch["image"], everything)[1])
    # the decoder split used by both branches is MAEDecoder.forward exactly
    mask = hpm.make_mask(batch)
    latent = hpm.encoder(batch["image"], ids_keep=mask.ids_keep)
    torch.testing.assert_close(hpm.decoder.head(hpm.decoder.tokens(latent, mask.ids_restore)),
                               hpm.decoder(latent, mask.ids_restore))
    opt = torch.optim.AdamW([p for g in param_groups(hpm, 0.05) for p in g["params"]], lr=1e-2)
    hpm.begin_step(0, 10)
    hpm(batch)["loss"].backward()
    teacher = list(hpm.teacher.parameters())
    assert teacher and all(p.grad is None and not p.requires_grad for p in teacher)
    assert not {id(p) for g in opt.param_groups for p in g["params"]} & {id(p) for p in teacher}
    before = [p.clone() for p in teacher]
    opt.step()
    hpm.end_step(0, 10)
    m = hpm.momentum(0.0)
    assert 0.0 < m < 1.0
    student = {f"{k}.{n}": p for k, part in hpm.student().items() for n, p in part.named_parameters()}
    named = list(hpm.teacher.module.named_parameters())
    assert [n for n, _ in named] == list(student)
    for (name, p), old in zip(named, before):
        torch.testing.assert_close(p, m * old + (1 - m) * student[name])
    # the teacher is part of the checkpoint: a fresh method loaded from it scores identically
    fresh = _hpm()
    fresh.load_state_dict(hpm.state_dict())
    torch.testing.assert_close(fresh.teacher_scores(batch["image"]), hpm.teacher_scores(batch["image"]))


def test_reconstruction_and_any_shape_builds():
    hpm = small_method("hpm", (16, 24), 3, "model.patch_size=4", "method.norm_pix=true", depth=2)
    batch = {"image": torch.randn(2, 3, 16, 24), "seed": torch.tensor([1, 2])}
    hpm.begin_step(5, 10)
    out = hpm(batch)
    assert torch.isfinite(out["loss"])
    rec = hpm.reconstruct(batch)
    hidden = hpm.grid.expand_mask(hpm.make_mask(batch).masked).expand(-1, 3, -1, -1)
    assert torch.equal(rec.pasted[~hidden], batch["image"][~hidden])
    assert torch.equal(rec.pasted[hidden], rec.prediction[hidden])


def test_training_on_fashion_mnist_lowers_the_reconstruction_loss_and_ranks_above_chance():
    rows = train_metrics(small_method("hpm", 28, 1, depth=2), fashion_mnist(256))
    recon = [r["recon_loss"] for r in rows]
    acc = [r["rank_acc"] for r in rows]
    assert falls(recon), recon
    assert falls([r["loss"] for r in rows])
    # the card's small-scale claim: the loss predictor ranks better than chance, and better than at the start
    late, early = sum(acc[-10:]) / 10, sum(acc[:5]) / 5
    assert late > 0.55 and late > early, acc


def test_training_on_cifar_lowers_the_reconstruction_loss():
    rows = train_metrics(small_method("hpm", 32, 3, depth=2), cifar_samples(20), batch_size=20)
    recon = [r["recon_loss"] for r in rows]
    assert falls(recon), recon
    assert sum(r["rank_acc"] for r in rows[-10:]) / 10 > 0.5, [r["rank_acc"] for r in rows]
