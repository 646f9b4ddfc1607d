import pytest
import torch
import torch.nn.functional as F
from method_helpers import cifar_samples, falls, fashion_mnist, small_method, train_metrics

from mimkit.collapse import mean_pairwise_cosine
from mimkit.config import ConfigError, load_config
from mimkit.engine.optim import param_groups
from mimkit.masking import Mask
from mimkit.masking.multiblock import MultiBlockMasking
from mimkit.models.predictor import MaskTokenQueries, seeded_normal


def _ijepa(*overrides, size=28, channels=1, depth=2):
    return small_method("ijepa", size, channels, *overrides, depth=depth)


def _batch(b=8, c=1, size=28, seed0=0):
    g = torch.Generator().manual_seed(seed0)
    return {"image": torch.randn(b, c, size, size, generator=g), "seed": torch.arange(b) + seed0}


def test_targets_are_the_teachers_layer_normed_full_image_features_at_the_target_blocks():
    m = _ijepa()
    batch = _batch()
    images = batch["image"]
    blocks = m.blocks(batch)
    assert torch.equal(blocks.targets, MultiBlockMasking()(batch["seed"], (7, 7)).targets)  # I-JEPA's masks
    # the teacher starts as a copy of the encoder and sees every patch; no affine in the extra LayerNorm
    full = m.encoder(images)[:, 1:]
    expected = (full - full.mean(-1, keepdim=True)) / (full.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    torch.testing.assert_close(m.target_features(images), expected)
    # the loss compares the predictor's output at every target patch with the target at that patch
    pred = m.predict(images, blocks, batch["seed"])
    b, k, t = blocks.targets.shape
    assert pred.shape == (b, k, t, m.encoder.embed_dim)
    target = torch.stack([torch.stack([expected[i, blocks.targets[i, j]] for j in range(k)]) for i in range(b)])
    out = m(batch)
    torch.testing.assert_close(out["loss"], F.smooth_l1_loss(pred, target))
    mse = _ijepa("method.loss=mse")
    mse.load_state_dict(m.state_dict())
    torch.testing.assert_close(mse(batch)["loss"], F.mse_loss(pred, target))
    assert set(out) >= {"loss", "target_sim", "image_sim", "context_size", "target_size"}
    assert all(v.ndim == 0 for v in out.values())
    assert out["context_size"].item() == blocks.context.shape[1] > 10  # min_keep = 10


def test_the_encoder_sees_only_the_context():
    m = _ijepa()
    batch = _batch(4)
    blocks = m.blocks(batch)
    outside = torch.ones(4, 49, dtype=torch.bool).scatter(1, blocks.context, False)
    changed = batch["image"].clone()
    hidden = m.grid.expand_mask(outside)  # [B, 1, H, W]
    changed[hidden] = 7.0  # rewrite every patch outside the context
    a = m.predict(batch["image"], blocks, batch["seed"])
    b = m.predict(changed, blocks, batch["seed"])
    torch.testing.assert_close(a, b)
    assert not torch.allclose(m.target_features(batch["image"]), m.target_features(changed))  # the teacher sees all


def test_the_training_step_keys_the_block_sizes_so_ranks_and_micro_batches_agree():
    # the reference draws one target and one context size per batch from a counter every worker shares; here
    # the optimizer step: two ranks' (or micro-batches') images at one step get blocks of the same size
    m = _ijepa()
    m.train()
    seeds = torch.arange(8) * 7919 + 11
    shapes = set()
    for step in range(6):
        m.begin_step(step, 10)
        full = m.blocks({"seed": seeds})
        first, second = m.blocks({"seed": seeds[:4]}), m.blocks({"seed": seeds[4:]})
        assert torch.equal(torch.cat([first.targets, second.targets]), full.targets)
        c = full.context.shape[1]
        assert torch.equal(torch.cat([first.context[:, :c], second.context[:, :c]]), full.context)
        other = m.blocks({"seed": seeds + 12345})  # other images at the same step: the same block size
        assert other.targets.shape == full.targets.shape
        # whole blocks: each target's patches fill the rectangle they span
        rows, cols = full.targets // 7, full.targets % 7
        spans = (rows.amax(-1) - rows.amin(-1) + 1) * (cols.amax(-1) - cols.amin(-1) + 1)
        assert (spans == full.targets.shape[-1]).all()
        shapes.add(full.targets.shape[-1])
    assert len(shapes) > 1  # and the size changes from step to step
    # outside training (validation, pictures) the batch's seeds key the sizes
    m.eval()
    assert torch.equal(m.blocks({"seed": seeds}).targets, MultiBlockMasking()(seeds, (7, 7)).targets)


def test_teacher_gets_no_gradient_and_follows_the_linear_schedule():
    m = _ijepa()
    assert m.momentum(0.0) == pytest.approx(0.996) and m.momentum(0.5) == pytest.approx(0.998)
    assert m.momentum(1.0) == 1.0
    cfg = load_config(overrides=["method=ijepa", "method.teacher.start=0.99", "method.teacher.end=0.999"])
    assert cfg.method.teacher.kind == "linear" and cfg.method.teacher(0.5) == pytest.approx(0.9945)
    opt = torch.optim.AdamW([p for g in param_groups(m, 0.05) for p in g["params"]], lr=1e-2)
    teacher = list(m.teacher.parameters())
    assert teacher and all(not p.requires_grad for p in teacher)
    assert not {id(p) for g in opt.param_groups for p in g["params"]} & {id(p) for p in teacher}
    for step in (0, 5):
        m.begin_step(step, 10)
        m(_batch(seed0=step))["loss"].backward()
        assert all(p.grad is None for p in teacher)
        before = [p.clone() for p in teacher]
        opt.step()
        opt.zero_grad()
        m.end_step(step, 10)
        mom = 0.996 + 0.004 * step / 10
        for (name, p), old in zip(m.teacher.module.named_parameters(), before):
            torch.testing.assert_close(p, mom * old + (1 - mom) * dict(m.encoder.named_parameters())[name])
    # after the steps the teacher differs from the student: the targets are not the student's own features
    assert any(not torch.equal(p, q) for p, q in zip(teacher, m.encoder.parameters()))
    fresh = _ijepa()
    fresh.load_state_dict(m.state_dict())  # the teacher is part of the checkpoint
    x = _batch()["image"]
    torch.testing.assert_close(fresh.target_features(x), m.target_features(x))


def test_queries_are_mask_token_plus_position_and_eval_is_deterministic():
    m = _ijepa()
    assert isinstance(m.predictor.queries, MaskTokenQueries)
    pos = m.predictor.pos_embed[torch.tensor([[[3, 4, 10]]])]
    q = m.predictor.queries(pos, m.predictor.predictor_embed, None)
    torch.testing.assert_close(q, pos + m.predictor.queries.mask_token)
    batch = _batch()
    m.eval()
    blocks = m.blocks(batch)
    a = m.predict(batch["image"], blocks, batch["seed"])
    b = m.predict(batch["image"], blocks, batch["seed"] + 99)  # other seeds: no noise to draw anyway
    torch.testing.assert_close(a, b)


def test_seeded_normal_is_standard_and_per_image():
    z = seeded_normal(torch.arange(64), 4000, stream=42)
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    assert torch.equal(seeded_normal(torch.tensor([5, 9]), 10, 42)[1], seeded_normal(torch.tensor([9]), 10, 42)[0])


def test_make_mask_marks_the_target_union_and_config_errors_name_the_field():
    m = _ijepa()
    batch = _batch()
    mask = m.make_mask(batch)
    blocks = m.blocks(batch)
    assert isinstance(mask, Mask) and mask.masked.shape == (8, 49)
    assert torch.equal(mask.masked.sum(1), blocks.target_union().sum(1)) and m.reconstruct(batch) is None
    with pytest.raises(ConfigError, match="target_scale"):
        load_config(overrides=["method=ijepa", "method.target_scale=[0.3,0.1]"])
    with pytest.raises(ConfigError, match="loss"):
        load_config(overrides=["method=ijepa", "method.loss=l1"])


def test_loss_falls_on_fashion_mnist_without_collapse():
    images = fashion_mnist(256)
    m = _ijepa()
    rows = train_metrics(m, images, steps=25)
    losses = [r["loss"] for r in rows]
    assert falls(losses, factor=0.6), losses
    # no collapse: the trained teacher's target features still differ between patches and between images
    sims = [r["target_sim"] for r in rows]
    assert max(sims[-5:]) < 0.9, sims
    assert max(r["image_sim"] for r in rows[-5:]) < 0.99, [r["image_sim"] for r in rows]
    m.eval()
    with torch.no_grad():
        feats = m.target_features(images[:64])
    assert mean_pairwise_cosine(feats).item() < 0.9
    # the metric sees a collapse: a teacher whose output is one vector for every patch scores 1
    norm = m.teacher.module.norm
    with torch.no_grad():
        norm.weight.zero_()
        norm.bias.copy_(torch.linspace(-1, 1, norm.bias.numel()))
    assert mean_pairwise_cosine(m.target_features(images[:8])).item() == pytest.approx(1.0, abs=1e-5)


def test_loss_falls_on_cifar_at_32px():
    m = _ijepa(size=32, channels=3)
    assert m.grid.shape == (8, 8)
    rows = train_metrics(m, cifar_samples(20), steps=15, batch_size=20)
    assert falls([r["loss"] for r in rows], window=3, factor=0.7), [r["loss"] for r in rows]
