import torch
from method_helpers import cifar_samples, falls, fashion_mnist, small_method, train_losses

from mimkit.methods.mae import MAE
from mimkit.methods.mff import MFF, fused_blocks


def test_fused_layers_follow_the_reference_scaled_to_depth():
    fractions = [1 / 12, 3 / 12, 5 / 12, 7 / 12, 9 / 12, 1.0]
    assert fused_blocks(fractions, 12) == [0, 2, 4, 6, 8, 11]  # mmpretrain's out_indices for ViT-B
    assert fused_blocks(fractions, 4) == [0, 1, 2, 3]
    assert fused_blocks(fractions, 2) == [0, 1]
    m = small_method("mff", 28, 1)
    assert isinstance(m, MFF) and m.layers == [0, 1, 2, 3]
    assert len(m.proj) == 3  # every fused layer but the deepest has its own projection


def test_fusion_weights_sum_to_one_and_are_logged():
    m = small_method("mff", 28, 1)
    images = fashion_mnist(64)
    train_losses(m, images, steps=3, batch_size=16)
    w = m.fusion_weights()
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))
    assert not torch.allclose(w, torch.full_like(w, 0.25))  # trained: no longer the uniform initial weights
    out = m({"image": images[:8], "seed": torch.arange(8)})
    logged = torch.stack([out[f"fuse_w{i}"] for i in m.layers])
    torch.testing.assert_close(logged, w.detach())
    torch.testing.assert_close(out["fuse_shallow"], 1 - out["fuse_w3"])
    assert all(v.ndim == 0 for v in out.values())


def test_one_hot_on_the_last_layer_is_exactly_mae():
    torch.manual_seed(0)
    m = small_method("mff", 32, 3)
    mae = MAE(m.encoder, m.decoder, mask_ratio=0.75, norm_pix=True)  # the same modules, MAE's wiring
    batch = {"image": cifar_samples(4), "seed": torch.arange(4)}
    mask = m.make_mask(batch)
    # with the initial (uniform) weights the decoder input differs from MAE's
    assert not torch.allclose(m.fuse(batch["image"], mask), m.encoder(batch["image"], mask.ids_keep))
    with torch.no_grad():
        m.fuse_logits.copy_(torch.tensor([-float("inf")] * 3 + [0.0]))
    assert torch.equal(m.fusion_weights(), torch.tensor([0.0, 0.0, 0.0, 1.0]))
    assert torch.equal(m.fuse(batch["image"], mask), m.encoder(batch["image"], mask.ids_keep))
    assert torch.equal(m(batch)["loss"], mae(batch)["loss"])


def test_loss_counts_only_masked_patches_and_reaches_every_fused_layer():
    torch.manual_seed(0)
    m = small_method("mff", 28, 1)
    batch = {"image": fashion_mnist(8), "seed": torch.arange(8)}
    mask = m.make_mask(batch)
    pred = m.predict(batch["image"], mask)
    per_patch = (pred - m.target(batch["image"])).pow(2).mean(-1)
    loss = m(batch)["loss"]
    torch.testing.assert_close(loss, per_patch[mask.masked].mean())
    assert not torch.allclose(loss, per_patch.mean())  # the all-patch mean is something else
    loss.backward()
    assert m.fuse_logits.grad.abs().sum() > 0
    assert all(p.weight.grad.abs().sum() > 0 for p in m.proj)


def test_training_lowers_the_loss_on_fashion_mnist():
    losses = train_losses(small_method("mff", 28, 1), fashion_mnist(256), steps=30)
    assert falls(losses), losses


def test_training_lowers_the_loss_on_cifar():
    losses = train_losses(small_method("mff", 32, 3), cifar_samples(), steps=30, batch_size=20)
    assert falls(losses), losses
