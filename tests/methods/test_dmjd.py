import pytest
import torch
import torch.nn.functional as F
from method_helpers import cifar_samples, falls, fashion_mnist, small_method, train_losses
from pydantic import ValidationError

from mimkit.config import load_config
from mimkit.masking.disjoint import stack_views
from mimkit.methods.dmjd import DMJD


def _batch(b=4, c=1, size=(24, 40)):
    torch.manual_seed(0)
    return {"image": torch.randn(b, c, *size), "seed": torch.arange(b) + 100}


def test_views_each_hide_the_ratio_and_together_cover_the_prediction_ratio():
    # non-square 6x10 grid (60 patches), many seeds
    m = small_method("dmjd", (24, 40), 1, "method.mask_ratio=0.6", "method.pred_ratio=0.9", depth=2)
    batch = {"image": torch.zeros(300, 1, 24, 40), "seed": torch.arange(300) * 31 + 7}
    v1, v2 = m.make_views(batch)
    hidden = 60 - int(60 * (1 - 0.6))  # MAE's count: 24 kept, 36 hidden
    assert hidden == 36
    assert (v1.masked.sum(1) == hidden).all() and (v2.masked.sum(1) == hidden).all()
    assert ((v1.masked | v2.masked).sum(1) == 54).all()                      # 0.9 of 60
    assert ((v1.masked & v2.masked).sum(1) == 2 * hidden - 54).all()          # least overlap possible
    # with mask 0.5 and prediction 1.0 the two views are exactly disjoint and complementary
    m = small_method("dmjd", (24, 40), 1, "method.mask_ratio=0.5", depth=2)
    v1, v2 = m.make_views(batch)
    assert not (v1.masked & v2.masked).any() and (v1.masked | v2.masked).all()
    # one view: plain random masking, the same first view
    m1 = small_method("dmjd", (24, 40), 1, "method.mask_ratio=0.5", "method.views=1", depth=2)
    (only,) = m1.make_views(batch)
    assert torch.equal(only.masked, v1.masked)


def test_targets_are_hog_whitened_per_cell_and_channel():
    m = small_method("dmjd", 32, 3, "model.patch_size=8", depth=2)
    images = cifar_samples(4)
    t = m.targets(images)
    raw = m.target(images)
    assert t.shape == raw.shape == (4, 16, 4 * 3 * 9)  # 2x2 cells of 4 px in an 8-px patch, 3 channels, 9 bins
    groups = t.view(4, 16, 12, 9)
    flat = raw.view(4, 16, 12, 9).abs().sum(-1) == 0  # cells without any gradient stay zero
    mean, var = groups.mean(-1), groups.var(-1, unbiased=False)
    assert mean.abs().max() < 1e-5
    assert ((var - 1).abs() < 1e-3)[~flat].all() and (var[flat] == 0).all()
    # whitening is a per-group standardisation of the plain HOG target
    expected = F.layer_norm(raw.view(4, 16, 12, 9), (9,)).view_as(raw)
    torch.testing.assert_close(t, expected)
    plain = small_method("dmjd", 32, 3, "model.patch_size=8", "method.whiten=false", depth=2)
    torch.testing.assert_close(plain.targets(images), raw)


