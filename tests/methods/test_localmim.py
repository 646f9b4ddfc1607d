import pytest
import torch
from method_helpers import cifar_samples, falls, fashion_mnist, small_method, train_losses

from mimkit.config import ConfigError, load_config
from mimkit.methods.localmim import LocalMIM, resample_mask, tap_blocks


def hand_mask_noise(visible: list[tuple[int, int]], gw: int, n: int) -> torch.Tensor:
    """Noise whose lowest values sit on the `visible` (row, col) patches, so mask_from_noise keeps exactly those."""
    noise = torch.ones(1, n)
    for r, c in visible:
        noise[0, r * gw + c] = 0.0
    return noise + torch.arange(n) * 1e-4  # ties broken deterministically


def test_taps_follow_the_reference_layers_scaled_to_depth():
    fractions = [2 / 12, 4 / 12, 10 / 12, 1.0]
    assert tap_blocks(fractions, 12) == [1, 3, 9, 11]  # the reference's ID = [1, 3, depth-3, depth-1]
    assert tap_blocks(fractions, 24) == [3, 7, 19, 23]
    assert tap_blocks(fractions, 4) == [0, 0, 2, 3]
    assert tap_blocks(fractions, 2) == [0, 0, 1, 1]


def test_scales_cells_and_map_sizes_follow_the_patch():
    # patch 8 on 32 px (grid 4x4): all four scales, HOG cells p/4, p/2, p, 2p
    m = small_method("localmim", 32, 3, "model.patch_size=8")
    assert m.scales == [4.0, 2.0, 1.0, 0.5] and m.tap_layers == [0, 0, 2, 3]
    assert [h.cell for h in m.hogs] == [2, 4, 8, 16]
    x = torch.randn(2, 3, 32, 32)
    mask = m.make_mask({"image": x, "seed": torch.arange(2)})
    for pred, target, w, side in zip(m.predict(x, mask), m.targets(x), m.scale_weights(mask), [16, 8, 4, 2]):
        assert pred.shape == target.shape == (2, side * side, 27) and w.shape == (2, side * side)
    # patch 4: the 1-px cell of scale 4 is dropped with its (shallowest) tap unless min_cell=1
    m = small_method("localmim", 32, 1)
    assert m.scales == [2.0, 1.0, 0.5] and m.tap_layers == [0, 2, 3] and [h.cell for h in m.hogs] == [2, 4, 8]
    m = small_method("localmim", 32, 1, "method.min_cell=1")
    assert m.scales == [4.0, 2.0, 1.0, 0.5] and [h.cell for h in m.hogs] == [1, 2, 4, 8]
    with pytest.raises(ValueError, match="min_cell"):
        small_method("localmim", 32, 1, "method.min_cell=9")
    with pytest.raises(ConfigError, match="one scale per tap"):
        load_config(overrides=["method=localmim", "method.taps=[0.5, 1.0]", "method.scales=[1]"])
    with pytest.raises(ConfigError, match="scales"):
        load_config(overrides=["method=localmim", "method.taps=[1.0]", "method.scales=[3]"])


def test_mask_resampling_rule_on_a_hand_made_mask():
    m = torch.tensor([[True, False], [False, True]]).reshape(1, 4)
    # finer scales: each cell inherits its patch's mask
    up2 = resample_mask(m, (2, 2), 2.0).reshape(4, 4)
    expected2 = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.float)
    assert torch.equal(up2, expected2)
    up4 = resample_mask(m, (2, 2), 4.0).reshape(8, 8)
    assert torch.equal(up4, expected2.repeat_interleave(2, 0).repeat_interleave(2, 1))
    assert torch.equal(resample_mask(m, (2, 2), 1.0), m.float())
    # coarse scale: the hidden fraction of each 2x2 group of patches (fractional weights, as the reference)
    g = torch.tensor([[1, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 1, 1]], dtype=torch.bool).reshape(1, 16)
    assert torch.equal(resample_mask(g, (4, 4), 0.5).reshape(2, 2), torch.tensor([[0.25, 1.0], [0.0, 0.75]]))
    # odd grid: the top-left 2x2-divisible part only; the trailing row/column does not count at this scale
    o = torch.zeros(1, 3, 3, dtype=torch.bool)
    o[0, 0, 0] = True
    o[0, 2, :] = True
    o[0, :, 2] = True
    assert torch.equal(resample_mask(o.reshape(1, 9), (3, 3), 0.5), torch.tensor([[0.25]]))


