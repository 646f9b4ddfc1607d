import math

import pytest
import torch
import torch.nn.functional as F
from method_helpers import cifar_samples, falls, fashion_mnist, small_method, train_losses

from mimkit.losses.frequency import FocalFrequencyLoss, spectrum, spectrum_weight
from mimkit.methods.a2mim import A2MIM, focal_l1


def _batch(b=4, c=1, size=16, seed0=0):
    g = torch.Generator().manual_seed(seed0)
    return {"image": torch.randn(b, c, size, size, generator=g) * 0.5 + torch.randn(b, c, 1, 1, generator=g),
            "seed": torch.arange(b) + seed0}


def _resnet(size=16, channels=3, *overrides):
    return small_method("a2mim", size, channels, "model.encoder=resnet18", *overrides)


@pytest.mark.parametrize("kind", ["vit_embed", "vit_block", "cnn_stage"])
def test_mask_token_is_added_to_the_hidden_features_at_the_chosen_layer(kind):
    torch.manual_seed(0)
    if kind == "vit_embed":
        m = small_method("a2mim", 16, 1, depth=2)
    elif kind == "vit_block":
        m = small_method("a2mim", 16, 1, "method.mask_layer=0.5", depth=2)
    else:
        m = _resnet(16, 1)
    batch = _batch()
    mask = m.make_mask(batch)
    filled = m.fill_hidden(batch["image"], mask.masked)
    rec = {}
    with torch.no_grad():
        m.encode(filled, mask.masked, record=rec)
        enc = m.encoder
        # "before" is the plain feature of the filled image at that layer, computed without the method
        if kind == "vit_embed":
            assert m.mask_layer == 0
            plain = enc.patch_embed(filled)
        elif kind == "vit_block":
            assert m.mask_layer == 1
            plain = enc.forward_layers(filled, [0])[0][:, 1:]
        else:
            assert m.mask_layer == 3  # reference: stage 3 of a ResNet (stride 16 at 224 px, 4 here)
            plain = enc.forward_maps(filled, upto=2)[-1]
    before, after = rec["before"], rec["after"]
    torch.testing.assert_close(before, plain)
    if kind == "cnn_stage":  # [B, D, h, w]: one mask cell per feature cell at this stage
        where = mask.masked.view(-1, 1, *m.grid.shape).expand_as(before)
        token = m.mask_token.view(1, -1, 1, 1).expand_as(before)
    else:
        where = mask.masked.unsqueeze(-1).expand_as(before)
        token = m.mask_token.view(1, 1, -1).expand_as(before)
    assert where.any() and (~where).any()
    torch.testing.assert_close(after[~where], before[~where], rtol=0, atol=0)  # visible: untouched
    torch.testing.assert_close(after[where], (before + token)[where])          # hidden: x + token
    assert not torch.allclose(after[where], token[where])                      # not substitution


def test_mask_gamma_scales_hidden_features_before_the_token():
    m = small_method("a2mim", 16, 1, "method.mask_gamma=0.25", depth=2)
    feats = torch.randn(2, m.grid.num_patches, m.encoder.embed_dim)
    where = m.make_mask({"seed": torch.arange(2)}).masked
    out = m.add_mask_token(feats, where)
    w = where.unsqueeze(-1)
    torch.testing.assert_close(out, torch.where(w, 0.25 * feats + m.mask_token, feats))
    assert small_method("a2mim", 16, 1, depth=2).mask_gamma is None  # default: pure residual


def test_hidden_input_pixels_are_each_images_channel_mean_and_the_encoder_sees_them():
    for m, c in ((small_method("a2mim", 16, 3, depth=1), 3), (_resnet(16, 1), 1)):
        batch = _batch(3, c)
        images = batch["image"]
        mask = m.make_mask(batch)
        filled = m.fill_hidden(images, mask.masked)
        hidden = m.grid.expand_mask(mask.masked).expand_as(images)
        colour = images.mean(dim=(2, 3), keepdim=True).expand_as(images)  # over all pixels, per image, per channel
        torch.testing.assert_close(filled[hidden], colour[hidden])
        torch.testing.assert_close(filled[~hidden], images[~hidden], rtol=0, atol=0)
        assert colour[:, :, 0, 0].unique().numel() == 3 * c  # a colour per image and channel, not a constant
        seen = []
        first = m.encoder.conv1 if m.is_cnn else m.encoder.patch_embed
        handle = first.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
        with torch.no_grad():
            m.predict(images, mask)
        handle.remove()
        torch.testing.assert_close(seen[0], filled)
    zero = small_method("a2mim", 16, 1, "method.fill=zero", depth=1)
    b = _batch()
    mk = zero.make_mask(b)
    assert (zero.fill_hidden(b["image"], mk.masked)[zero.grid.expand_mask(mk.masked)] == 0).all()


