import torch
from method_helpers import cifar_samples, falls, fashion_mnist, small_method, train_losses

from mimkit.losses import masked_mse
from mimkit.methods.maskfeat import MaskFeat
from mimkit.targets import HOGTarget


def _batch(b=4, c=3, size=16, seed0=0):
    g = torch.Generator().manual_seed(seed0)
    return {"image": torch.randn(b, c, size, size, generator=g), "seed": torch.arange(b) + seed0}


def test_target_is_hog_of_the_original_image_with_cell_half_a_patch():
    m = small_method("maskfeat", 16, 3, depth=2)
    assert isinstance(m, MaskFeat) and m.target.cell == 2 and m.target.nbins == 9  # 4-px patches, 2-px cells
    assert m.target.dim == 2 * 2 * 3 * 9 and m.head.out_features == m.target.dim
    batch = _batch()
    images = batch["image"]
    mask = m.make_mask(batch)
    with torch.no_grad():
        pred = m.predict(images, mask)
        loss = m(batch)["loss"]
        torch.testing.assert_close(loss, masked_mse(pred, HOGTarget(m.grid, 2)(images), mask.masked)[0])
        # new pixels inside the hidden patches: the encoder sees none of them (same prediction), yet the loss
        # changes, because the target is the HOG of the uncorrupted image
        px = m.grid.expand_mask(mask.masked)
        changed = torch.where(px, torch.randn_like(images), images)
        assert torch.equal(m.predict(changed, mask), pred)
        assert not torch.allclose(m({"image": changed, "seed": batch["seed"]})["loss"], loss)
        # and it is not the HOG of the corrupted (hidden-blanked) image
        blanked = images.masked_fill(px, 0.0)
        assert not torch.allclose(loss, masked_mse(pred, HOGTarget(m.grid, 2)(blanked), mask.masked)[0])


def test_loss_ignores_visible_patches():
    m = small_method("maskfeat", 16, 1, depth=2)
    batch = _batch(c=1)
    mask = m.make_mask(batch)
    with torch.no_grad():
        loss = m(batch)["loss"]
    real_predict = m.predict
    where = lambda mk: mk.masked.unsqueeze(-1)  # noqa: E731
    m.predict = lambda x, mk: torch.where(where(mk), real_predict(x, mk), torch.full_like(real_predict(x, mk), 1e3))
    with torch.no_grad():
        torch.testing.assert_close(m(batch)["loss"], loss)
    del m.predict
    pred = m.predict(batch["image"], mask).detach().requires_grad_(True)
    masked_mse(pred, m.target(batch["image"]), mask.masked)[0].backward()
    g = pred.grad.abs().sum(-1)
    assert (g[~mask.masked] == 0).all() and (g[mask.masked] > 0).all()


def test_default_mask_is_beit_blocks_at_forty_percent_and_can_be_swapped():
    m = small_method("maskfeat", 28, 1, depth=1)  # 7x7 grid
    mask = m.make_mask({"seed": torch.arange(20)})
    assert (mask.masked.sum(1) == round(0.4 * 49)).all() and mask.ids_keep is not None
    coarse = small_method("maskfeat", 32, 1, "method.mask=coarse", "method.mask_ratio=0.5", depth=1)
    units = coarse.make_mask({"seed": torch.arange(10)}).masked.view(10, 4, 2, 4, 2).sum(dim=(2, 4))
    assert ((units == 0) | (units == 4)).all() and ((units == 4).sum(dim=(1, 2)) == 8).all()


def test_training_on_fashion_mnist_lowers_the_loss():
    losses = train_losses(small_method("maskfeat", 28, 1), fashion_mnist(256), steps=30)
    assert falls(losses), losses


def test_training_on_cifar_lowers_the_loss():
    losses = train_losses(small_method("maskfeat", 32, 3), cifar_samples(), steps=30, batch_size=20)
    assert falls(losses), losses
