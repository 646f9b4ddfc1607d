"""CCViT: k-means codes of the original image, centroid replacement beside the mask token, losses on R only."""

import pytest
import torch
import torch.nn.functional as F
from method_helpers import falls, fashion_mnist, small_method, train_metrics

from mimkit.targets.pixel import PixelTarget

N = 49  # 28x28 images, 4x4 patches


def _method(*overrides, codes=16, depth=3):
    torch.manual_seed(0)
    return small_method("ccvit", 28, 1, f"method.num_codes={codes}", *overrides, depth=depth)


@pytest.fixture(scope="module")
def images():
    return fashion_mnist(320)


def _spy(m):
    """Record what the encoder is fed and what the loss is given during one forward."""
    seen = {}
    real_embed, real_losses = m.encoder.embed_masked, m.losses

    def embed_masked(x, masked, token):
        seen["input"], seen["masked"] = x.detach().clone(), masked.clone()
        return real_embed(x, masked, token)

    def losses(last, branch, codes, norm_pix, where):
        seen["codes"], seen["norm_pix"], seen["where"] = codes.clone(), norm_pix.clone(), where.clone()
        return real_losses(last, branch, codes, norm_pix, where)

    m.encoder.embed_masked, m.losses = embed_masked, losses
    return seen


def test_codes_replacement_and_prediction_set(images):
    m = _method()
    m.tokenizer.fit(images[:64], seed=0, iters=5)
    x = images[64:72]
    batch = {"image": x, "seed": torch.arange(8) + 100}
    seen = _spy(m)
    out = m(batch)
    grid = m.grid
    patches = grid.patchify(x)
    # codes: the nearest centroid of each patch of the ORIGINAL image (brute force)
    dist = ((patches[:, :, None] - m.tokenizer.centroids[None, None]) ** 2).sum(-1)
    assert torch.equal(seen["codes"], dist.argmin(-1))
    # the mask token goes where BEiT v2's block mask says: exactly round(0.38 N) = 19 patches per image
    masked = m.make_mask(batch).masked
    assert torch.equal(seen["masked"], masked) and (masked.sum(1) == 19).all()
    # replaced: round(0.1 N) = 5 further patches per image, never masked ones, seeded per image
    replaced = m.replaced_patches(batch["seed"], masked)
    assert (replaced.sum(1) == 5).all() and not (replaced & masked).any()
    assert torch.equal(m.replaced_patches(batch["seed"][:3], masked[:3]), replaced[:3])
    assert not torch.equal(m.replaced_patches(batch["seed"] + 1, masked), replaced)
    # the encoder sees the replaced patches as exactly their centroid's pixels, every other patch as it was
    fed = grid.patchify(seen["input"])
    assert torch.equal(fed[replaced], m.tokenizer.centroids[seen["codes"][replaced]])
    assert torch.equal(fed[~replaced], patches[~replaced])
    assert not torch.equal(fed[replaced], patches[replaced])
    # R = masked | replaced; targets are the ORIGINAL image's norm-pix
    assert torch.equal(seen["where"], masked | replaced)
    torch.testing.assert_close(seen["norm_pix"], PixelTarget(grid)(x))
    assert {"loss", "l_code", "l_pixel", "mlm_acc", "code_usage"} <= set(out)
    torch.testing.assert_close(out["loss"], out["l_code"] + out["l_pixel"])
    assert out["code_usage"] == torch.unique(seen["codes"]).numel() / 16


def test_replace_ratio_sets_the_count_and_zero_leaves_r_the_mask(images):
    assert _method("method.replace_ratio=0.2").num_replaced == 10  # round(9.8)
    m = _method("method.replace_ratio=0")
    m.tokenizer.fit(images[:64], seed=0, iters=3)
    x = images[64:68]
    batch = {"image": x, "seed": torch.arange(4)}
    seen = _spy(m)
    m(batch)
    assert torch.equal(seen["where"], m.make_mask(batch).masked)
    assert torch.equal(seen["input"], x)  # no pixel is replaced


def test_loss_and_its_gradient_come_from_r_only():
    m = _method(codes=8)
    g = torch.Generator().manual_seed(0)
    b, d = 3, m.encoder.embed_dim
    last = torch.randn(b, N, d, generator=g, requires_grad=True)
    branch = torch.randn(b, N, d, generator=g, requires_grad=True)
    codes = torch.randint(8, (b, N), generator=g)
    norm_pix = torch.randn(b, N, 16, generator=g)
    where = torch.rand(b, N, generator=g) < 0.4
    out = m.losses(last, branch, codes, norm_pix, where)
    # the values: CE of the last layer's codes and MSE of the branch's pixels, averaged over R
    ce = F.cross_entropy(m.lm_head(last[where]), codes[where])
    mse = ((m.pixel_head(branch[where]) - norm_pix[where]) ** 2).mean()
    torch.testing.assert_close(out["l_code"], ce.detach())
    torch.testing.assert_close(out["l_pixel"], mse.detach())
    out["loss"].backward()
    for grad in (last.grad, branch.grad):
        assert (grad[~where] == 0).all() and (grad[where].abs().sum(-1) > 0).all()
    # other targets outside R change nothing
    other_codes = torch.where(where, codes, (codes + 3) % 8)
    other_pix = torch.where(where[..., None], norm_pix, norm_pix + 5)
    again = m.losses(last, branch, other_codes, other_pix, where)
    for k in ("loss", "l_code", "l_pixel", "mlm_acc"):
        assert torch.equal(again[k], out[k])


def test_prepare_fits_the_tokenizer_and_the_state_dict_carries_it(images):
    m = _method("method.kmeans_images=48", "method.kmeans_iters=5")
    batch = {"image": images[:4], "seed": torch.arange(4)}
    with pytest.raises(RuntimeError, match="not fitted"):
        m(batch)
    items = [{"image": img, "seed": i} for i, img in enumerate(images[:100])]
    m.prepare(items, seed=3)
    assert m.tokenizer.fitted
    again = _method("method.kmeans_images=48", "method.kmeans_iters=5")
    again.prepare(items, seed=3)
    assert torch.equal(again.tokenizer.centroids, m.tokenizer.centroids)  # deterministic given the seed
    assert "tokenizer.centroids" in m.state_dict()
    # a resumed run rebuilds the method and loads the state: no prepare, same codes, same loss
    torch.manual_seed(1)
    rebuilt = small_method("ccvit", 28, 1, "method.num_codes=16", depth=3)
    assert not rebuilt.tokenizer.fitted
    rebuilt.load_state_dict(m.state_dict())
    assert torch.equal(rebuilt.tokenizer.codes(images[:8]), m.tokenizer.codes(images[:8]))
    torch.testing.assert_close(rebuilt(batch)["loss"], m(batch)["loss"])


def test_trains_on_fashion_mnist(images):
    m = _method("method.early_layers=1", codes=32, depth=2)
    m.tokenizer.fit(images[:256], seed=0, iters=10)
    # the fitted tokenizer uses most of its (small) codebook on held-out images
    held_out = m.tokenizer.usage(m.tokenizer.codes(images[256:]))
    assert held_out > 0.5, held_out
    rows = train_metrics(m, images[:256], steps=30, lr=1e-3, batch_size=16)
    losses = [r["loss"] for r in rows]
    assert falls(losses), losses
    assert falls([r["l_code"] for r in rows]), rows
    # code accuracy at R rises from chance (1/32 at the random init) to above 0.3
    acc = [r["mlm_acc"] for r in rows]
    assert acc[0] < 0.1 and sum(acc[-5:]) / 5 > 0.3, acc
    assert min(r["code_usage"] for r in rows) > 0.5