def test_spatial_loss_counts_only_hidden_pixels_and_fft_loss_is_added_with_the_reference_weights():
    torch.manual_seed(0)
    m = small_method("a2mim", 16, 3, depth=2)
    assert (m.spatial_loss, m.fft_weight, m.fft_unmask_weight) == ("l1", 0.1, 0.0)  # ViT reference
    cnn = _resnet(16, 3)
    assert (cnn.spatial_loss, cnn.fft_weight, cnn.fft_unmask_weight) == ("focal_l1", 0.5, 1e-3)  # ResNet
    batch = _batch(c=3)
    images = batch["image"]
    mask = m.make_mask(batch)
    pred = m.predict(images, mask).detach()
    hidden = m.grid.expand_mask(mask.masked)
    out = m.losses(pred, images, mask.masked)
    manual = ((pred - images).abs() * hidden).sum() / hidden.sum() / 3  # SimMIM/A2MIM head normalisation
    torch.testing.assert_close(out["spatial"], manual)
    torch.testing.assert_close(out["loss"], out["spatial"] + 0.1 * out["fft"])
    assert out["fft"] > 0
    # visible pixels do not change the L1 part; hidden ones do
    wild = torch.where(hidden, pred, torch.full_like(pred, 50.0))
    torch.testing.assert_close(m.losses(wild, images, mask.masked)["spatial"], manual)
    assert not torch.allclose(m.losses(torch.where(hidden, images, pred), images, mask.masked)["spatial"], manual)
    # with the ViT setting (fft_unmask_weight 0, visible pixels replaced by detached 0.5 pred + 0.5 x) the whole
    # loss gives visible pixels no gradient
    p = pred.clone().requires_grad_(True)
    m.losses(p, images, mask.masked)["loss"].backward()
    g = p.grad.abs().sum(1, keepdim=True)
    assert (g[~hidden] == 0).all() and (g[hidden] > 0).all()
    # ... the ResNet setting lets 1e-3 of the prediction at visible pixels into the FFT loss
    p = pred.clone().requires_grad_(True)
    cnn.losses(p, images, mask.masked)["loss"].backward()
    assert (p.grad.abs().sum(1, keepdim=True)[~hidden] > 0).any()
    # focal L1 (ResNet): |e| (2 sigmoid(0.2 |e|) - 1), zero at zero error and below |e|
    e = torch.tensor([0.0, 1.0, 5.0])
    torch.testing.assert_close(focal_l1(e, torch.zeros(3)), e * (2 * torch.sigmoid(0.2 * e) - 1))
    off = small_method("a2mim", 16, 3, "method.fft_weight=0", depth=2)
    assert "fft" not in off.losses(pred, images, mask.masked)


def test_fft_input_replaces_visible_pixels_by_the_mixed_stand_in():
    m = small_method("a2mim", 16, 1, depth=1)
    b = _batch()
    hidden = m.grid.expand_mask(m.make_mask(b).masked).float()
    pred = torch.randn_like(b["image"])
    x = m.fft_input(pred, b["image"], hidden)
    torch.testing.assert_close(x, torch.where(hidden.bool(), pred, 0.5 * pred + 0.5 * b["image"]))


def _wave(size, ky, kx, amp):
    y = torch.arange(size).view(-1, 1).float()
    x = torch.arange(size).view(1, -1).float()
    return amp * torch.cos(2 * math.pi * (ky * y + kx * x) / size)


