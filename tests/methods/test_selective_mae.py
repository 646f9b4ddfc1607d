import torch
import torch.nn.functional as F
from method_helpers import cifar_samples, falls, fashion_mnist, small_method, train_losses

from mimkit.losses import masked_mse
from mimkit.methods.selective_mae import SelectiveMAE


def textured(n: int = 1, size: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat grey images with one noisy 3x3-patch region (patch 4: pixels 8..20, patch rows/cols 2..4), and the
    Bool[49] patches of that region."""
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(n, 1, size, size)
    x[:, :, 8:20, 8:20] = torch.randn(n, 1, 12, 12, generator=g)
    region = torch.zeros(7, 7, dtype=torch.bool)
    region[2:5, 2:5] = True
    return x, region.flatten()


def test_selection_counts_and_encoder_sees_only_the_selected_tokens():
    torch.manual_seed(0)
    m = small_method("selective_mae", 28, 1)
    assert isinstance(m, SelectiveMAE)
    n = 49
    assert (m.num_encoded, m.num_seed, m.num_targets) == (int(n * 0.15), int(n * 0.15) // 2, int(n * 0.25))
    images = fashion_mnist(4).clone().requires_grad_(True)
    batch = {"image": images, "seed": torch.arange(4) + 7}
    sel = m.select(batch)
    enc = ~sel.mask.masked
    assert (enc.sum(1) == m.num_encoded).all() and (sel.seeded.sum(1) == m.num_seed).all()
    assert (sel.seeded <= enc).all() and not (sel.targets & enc).any() and (sel.targets.sum(1) == m.num_targets).all()
    seen = {}
    hook = m.encoder.blocks[0].register_forward_pre_hook(lambda mod, a: seen.__setitem__("x", a[0]))
    m(batch)["loss"].backward()
    hook.remove()
    assert seen["x"].shape == (4, 1 + m.num_encoded, m.encoder.embed_dim)
    expected = torch.gather(m.encoder.embed(images), 1, sel.mask.ids_keep[..., None].expand(-1, -1, 192))
    torch.testing.assert_close(seen["x"][:, 1:], expected)
    # the loss depends on the pixels of the encoded patches only (targets and scores are constants)
    pix = images.grad.abs().reshape(4, 7, 4, 7, 4).sum((2, 4)).flatten(1)
    assert (pix[~enc] == 0).all() and (pix[enc] > 0).all()


def test_loss_touches_exactly_the_reconstruction_set():
    torch.manual_seed(0)
    m = small_method("selective_mae", 28, 1)
    batch = {"image": fashion_mnist(3), "seed": torch.tensor([5, 6, 7])}
    sel = m.select(batch)
    # the decoder is queried at the reconstruction set and nowhere else
    seen = {}
    hook = m.decoder.cross_blocks[0].register_forward_pre_hook(lambda mod, a: seen.__setitem__("q", a[0]))
    loss = m(batch)["loss"]
    hook.remove()
    torch.testing.assert_close(seen["q"], m.decoder.queries(sel.ids_target))
    # cross-attention queries are independent, so querying every patch gives the same predictions there
    everywhere = torch.arange(49).expand(3, -1)
    pred = m.predict(batch["image"], sel, everywhere).detach().requires_grad_(True)
    target = m.target(batch["image"])
    ref, _ = masked_mse(pred, target, sel.targets)
    torch.testing.assert_close(loss, ref)
    ref.backward()
    g = pred.grad.abs().sum(-1)
    assert (g[sel.targets] > 0).all() and (g[~sel.targets] == 0).all()
    # a loss over all hidden patches (MAE's) would differ
    assert not torch.allclose(masked_mse(pred, target, sel.mask.masked)[0], ref)


def test_hog_score_prefers_the_textured_region():
    images, region = textured(32)
    seeds = torch.arange(32) * 3 + 1
    m = small_method("selective_mae", 28, 1)
    energy = m.energy(images)
    assert set(energy[0].topk(9).indices.tolist()) == set(region.nonzero().flatten().tolist())
    sharp = small_method("selective_mae", 28, 1, "method.temperature=0.02")
    sel = sharp.select({"image": images, "seed": seeds})
    assert (sel.seeded <= region).all()  # the seeds are the highest-energy patches
    left = region & sel.mask.masked  # every textured patch not encoded is reconstructed first
    assert (left <= sel.targets).all()
    # at the default temperature the score still strongly favours the texture (chance: 9/49 = 0.18)
    sel = m.select({"image": images, "seed": seeds})
    share = (sel.seeded & region).sum() / sel.seeded.sum()
    assert share > 0.5, share
    assert ((sel.targets & region).sum() / sel.targets.sum()) > 0.3


def test_random_score_ignores_the_image_and_differs_from_hog():
    images, region = textured(32)
    seeds = torch.arange(32) * 3 + 1
    rnd = small_method("selective_mae", 28, 1, "method.score=random")
    hog = small_method("selective_mae", 28, 1)
    a = rnd.select({"image": images, "seed": seeds})
    b = rnd.select({"image": torch.randn_like(images), "seed": seeds})
    assert torch.equal(a.seeded, b.seeded)  # content-free seeding (what the released code amounts to)
    assert (a.seeded & region).sum() / a.seeded.sum() < 0.4
    assert not torch.equal(a.seeded, hog.select({"image": images, "seed": seeds}).seeded)


def test_selection_is_per_image_reproducible():
    m = small_method("selective_mae", 28, 1)
    x = fashion_mnist(3)
    full = m.select({"image": x, "seed": torch.tensor([10, 11, 12])})
    one = m.select({"image": x[1:2], "seed": torch.tensor([11])})
    assert torch.equal(full.mask.masked[1:2], one.mask.masked) and torch.equal(full.targets[1:2], one.targets)


def test_psts_expansion_follows_the_schedule():
    m = small_method("selective_mae", 28, 1)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randn(2, 20, 8, generator=g)
    noise = torch.rand(2, 20, generator=g)
    selected = torch.zeros(2, 20, dtype=torch.bool)
    selected[:, :3] = True
    t = F.normalize(tokens, dim=-1)
    sim = (t @ t.transpose(1, 2))[:, :, :3].amax(-1).masked_fill(selected, float("nan"))
    order = [s[~s.isnan()].argsort().tolist() for s in sim]  # unselected, least similar first

    def picked(progress, k=4):
        add = m.expand(tokens, selected, k, noise, progress)
        assert add.sum(1).tolist() == [k, k] and not (add & selected).any()
        return [set((row.nonzero().flatten() - 3).tolist()) for row in add]

    assert [s[0] for s in map(m.psts_stage, (0.0, 0.36, 0.5, 0.74, 0.9))] == [1, 2, 3, 4, 5]
    assert picked(0.0) == [set(o[-4:]) for o in order]  # stage 1: most similar
    assert picked(0.5) == [set(o[:4]) for o in order]  # stage 3: least similar
    assert picked(0.3625) == [set(o[-2:]) | set(o[:2]) for o in order]  # halfway near -> far
    assert picked(0.9) == [set((r[3:].topk(4).indices).tolist()) for r in noise]  # random (by the image's noise)


def test_mae_decoder_option_and_reconstruction():
    m = small_method("selective_mae", 32, 3, "method.decoder=mae")
    batch = {"image": cifar_samples(4), "seed": torch.arange(4)}
    out = m(batch)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"]) and out["encoded_frac"].item() == 9 / 64
    for method in (m, small_method("selective_mae", (16, 24), 3, "method.mask_ratio=0.75")):
        b = {"image": torch.randn(2, 3, *method.grid.img_size), "seed": torch.tensor([1, 2])}
        rec = method.reconstruct(b)
        hidden = method.grid.expand_mask(method.select(b).mask.masked).expand(-1, 3, -1, -1)
        assert rec.prediction.shape == b["image"].shape
        assert torch.equal(rec.pasted[~hidden], b["image"][~hidden])
        assert torch.equal(rec.pasted[hidden], rec.prediction[hidden])


def test_loss_falls_on_fashion_mnist():
    losses = train_losses(small_method("selective_mae", 28, 1), fashion_mnist(256), steps=30)
    assert falls(losses), losses


def test_loss_falls_on_cifar():
    losses = train_losses(small_method("selective_mae", 32, 3), cifar_samples(20), steps=30, batch_size=20)
    assert falls(losses), losses
