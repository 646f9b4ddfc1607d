import pytest
import torch
from method_helpers import cifar_samples, falls, fashion_mnist, small_method, train_losses

from mimkit.losses import masked_mse
from mimkit.methods.hi_end_mae import HiEndMAE, tap_index


def test_layer_fractions_map_to_blocks_for_any_depth():
    assert [tap_index(f, 12) for f in (0.75, 0.5, 0.25)] == [8, 5, 2]  # 1-based 9, 6, 3 (the paper's layers)
    assert [tap_index(f, 4) for f in (0.75, 0.5, 0.25)] == [2, 1, 0]
    assert [tap_index(f, 2) for f in (0.75, 0.5, 0.25)] == [1, 0, 0]  # clamped: never below block 1
    assert tap_index(1.0, 3) == 2
    m = small_method("hi_end_mae", 16, 1, "method.cross_layers=[1.0,0.25]", depth=4)
    assert m.taps == [3, 0] and len(m.decoder.cross_blocks) == 2
    with pytest.raises(ValueError):
        tap_index(0.0, 4)


def test_each_cross_block_reads_its_configured_encoder_layer():
    torch.manual_seed(0)
    m = small_method("hi_end_mae", 16, 1, depth=4)
    m.eval()
    assert isinstance(m, HiEndMAE) and m.taps == [2, 1, 0]
    batch = {"image": torch.randn(2, 1, 16, 16), "seed": torch.tensor([3, 4])}
    block_out, kv_in = {}, {}
    hooks = [b.register_forward_hook(lambda mod, a, out, i=i: block_out.__setitem__(i, out))
             for i, b in enumerate(m.encoder.blocks)]
    hooks += [cb.cross_attn.register_forward_pre_hook(lambda mod, a, i=i: kv_in.__setitem__(i, a[1]))
              for i, cb in enumerate(m.decoder.cross_blocks)]
    m(batch)
    for h in hooks:
        h.remove()
    n_vis = m.make_mask(batch).num_visible
    for i, tap in enumerate(m.taps):
        assert kv_in[i].shape == (2, 1 + n_vis, m.decoder.dim)  # visible tokens (and class token) only
        with torch.no_grad():
            torch.testing.assert_close(kv_in[i], m.proj_layers[i](block_out[tap]))
            for other in set(range(4)) - {tap}:  # and not any other layer
                assert not torch.allclose(kv_in[i], m.proj_layers[i](block_out[other]), atol=1e-3)


def test_perturbing_a_tapped_memory_changes_the_prediction_only_through_its_block():
    # the deepest tapped layer at depth 4 is block 2; block 3 (untapped, the last) feeds only the final projection
    torch.manual_seed(0)
    m = small_method("hi_end_mae", 16, 1, depth=4)
    m.eval()
    batch = {"image": torch.randn(2, 1, 16, 16), "seed": torch.tensor([3, 4])}
    mask = m.make_mask(batch)
    with torch.no_grad():
        latent, layers = m.encode(batch["image"], mask)
        base = m.decoder(m.decoder.fill(m.proj_final(latent), mask.ids_restore), m.memories(layers))
        assert set(layers) == {0, 1, 2}  # block 3 is not tapped
        bumped = dict(layers)
        bumped[1] = layers[1] + 5.0 * torch.randn_like(layers[1])
        mems = m.memories(bumped)
        assert torch.equal(mems[0], m.memories(layers)[0]) and not torch.equal(mems[1], m.memories(layers)[1])
        out = m.decoder(m.decoder.fill(m.proj_final(latent), mask.ids_restore), mems)
    assert not torch.allclose(out, base, atol=1e-4)
    # the prediction is exactly predict()'s
    torch.testing.assert_close(base[:, 1:], m.predict(batch["image"], mask))


def test_loss_counts_only_masked_patches():
    torch.manual_seed(0)
    m = small_method("hi_end_mae", 16, 3)
    batch = {"image": torch.randn(3, 3, 16, 16), "seed": torch.arange(3)}
    mask = m.make_mask(batch)
    assert (mask.masked.sum(1) == 12).all()
    pred = m.predict(batch["image"], mask).detach().requires_grad_(True)
    target = m.target(batch["image"])
    loss, _ = masked_mse(pred, target, mask.masked)
    loss.backward()
    g = pred.grad.abs().sum(-1)
    assert (g[~mask.masked] == 0).all() and (g[mask.masked] > 0).all()
    torch.testing.assert_close(m(batch)["loss"], ((pred - target) ** 2).mean(-1)[mask.masked].mean())


def test_reconstruction_returns_pixels():
    m = small_method("hi_end_mae", (16, 24), 3)
    batch = {"image": torch.randn(2, 3, 16, 24), "seed": torch.tensor([1, 2])}
    rec = m.reconstruct(batch)
    hidden = m.grid.expand_mask(m.make_mask(batch).masked).expand(-1, 3, -1, -1)
    assert rec.prediction.shape == batch["image"].shape
    assert torch.equal(rec.pasted[~hidden], batch["image"][~hidden])
    assert torch.equal(rec.pasted[hidden], rec.prediction[hidden])


def test_loss_falls_on_fashion_mnist():
    losses = train_losses(small_method("hi_end_mae", 28, 1), fashion_mnist(256), steps=30)
    assert falls(losses), losses


def test_loss_falls_on_cifar():
    losses = train_losses(small_method("hi_end_mae", 32, 3), cifar_samples(20), steps=30, batch_size=20)
    assert falls(losses), losses
