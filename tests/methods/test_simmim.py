import math

import torch
from method_helpers import cifar_samples, falls, fashion_mnist, small_method, train_losses

from mimkit.methods.simmim import SimMIM


def _batch(b=4, c=1, size=16, seed0=0):
    g = torch.Generator().manual_seed(seed0)
    return {"image": torch.randn(b, c, size, size, generator=g), "seed": torch.arange(b) + seed0}


def test_only_hidden_pixels_count_in_the_l1_loss():
    torch.manual_seed(0)
    m = small_method("simmim", 16, 3, depth=2)
    batch = _batch(c=3)
    mask = m.make_mask(batch)
    pred = m.predict(batch["image"], mask)
    hidden = m.grid.expand_mask(mask.masked).float()  # [B, 1, H, W]
    # SimMIM's formula: sum of |err| over hidden pixels / number of hidden pixels / channels
    manual = ((pred - batch["image"]).abs() * hidden).sum() / hidden.sum() / 3
    loss = m(batch)["loss"]
    torch.testing.assert_close(loss, manual)
    # anything predicted at visible pixels leaves the method's loss unchanged ...
    real_predict = m.predict
    m.predict = lambda x, mk: torch.where(m.grid.expand_mask(mk.masked), real_predict(x, mk), torch.full_like(x, 1e3))
    torch.testing.assert_close(m(batch)["loss"], manual)
    m.predict = lambda x, mk: torch.where(m.grid.expand_mask(mk.masked), torch.zeros_like(x), real_predict(x, mk))
    assert not torch.allclose(m(batch)["loss"], manual)  # ... while hidden pixels do count
    del m.predict
    # ... and the method's own loss gives visible pixels no gradient
    pred = m.predict(batch["image"], mask)
    pred.retain_grad()
    from mimkit.losses import masked_l1

    masked_l1(m.grid.patchify(pred), m.grid.patchify(batch["image"]), mask.masked)[0].backward()
    g = pred.grad.abs().sum(1, keepdim=True)
    assert (g[hidden == 0] == 0).all() and (g[hidden == 1] > 0).all()


def test_hidden_embeddings_are_the_mask_token_and_visible_ones_untouched():
    m = small_method("simmim", 16, 1, depth=2)
    batch = _batch()
    mask = m.make_mask(batch)
    images = batch["image"]
    emb = m.embed(images, mask.masked) - m.encoder.pos_embed[:, 1:]
    plain = m.encoder.patch_embed(images)
    vis, hid = ~mask.masked, mask.masked
    torch.testing.assert_close(emb[vis], plain[vis])
    torch.testing.assert_close(emb[hid], m.mask_token[0, 0].expand(int(hid.sum()), -1))
    assert not torch.allclose(plain[hid], emb[hid])
    # so the prediction cannot depend on hidden pixels, but does depend on visible ones
    with torch.no_grad():
        pred = m.predict(images, mask)
        px = m.grid.expand_mask(mask.masked)
        noisy_hidden = torch.where(px, images + torch.randn_like(images), images)
        noisy_visible = torch.where(px, images, images + torch.randn_like(images))
        assert torch.equal(m.predict(noisy_hidden, mask), pred)
        assert not torch.allclose(m.predict(noisy_visible, mask), pred)


def test_default_mask_is_coarse_and_the_mask_slot_can_be_swapped():
    m = small_method("simmim", 32, 1, depth=1)  # 8x8 grid of 4-px patches
    assert isinstance(m, SimMIM)
    seeds = torch.arange(30)
    masked = m.make_mask({"seed": seeds}).masked.view(30, 4, 2, 4, 2)
    per_unit = masked.sum(dim=(2, 4))  # SimMIM's mask unit = 2x2 patches (32 px over 16-px patches)
    assert ((per_unit == 0) | (per_unit == 4)).all()
    assert ((per_unit == 4).sum(dim=(1, 2)) == math.ceil(0.6 * 16)).all()
    block = small_method("simmim", 32, 1, "method.mask=block", depth=1).make_mask({"seed": seeds})
    assert (block.masked.sum(1) == round(0.6 * 64)).all()
    rand = small_method("simmim", 32, 1, "method.mask=random", "method.mask_ratio=0.5", depth=1)
    assert (rand.make_mask({"seed": seeds}).masked.sum(1) == 32).all()


def test_reconstruction_pastes_visible_pixels_and_any_shape_builds():
    m = small_method("simmim", 16, 3, depth=1)
    batch = _batch(2, 3)
    rec = m.reconstruct(batch)
    hidden = m.grid.expand_mask(m.make_mask(batch).masked).expand(-1, 3, -1, -1)
    assert rec.prediction.shape == batch["image"].shape
    assert torch.equal(rec.pasted[~hidden], batch["image"][~hidden])
    assert torch.equal(rec.pasted[hidden], rec.prediction[hidden])
    assert (rec.masked[hidden] == 0).all()
    odd = small_method("simmim", (28, 36), 5, depth=1)  # 7x9 grid, 5 channels
    out = odd({"image": torch.randn(2, 5, 28, 36), "seed": torch.arange(2)})
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])


def test_training_on_fashion_mnist_lowers_the_loss():
    losses = train_losses(small_method("simmim", 28, 1), fashion_mnist(256), steps=30)
    assert falls(losses), losses


def test_training_on_cifar_lowers_the_loss():
    losses = train_losses(small_method("simmim", 32, 3), cifar_samples(), steps=30, batch_size=20)
    assert falls(losses), losses