def test_focal_frequency_loss_is_zero_only_for_identical_images_and_weights_hard_frequencies_more():
    torch.manual_seed(0)
    ffl = FocalFrequencyLoss()
    img = torch.randn(1, 1, 16, 16)
    assert ffl(img, img.clone()) == 0
    assert ffl(img + 0.01 * torch.randn_like(img), img) > 0
    # two perturbations of the same energy (so the same pixel MSE and plain spectral MSE, by Parseval):
    # A puts it all in one frequency; B splits it unevenly between two (a hard and an easy one). Small
    # amplitudes keep log(1 + |dF|) near |dF|, so the easy frequency's weight is about sqrt(1/3)
    a = _wave(16, 1, 3, 0.05)
    b = _wave(16, 1, 3, 0.05 * math.sqrt(0.75)) + _wave(16, 5, 2, 0.05 * math.sqrt(0.25))
    torch.testing.assert_close(a.pow(2).sum(), b.pow(2).sum())
    plain = lambda p: (spectrum(img + p) - spectrum(img)).pow(2).sum(-1).mean()  # noqa: E731
    torch.testing.assert_close(plain(a), plain(b))
    assert ffl(img + a, img) > 1.08 * ffl(img + b, img)  # the easy frequency of B is down-weighted
    # the weight itself: 1 at the hardest frequency, less at the easier one, in [0, 1]
    w = spectrum_weight(spectrum(img + b), spectrum(img))[0, 0]
    hard, easy = w[1, 3], w[5, 2]
    torch.testing.assert_close(hard, torch.tensor(1.0))
    assert 0.4 < easy < 0.7 and w.min() >= 0 and w.max() <= 1
    # the weight is detached: the gradient is that of weight * |dF|^2 with the weight held fixed
    p = (img + b).requires_grad_(True)
    ffl(p, img).backward()
    p2 = (img + b).requires_grad_(True)
    FocalFrequencyLoss()(p2, img, matrix=spectrum_weight(spectrum(img + b), spectrum(img))).backward()
    torch.testing.assert_close(p.grad, p2.grad)


def test_mask_layer_fraction_and_mask_geometry():
    for depth, frac, want in ((2, 0.5, 1), (3, 0.5, 2), (4, 0.75, 3), (2, 0.9, 1), (4, 0.0, 0)):
        m = small_method("a2mim", 16, 1, f"method.mask_layer={frac}", depth=depth)
        assert m.mask_layer == want
    assert _resnet(16, 1, "model.depth=2").mask_layer == 1  # CNN default 0.75, clamped to the last stage
    m = small_method("a2mim", 32, 1, depth=1)  # 8x8 grid of 4-px patches, 2x2-patch mask units (8 px)
    masked = m.make_mask({"seed": torch.arange(20)}).masked.view(20, 4, 2, 4, 2)
    per_unit = masked.sum(dim=(2, 4))
    assert ((per_unit == 0) | (per_unit == 4)).all()
    assert ((per_unit == 4).sum(dim=(1, 2)) == math.ceil(0.6 * 16)).all()


def test_reconstruction_and_odd_shapes():
    for m, c, size in ((small_method("a2mim", (16, 24), 3, depth=1), 3, (16, 24)), (_resnet(28, 1), 1, (28, 28))):
        b = {"image": torch.randn(2, c, *size), "seed": torch.arange(2)}
        rec = m.reconstruct(b)
        hidden = m.grid.expand_mask(m.make_mask(b).masked).expand_as(b["image"])
        assert rec.prediction.shape == b["image"].shape
        torch.testing.assert_close(rec.pasted[~hidden], b["image"][~hidden])
        torch.testing.assert_close(rec.pasted[hidden], rec.prediction[hidden])
        assert torch.isfinite(m(b)["loss"])
    assert isinstance(m, A2MIM) and m.is_cnn


def test_loss_falls_on_fashion_mnist_vit():
    losses = train_losses(small_method("a2mim", 28, 1), fashion_mnist(256), steps=30, lr=1e-3)
    assert falls(losses), losses


def test_loss_falls_on_cifar_vit():
    losses = train_losses(small_method("a2mim", 32, 3), cifar_samples(), steps=30, lr=1e-3, batch_size=20)
    assert falls(losses), losses


def test_loss_falls_on_cifar_resnet18():
    # the full ResNet-18 (4 stages, full-resolution stem) on the CIFAR samples at 16 px: 32 px costs about 4x
    # more and this suite must stay quick on a shared 2-core CPU
    images = F.avg_pool2d(cifar_samples(), 2)
    m = _resnet(16, 3)
    assert m.encoder.depth == 4 and m.encoder.embed_dim == 512
    losses = train_losses(m, images, steps=16, lr=1e-3, batch_size=10)
    assert falls(losses, window=4), losses
