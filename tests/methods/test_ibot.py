import math

import pytest
import torch
import torch.nn.functional as F
from method_helpers import falls, fashion_mnist, small_method, train_losses

from mimkit.config import ConfigError, load_config
from mimkit.engine.optim import param_groups
from mimkit.methods.ibot import IBOT, teacher_temperature


def _ibot(*overrides, depth=2, size=28, channels=1):
    return small_method("ibot", size, channels, *overrides, depth=depth)


def _batch(b=6, c=1, size=28, seed0=0, views=True):
    g = torch.Generator().manual_seed(seed0)
    x = torch.randn(b, c, size, size, generator=g)
    batch = {"image": x, "seed": torch.arange(b) + seed0}
    if views:
        batch["views"] = [x, torch.randn(b, c, size, size, generator=g)]
    return batch


def test_teacher_gets_no_gradient_and_follows_its_cosine_schedule():
    m = _ibot()
    # cosine 0.996 -> 1 (card C3), a pure function of progress; the recipe's start is a CLI knob
    assert [m.momentum(p) for p in (0.0, 0.5, 1.0)] == pytest.approx([0.996, 0.998, 1.0])
    assert _ibot("method.teacher.start=0.99").momentum(0.5) == pytest.approx(0.995)
    assert _ibot("method.teacher.kind=linear").momentum(0.25) == pytest.approx(0.997)
    opt = torch.optim.AdamW([p for g in param_groups(m, 0.05) for p in g["params"]], lr=1e-2)
    teacher = list(m.teacher.parameters())
    assert teacher and not {id(p) for g in opt.param_groups for p in g["params"]} & {id(p) for p in teacher}
    m.begin_step(3, 10)
    m(_batch())["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher)
    before = [p.clone() for p in teacher]
    opt.step()
    m.end_step(3, 10)
    mom = m.momentum(0.3)
    student = {f"{k}.{n}": p for k, part in m.student().items() for n, p in part.named_parameters()}
    named = list(m.teacher.module.named_parameters())
    assert [n for n, _ in named] == list(student) and "head.last_layer.weight_v" in student
    for (name, p), old in zip(named, before):
        torch.testing.assert_close(p, mom * old + (1 - mom) * student[name])


def test_centres_move_by_their_momentum_in_training_only():
    m = _ibot("method.center_momentum=0.8")
    m.center_cls.normal_()
    m.center_patch.normal_()
    batch = _batch()
    images = torch.cat(batch["views"])
    t_out, _ = m.teacher_forward(images)
    old_cls, old_patch = m.center_cls.clone(), m.center_patch.clone()
    m.eval()
    m(batch)
    assert torch.equal(m.center_cls, old_cls) and torch.equal(m.center_patch, old_patch)  # validation: no update
    m.train()
    m(batch)
    torch.testing.assert_close(m.center_cls, 0.8 * old_cls + 0.2 * t_out[:, 0].mean(0, keepdim=True))
    torch.testing.assert_close(m.center_patch, 0.8 * old_patch + 0.2 * t_out[:, 1:].mean((0, 1)).unsqueeze(0))
    # the centres are buffers: saved and resumed with the method
    assert {"center_cls", "center_patch"} <= set(m.state_dict())


def test_mim_term_counts_only_hidden_patches_per_image_and_cls_only_cross_view_pairs():
    m = _ibot()
    m.eval()
    batch = _batch(b=4)
    b, n, k = 4, m.grid.num_patches, m.cfg.out_dim
    masked = torch.zeros(2 * b, n, dtype=torch.bool)
    masked[0, :5] = True
    masked[1, 10:30] = True
    masked[5, 3] = True  # rows 2, 3, 4, 6, 7 unmasked: they add 0 to the mean over all 8 images
    m.masks = lambda seeds, scores: masked
    g = torch.Generator().manual_seed(1)
    base = torch.randn(2 * b, 1 + n, k, generator=g)
    m.teacher_forward = lambda images: (base, None)
    out = m(batch)
    # by hand: teacher softmax((t - c) / temp), student log_softmax(head / 0.1), centres still zero
    temp = m.teacher_temp(0.0)
    images = torch.cat(batch["views"])
    with torch.no_grad():
        s = m.head(m.encoder.forward_tokens(m.encoder.embed_masked(images, masked, m.mask_token)))
    t = F.softmax(base / temp, -1)
    logp = F.log_softmax(s / 0.1, -1)
    ce = -(t[:, 1:] * logp[:, 1:]).sum(-1)
    per_image = [(ce[i][masked[i]].mean() if masked[i].any() else torch.tensor(0.0)) for i in range(2 * b)]
    torch.testing.assert_close(out["mim_loss"], torch.stack(per_image).mean())
    cls = -(t[:b, 0] * logp[b:, 0]).sum(-1).mean() / 2 - (t[b:, 0] * logp[:b, 0]).sum(-1).mean() / 2
    torch.testing.assert_close(out["cls_loss"], cls)
    # the teacher's distributions at visible patches play no part in the MIM term; at a hidden one they do
    visible = base.clone()
    visible[:, 1:][~masked] = torch.randn(int((~masked).sum()), k, generator=g)
    m.teacher_forward = lambda images: (visible, None)
    torch.testing.assert_close(m(batch)["mim_loss"], out["mim_loss"])
    hidden = base.clone()
    hidden[5, 1 + 3] = torch.randn(k, generator=g)
    m.teacher_forward = lambda images: (hidden, None)
    assert not torch.allclose(m(batch)["mim_loss"], out["mim_loss"])
    # lambda2 = 0 is the DINO ablation: the loss is the class-token term alone
    m.cfg = m.cfg.model_copy(update={"mim_weight": 0.0})
    m.teacher_forward = lambda images: (base, None)
    torch.testing.assert_close(m(batch)["loss"], out["cls_loss"])


def _local_batch(b=4, locals_=3, side=12, seed0=0):
    batch = _batch(b=b, seed0=seed0)
    g = torch.Generator().manual_seed(seed0 + 100)
    batch["views"] += [torch.randn(b, 1, side, side, generator=g) for _ in range(locals_)]
    return batch


def test_local_crops_class_tokens_learn_both_global_teacher_views():
    # iBOTLoss with local crops: every (teacher global q, student view v != q) pair, locals included, averaged
    m = _ibot("method.local_crops_number=3")
    m.eval()
    batch = _local_batch()
    b, n, k = 4, m.grid.num_patches, m.cfg.out_dim
    masked = torch.zeros(2 * b, n, dtype=torch.bool)
    masked[0, :5] = True
    m.masks = lambda seeds, scores: masked
    base = torch.randn(2 * b, 1 + n, k, generator=torch.Generator().manual_seed(1))
    seen = []
    m.teacher_forward = lambda images: (seen.append(images.shape) or base, None)
    out = m(batch)
    assert seen == [(2 * b, 1, 28, 28)]  # the teacher sees the two global views only
    temp = m.teacher_temp(0.0)
    t = F.softmax(base[:, 0] / temp, -1).view(2, b, k)
    with torch.no_grad():
        g = torch.cat(batch["views"][:2])
        s_global = m.head(m.encoder.forward_tokens(m.encoder.embed_masked(g, masked, m.mask_token)))[:, 0]
        # local crops: unmasked, 12 x 12 (a 3 x 3 patch grid), through the student encoder and the shared head
        s_local = [m.head(m.encoder(v))[:, 0] for v in batch["views"][2:]]
    student = list(F.log_softmax(s_global / 0.1, -1).view(2, b, k)) + [F.log_softmax(s / 0.1, -1) for s in s_local]
    terms = [-(t[q] * student[v]).sum(-1).mean() for q in range(2) for v in range(5) if v != q]
    assert len(terms) == 8  # 2 globals x (1 other global + 3 locals)
    torch.testing.assert_close(out["cls_loss"], torch.stack(terms).mean())
    # the MIM term is the global views' alone: the local crops do not change it
    other = {**batch, "views": batch["views"][:2] + [v + 1.0 for v in batch["views"][2:]]}
    changed = m(other)
    torch.testing.assert_close(changed["mim_loss"], out["mim_loss"])
    assert not torch.allclose(changed["cls_loss"], out["cls_loss"])
    # and the loss's gradient reaches the student through the local crops
    crop = batch["views"][2].clone().requires_grad_()
    m({**batch, "views": batch["views"][:2] + [crop] + batch["views"][3:]})["loss"].backward()
    assert crop.grad is not None and crop.grad.abs().sum() > 0


def test_local_crop_views_settings_and_batches_without_views():
    cfg = load_config(overrides=["method=ibot", "method.local_crops_number=3"]).method
    specs = IBOT.view_specs(cfg)
    assert len(specs) == 5 and [s.size for s in specs] == [None, None, (12, 12), (12, 12), (12, 12)]
    local = specs[2]
    # DataAugmentationiBOT's local transform: flip, jitter 0.8, grayscale 0.2, blur 0.5, no solarisation
    assert local.crop_scale == (0.05, 0.25) and local.hflip and (local.jitter_p, local.grayscale_p) == (0.8, 0.2)
    assert (local.blur_p, local.solarize_p) == (0.5, 0.0)
    # without views (validation, pictures) each local crop is the image resized to the local size
    m = _ibot("method.local_crops_number=2")
    m.eval()
    batch = _batch(b=4, views=False)
    small = F.interpolate(batch["image"], size=(12, 12), mode="bilinear", antialias=True)
    explicit = {**batch, "views": [batch["image"], batch["image"], small, small]}
    torch.testing.assert_close(m(batch)["loss"], m(explicit)["loss"])
    with pytest.raises(ValueError, match="needs 2 global and 2 local"):
        m({**batch, "views": [batch["image"]] * 3})
    with pytest.raises(ConfigError, match=r"method.local_crop_size=10 .*model.patch_size=4"):
        _ibot("method.local_crops_number=2", "method.local_crop_size=10")
    _ibot("method.local_crop_size=10")  # no local crops: the size is not used
    with pytest.raises(ConfigError, match="local_crops_scale"):
        load_config(overrides=["method=ibot", "method.local_crops_scale=[0.5,0.2]"])


def test_teacher_temperature_warms_up_linearly_then_holds():
    assert teacher_temperature(0.0, 0.04, 0.07, 0.3) == pytest.approx(0.04)
    assert teacher_temperature(0.15, 0.04, 0.07, 0.3) == pytest.approx(0.055)
    assert teacher_temperature(0.3, 0.04, 0.07, 0.3) == pytest.approx(0.07)
    assert teacher_temperature(0.9, 0.04, 0.07, 0.3) == pytest.approx(0.07)
    assert teacher_temperature(0.1, 0.04, 0.07, 0.0) == pytest.approx(0.07)
    m = _ibot("method.teacher_temp_warmup=0.5")
    m.begin_step(25, 100)
    assert m(_batch())["teacher_temp"].item() == pytest.approx(0.055)


def test_per_image_ratio_half_unmasked_rest_uniform_and_masks_from_seeds():
    m = _ibot()
    seeds = torch.arange(4000) * 7 + 11
    r = m.mask_ratios(seeds, 0)
    zero = r == 0
    assert abs(zero.float().mean().item() - 0.5) < 0.03
    rest = r[~zero]
    assert rest.min() >= 0.1 and rest.max() < 0.5 and abs(rest.mean().item() - 0.3) < 0.01
    quart = torch.quantile(rest, torch.tensor([0.25, 0.5, 0.75]))
    torch.testing.assert_close(quart, torch.tensor([0.2, 0.3, 0.4]), atol=0.015, rtol=0)
    r1 = m.mask_ratios(seeds, 1)  # the second view draws its own
    assert (r1 != r).float().mean() > 0.4
    # block (iBOT's non-exact variant): at most int(ratio * N) hidden, none for ratio 0
    n = m.grid.num_patches
    mask = m.view_mask(seeds[:200], 0, None)
    limit = (r[:200].double() * n).floor().long()
    assert (mask.sum(1) <= limit).all() and not mask[limit == 0].any()
    assert (mask.sum(1) >= limit - 4).float().mean() > 0.8  # blocks nearly reach the target
    assert torch.equal(mask[50:60], m.view_mask(seeds[50:60], 0, None))  # batch-independent
    rnd = _ibot("method.mask=random").view_mask(seeds[:200], 0, None)
    assert torch.equal(rnd.sum(1), limit)
    # the two views of an image get different masks, both drawn from its seed alone
    both = m.masks(seeds[:200], None)
    assert torch.equal(both[:200], mask) and not torch.equal(both[200:], mask)


def test_validation_batches_without_views_and_the_picture_hooks():
    m = _ibot()
    batch = _batch(views=False)
    out = m(batch)
    assert torch.isfinite(out["loss"]) and all(v.ndim == 0 for v in out.values())
    mask = m.make_mask(batch)
    assert mask.masked.shape == (6, m.grid.num_patches) and torch.equal(mask.masked, m.masks(batch["seed"], None)[:6])
    assert m.reconstruct(batch) is None
    specs = IBOT.view_specs(load_config(overrides=["method=ibot"]).method)
    assert len(specs) == 2 and all(s.crop_scale == (0.25, 1.0) for s in specs)
    with pytest.raises(ValueError, match="pred_ratio_var"):
        load_config(overrides=["method=ibot", "method.pred_ratio_var=0.4"])


def test_training_on_fashion_mnist_lowers_the_loss_without_collapse():
    # short-run settings: a 0.99 teacher (the recipe's), a fixed 0.04 teacher temperature and a slower centre;
    # with the reference's 0.9 centre the first ~20 steps are the centre catching up (teacher entropy rising from
    # ~4.8 towards log K), which a 25-step test cannot see past
    torch.manual_seed(0)  # the initialisation: the process's starting seed is not fixed (differs run to run)
    m = _ibot("method.teacher.start=0.99", "method.teacher_temp=0.04", "method.center_momentum=0.99")
    images = fashion_mnist(256)
    losses = train_losses(m, images, steps=25, lr=5e-4, batch_size=24, view_specs=IBOT.view_specs(m.cfg))
    assert falls(losses), losses
    m.eval()
    out = m({"image": images[:64], "seed": torch.arange(64)})
    log_k = math.log(m.cfg.out_dim)
    # not uniform (every teacher distribution flat) and not one prototype for every patch
    assert out["teacher_entropy"] < log_k - 1.0, out
    assert out["teacher_batch_entropy"] > 0.4 * log_k, out
    assert out["teacher_batch_entropy"] > out["teacher_entropy"]
