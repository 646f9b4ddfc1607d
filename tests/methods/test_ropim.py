import math

import pytest
import torch
from method_helpers import cifar_samples, falls, fashion_mnist, small_method, train_losses

from mimkit.masking.ortho_sketch import CountSketchProjection
from mimkit.methods.ropim import complement_l1


@pytest.mark.parametrize("n", [49, 64, 35, 196])
def test_projection_is_a_symmetric_idempotent_count_sketch_of_rank_ceil_rho_n(n):
    gen = CountSketchProjection(1 / 7)
    seeds = torch.arange(40) * 13 + 1
    p = gen(seeds, n)
    k = math.ceil(n / 7 - 1e-9)
    eye = torch.eye(n).expand(40, -1, -1)
    torch.testing.assert_close(p @ p, p, atol=1e-6, rtol=0)
    torch.testing.assert_close(p, p.transpose(1, 2), atol=0, rtol=0)
    torch.testing.assert_close(torch.diagonal(p, dim1=1, dim2=2).sum(-1), torch.full((40,), float(k)))  # trace = rank
    assert (torch.linalg.matrix_rank(p) == k).all()
    assert not torch.allclose(p, eye) and (torch.diagonal(p, dim1=1, dim2=2) < 1).all()
    # P = S (S^T S)^-1 S^T with S one +-1 per row, buckets balanced (sizes differ by at most one)
    s = gen.sketch(seeds, n)
    assert s.shape == (40, n, k)
    assert ((s != 0).sum(-1) == 1).all() and (s.abs().sum(-1) == 1).all()
    sts = s.transpose(1, 2) @ s
    sizes = torch.diagonal(sts, dim1=1, dim2=2)
    torch.testing.assert_close(sts, torch.diag_embed(sizes))
    assert (sizes.max(1).values - sizes.min(1).values <= 1).all()
    torch.testing.assert_close(p, s @ torch.diag_embed(1 / sizes) @ s.transpose(1, 2), atol=1e-6, rtol=0)
    # signs are balanced +-1 (as many of each, up to one for odd N)
    assert (s.sum(dim=(1, 2)).abs() <= 1).all()


def test_projection_per_image_from_its_seed():
    gen = CountSketchProjection()
    a, b = gen(torch.tensor([5, 6, 7]), 49), gen(torch.tensor([9, 6]), 49)
    assert torch.equal(a[1], b[1]) and not torch.equal(a[0], b[0]) and not torch.equal(a[0], a[2])


def test_loss_ignores_errors_inside_the_projection_range():
    m = small_method("ropim", (20, 28), 1, depth=2)  # non-square 5x7 grid
    images = torch.randn(3, 1, 20, 28)
    proj = m.make_projection({"image": images, "seed": torch.arange(3)})
    x = m.grid.patchify(images)
    v = torch.randn_like(x) * 5
    inside = m.grid.unpatchify(x + proj @ v)  # differs from the target only in P's range
    assert m.loss(inside, images, proj) < 1e-5
    outside = m.grid.unpatchify(x + v - proj @ v)  # only in the complement: the loss is that error's mean |.|
    torch.testing.assert_close(m.loss(outside, images, proj), (v - proj @ v).abs().mean())
    assert m.loss(outside, images, proj) > 1.0
    # and only the complement of the residual counts for an arbitrary prediction
    pred = torch.randn_like(images)
    r = x - m.grid.patchify(pred)
    torch.testing.assert_close(complement_l1(m.grid.patchify(pred), x, proj), (r - proj @ r).abs().mean())


def test_encoder_sees_only_the_projected_tokens():
    m = small_method("ropim", 28, 1, depth=2).eval()
    images = torch.randn(2, 1, 28, 28)
    batch = {"image": images, "seed": torch.tensor([3, 4])}
    proj = m.make_projection(batch)
    x = m.grid.patchify(images)
    u = torch.randn_like(x) * 3
    # a change of the input in the complement of P's range (token axis) cannot reach the encoder
    other = m.grid.unpatchify(x + u - proj @ u)
    torch.testing.assert_close(m.predict(other, proj), m.predict(images, proj), atol=1e-4, rtol=1e-4)
    # one in P's range does
    changed = m.grid.unpatchify(x + proj @ u)
    assert not torch.allclose(m.predict(changed, proj), m.predict(images, proj), atol=1e-3)
    # forward draws the same projection and loss
    out = m(batch)
    torch.testing.assert_close(out["loss"], m.loss(m.predict(images, proj), images, proj))
    assert set(out) == {"loss", "loss_kept"} and all(v.ndim == 0 for v in out.values())


def test_reconstruction_keeps_the_original_in_p_and_the_prediction_in_its_complement():
    m = small_method("ropim", 32, 3, depth=2)
    batch = {"image": cifar_samples(2), "seed": torch.tensor([1, 2])}
    rec = m.reconstruct(batch)
    proj = m.make_projection(batch)
    x, y = m.grid.patchify(batch["image"]), m.grid.patchify(rec.prediction)
    torch.testing.assert_close(m.grid.patchify(rec.masked), proj @ x)
    torch.testing.assert_close(m.grid.patchify(rec.pasted), proj @ x + y - proj @ y)


def test_default_rho_is_one_seventh():
    m = small_method("ropim", 28, 1, depth=2)
    assert m.projection.rho == pytest.approx(1 / 7) and m.projection.sketch_dim(49) == 7
    assert m.projection.sketch_dim(196) == 28


def test_training_lowers_the_loss_on_fashion_mnist():
    losses = train_losses(small_method("ropim", 28, 1), fashion_mnist(256), steps=30)
    assert falls(losses), losses


def test_training_lowers_the_loss_on_cifar():
    losses = train_losses(small_method("ropim", 32, 3), cifar_samples(), steps=30, batch_size=20)
    assert falls(losses), losses
