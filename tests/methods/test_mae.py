import torch

from method_helpers import fashion_mnist
from mimkit.config import load_config
from mimkit.methods import MAE, build_method


def small_mae(norm_pix=True, channels=1, size=16):
    cfg = load_config(overrides=["model.decoder=tiny", f"method.norm_pix={norm_pix}"])
    return build_method(cfg, size, channels)


def test_loss_counts_only_masked_patches():
    torch.manual_seed(0)
    mae = small_mae()
    batch = {"image": torch.randn(4, 1, 16, 16), "seed": torch.arange(4)}
    mask = mae.make_mask(batch)
    pred = mae.predict(batch["image"], mask)
    target = mae.target(batch["image"])
    from mimkit.losses import masked_mse

    loss, _ = masked_mse(pred, target, mask.masked)
    # replacing predictions on visible patches with anything leaves the loss unchanged
    garbage = torch.where(mask.masked.unsqueeze(-1), pred, torch.randn_like(pred) * 100)
    loss2, _ = masked_mse(garbage, target, mask.masked)
    assert torch.equal(loss, loss2)
    # and the loss equals the plain mean over masked patches
    manual = ((pred - target) ** 2).mean(-1)[mask.masked].mean()
    torch.testing.assert_close(loss, manual)
    # the full forward uses the same mask and loss
    torch.testing.assert_close(mae(batch)["loss"], loss)


def test_visible_predictions_receive_no_gradient():
    mae = small_mae()
    batch = {"image": torch.randn(2, 1, 16, 16), "seed": torch.tensor([5, 6])}
    mask = mae.make_mask(batch)
    pred = mae.predict(batch["image"], mask).detach().requires_grad_(True)
    from mimkit.losses import masked_mse

    masked_mse(pred, mae.target(batch["image"]), mask.masked)[0].backward()
    grad_norm = pred.grad.abs().sum(-1)
    assert (grad_norm[~mask.masked] == 0).all() and (grad_norm[mask.masked] > 0).all()


def test_explicit_noise_sets_the_mask():
    mae = small_mae()
    noise = torch.rand(2, 16)
    m = mae.make_mask({"image": None, "seed": None, "mask_noise": noise})
    assert (m.masked.sum(1) == 12).all()
    assert torch.equal(m.masked, noise >= noise.sort(1).values[:, 4:5])


def test_reconstruction_pastes_visible_patches():
    mae = small_mae(channels=3, size=16)
    batch = {"image": torch.randn(2, 3, 16, 16), "seed": torch.tensor([1, 2])}
    rec = mae.reconstruct(batch)
    hidden = mae.grid.expand_mask(mae.make_mask(batch).masked).expand(-1, 3, -1, -1)
    assert torch.equal(rec.pasted[~hidden], batch["image"][~hidden])
    assert torch.equal(rec.pasted[hidden], rec.prediction[hidden])
    assert (rec.masked[hidden] == 0).all()


def test_thirty_steps_on_real_images_lower_the_loss():
    torch.manual_seed(0)
    images = fashion_mnist(512)
    mae = build_method(load_config(overrides=["model.decoder=tiny"]), 28, 1)
    opt = torch.optim.AdamW([p for p in mae.parameters() if p.requires_grad], lr=1e-3, betas=(0.9, 0.95))
    fixed = {"image": images[:128], "seed": torch.arange(128) + 10**6}
    with torch.no_grad():
        before = mae(fixed)["loss"].item()
    for step in range(30):
        i = (step * 64) % 512
        out = mae({"image": images[i : i + 64], "seed": torch.arange(64) + step * 64})
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    with torch.no_grad():
        after = mae(fixed)["loss"].item()
    assert after < 0.9 * before, (before, after)


def test_presets_build_for_any_channels_and_non_square():
    cfg = load_config(overrides=["model.encoder=vit_small", "model.patch_size=8", "model.decoder=tiny",
                                "data.img_size=32"])
    mae = build_method(cfg, (32, 48), 13)
    assert isinstance(mae, MAE) and mae.grid.num_patches == 24 and mae.grid.patch_dim == 8 * 8 * 13
    out = mae({"image": torch.randn(2, 13, 32, 48), "seed": torch.arange(2)})
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