def test_each_scale_loss_weighs_positions_by_the_resampled_mask():
    m = small_method("localmim", 32, 1, "model.patch_size=8")  # grid 4x4, scales 4, 2, 1, 0.5
    # 4 visible patches (ratio 0.75): three in the top-left 2x2 group, one in the bottom-right group
    visible = [(0, 0), (0, 1), (1, 0), (3, 3)]
    noise = hand_mask_noise(visible, 4, 16)
    x = fashion_mnist(1)
    x = torch.nn.functional.pad(x, (2, 2, 2, 2), value=float(x.min()))  # 32 px, background-coloured border
    targets = m.targets(x)
    # predictions = target + a distinct offset per position, so each position's error is known
    offsets = [torch.rand(1, t.shape[1], 1, generator=torch.Generator().manual_seed(k)) for k, t in enumerate(targets)]
    m.predict = lambda images, mask: [t + o for t, o in zip(targets, offsets)]
    out = m({"image": x, "seed": torch.zeros(1, dtype=torch.long), "mask_noise": noise})
    hidden = torch.ones(4, 4)
    for r, c in visible:
        hidden[r, c] = 0
    for scale, name, o in zip([4, 2, 1, 0.5], ["loss_s4", "loss_s2", "loss_s1", "loss_s0.5"], offsets):
        if scale >= 1:  # written out cell by cell: a cell at (i, j) belongs to patch (i // s, j // s)
            side = 4 * scale
            w = torch.tensor([[hidden[i // scale, j // scale] for j in range(side)] for i in range(side)])
        else:
            w = torch.tensor([[0.25, 1.0], [1.0, 0.75]])
        w = w.reshape(-1)
        err = o.reshape(-1) ** 2
        torch.testing.assert_close(out[name], (w * err).sum() / w.sum())
    torch.testing.assert_close(out["loss"], sum(out[n] for n in ["loss_s4", "loss_s2", "loss_s1", "loss_s0.5"]))


def test_each_tap_reads_the_layer_asked():
    torch.manual_seed(0)
    m = small_method("localmim", 32, 3, "model.patch_size=8")  # taps after blocks [0, 0, 2, 3]
    batch = {"image": torch.randn(2, 3, 32, 32), "seed": torch.tensor([3, 4])}
    before = m(batch)

    def perturbed(module):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        out = m(batch)
        return {k: torch.equal(out[k], before[k]) for k in ["loss_s4", "loss_s2", "loss_s1", "loss_s0.5"]}

    # the final norm is the deepest tap's norm (block 3): only the coarsest scale sees it
    assert perturbed(m.encoder.norm) == {"loss_s4": True, "loss_s2": True, "loss_s1": True, "loss_s0.5": False}
    before = m(batch)
    assert perturbed(m.encoder.blocks[3]) == {"loss_s4": True, "loss_s2": True, "loss_s1": True, "loss_s0.5": False}
    before = m(batch)
    assert perturbed(m.encoder.blocks[1]) == {"loss_s4": True, "loss_s2": True, "loss_s1": False, "loss_s0.5": False}
    before = m(batch)
    assert perturbed(m.tap_norms[1]) == {"loss_s4": True, "loss_s2": False, "loss_s1": True, "loss_s0.5": True}


def test_odd_grid_and_no_pixel_reconstruction():
    m = small_method("localmim", 28, 1)  # grid 7x7: the coarse scale works on the top-left 6x6 patches
    x = fashion_mnist(2)
    mask = m.make_mask({"image": x, "seed": torch.arange(2)})
    shapes = [p.shape[1] for p in m.predict(x, mask)]
    assert shapes == [14 * 14, 7 * 7, 3 * 3] == [t.shape[1] for t in m.targets(x)]
    out = m({"image": x, "seed": torch.arange(2)})
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.values())
    assert m.reconstruct({"image": x, "seed": torch.arange(2)}) is None
    assert isinstance(m, LocalMIM)


def test_training_lowers_the_loss_on_fashion_mnist():
    losses = train_losses(small_method("localmim", 28, 1), fashion_mnist(256), steps=30)
    assert falls(losses), losses


def test_training_lowers_the_loss_on_cifar():
    losses = train_losses(small_method("localmim", 32, 3), cifar_samples(), steps=30, batch_size=20)
    assert falls(losses), losses