@pytest.mark.parametrize("corruption", ["drop", "mask_token"])
def test_visible_branch_loss_uses_only_visible_tokens(corruption):
    m = small_method("dmjd", (24, 40), 1, f"method.corruption={corruption}", depth=2)
    batch = _batch()
    mask = stack_views(m.make_views(batch))
    images = torch.cat([batch["image"]] * 2)
    target = m.targets(images)
    pred, visible = m.encode(images, mask)
    assert visible.shape == (8, mask.ids_keep.shape[1], m.encoder.embed_dim)
    pred_vis = m.predict_visible(visible)
    base = m.losses(pred, pred_vis, target, mask)
    hid = mask.masked.unsqueeze(-1)
    noise = torch.randn_like(target) * 10
    on_hidden = m.losses(pred, pred_vis, torch.where(hid, target + noise, target), mask)
    on_visible = m.losses(pred, pred_vis, torch.where(hid, target, target + noise), mask)
    assert torch.equal(on_hidden["loss_vis"], base["loss_vis"]) and not torch.equal(on_hidden["loss_mim"],
                                                                                     base["loss_mim"])
    assert torch.equal(on_visible["loss_mim"], base["loss_mim"]) and not torch.equal(on_visible["loss_vis"],
                                                                                      base["loss_vis"])
    # the visible loss is SmoothL1 (beta 2) against the targets at ids_keep, in that order
    tv = torch.stack([target[i, mask.ids_keep[i]] for i in range(8)])
    torch.testing.assert_close(base["loss_vis"], F.smooth_l1_loss(pred_vis, tv, beta=2.0))
    # and with a mask-token encoder, the visible branch gets no gradient through hidden positions' outputs
    if corruption == "mask_token":
        tokens = m.encoder.forward_tokens(m.encoder.embed_masked(images, mask.masked, m.mask_token))[:, 1:]
        tokens = tokens.detach().requires_grad_(True)
        vis = torch.gather(tokens, 1, mask.ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        m.losses(pred, m.predict_visible(vis), target, mask)["loss_vis"].backward()
        g = tokens.grad.abs().sum(-1)
        assert (g[mask.masked] == 0).all() and (g[~mask.masked] > 0).all()


def test_forward_encodes_both_views_of_the_same_images_and_adds_the_branches():
    m = small_method("dmjd", (24, 40), 1, "method.vis_weight=0.5", depth=2)
    batch = _batch()
    torch.manual_seed(1)
    out = m(batch)
    views = m.make_views(batch)
    mask = stack_views(views)
    images = torch.cat([batch["image"]] * 2)
    pred, visible = m.encode(images, mask)
    manual = m.losses(pred, m.predict_visible(visible), m.targets(images), mask)
    torch.testing.assert_close(out["loss_mim"], manual["loss_mim"])
    torch.testing.assert_close(out["loss_vis"], manual["loss_vis"])
    torch.testing.assert_close(out["loss"], manual["loss_mim"] + 0.5 * manual["loss_vis"])
    assert out["pred_coverage"] == 1.0
    assert all(v.ndim == 0 for v in out.values())
    # without the visible branch there is nothing of it to train
    m0 = small_method("dmjd", (24, 40), 1, "method.vis_weight=0", depth=2)
    assert not hasattr(m0, "projector")
    out0 = m0(batch)
    assert torch.equal(out0["loss"], out0["loss_mim"])


def test_lr_rule_scales_by_prediction_over_mask_ratio():
    cfg = load_config(overrides=["method=dmjd"])
    assert DMJD.lr_scale(cfg) == pytest.approx(1.0 / 0.6)
    assert DMJD.lr_scale(cfg.method) == pytest.approx(1.0 / 0.6)
    cfg = load_config(overrides=["method=dmjd", "method.mask_ratio=0.75", "method.pred_ratio=0.9"])
    assert DMJD.lr_scale(cfg) == pytest.approx(0.9 / 0.75)
    assert DMJD.lr_scale(load_config(overrides=["method=dmjd", "method.views=1"])) == 1.0
    with pytest.raises((ValidationError, ValueError), match="pred_ratio"):
        load_config(overrides=["method=dmjd", "method.mask_ratio=0.6", "method.pred_ratio=0.5"])


def test_block_units_and_rgb():
    m = small_method("dmjd", 32, 3, "method.mask_unit=2", depth=2)
    v1, v2 = m.make_views({"image": None, "seed": torch.arange(6)})
    per_unit = v1.masked.view(6, 4, 2, 4, 2).sum(dim=(2, 4))
    assert ((per_unit == 0) | (per_unit == 4)).all()
    out = m({"image": cifar_samples(6), "seed": torch.arange(6)})
    assert torch.isfinite(out["loss"])


def test_training_lowers_the_loss_on_fashion_mnist():
    losses = train_losses(small_method("dmjd", 28, 1), fashion_mnist(256), steps=30)
    assert falls(losses), losses


def test_training_lowers_the_loss_on_cifar():
    losses = train_losses(small_method("dmjd", 32, 3), cifar_samples(), steps=30, batch_size=20)
    assert falls(losses), losses
