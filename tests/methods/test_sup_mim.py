import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from method_helpers import falls, fashion_mnist, small_method, train_metrics

from mimkit.methods.sup_mim import SupMIM

FMNIST_LABELS = Path("/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz")
TEN = "method.num_classes=10"


def fashion_mnist_labels(n: int) -> torch.Tensor:
    """The first n Fashion-MNIST training labels (IDX format: 8 header bytes, then one uint8 per image)."""
    if not FMNIST_LABELS.exists():
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    with gzip.open(FMNIST_LABELS) as fh:
        raw = np.frombuffer(fh.read(), np.uint8, offset=8)
    return torch.from_numpy(raw[:n].astype(np.int64))


class Labelled(nn.Module):
    """A method whose batches get labels by index (train_metrics' seeds are index + step * len(images))."""

    def __init__(self, method, labels):
        super().__init__()
        self.method, self.labels = method, labels

    def forward(self, batch):
        return self.method({**batch, "label": self.labels[batch["seed"] % len(self.labels)]})

    def begin_step(self, step, total):
        self.method.begin_step(step, total)

    def end_step(self, step, total):
        self.method.end_step(step, total)


def _batch(b=6, size=16, seed0=0, classes=10):
    g = torch.Generator().manual_seed(seed0)
    return {"image": torch.randn(b, 1, size, size, generator=g), "seed": torch.arange(b) + seed0,
            "label": torch.randint(classes, (b,), generator=g)}


def test_w0_is_the_cross_entropy_alone_on_the_full_image_and_the_decoder_learns_nothing():
    torch.manual_seed(0)
    m = small_method("sup_mim", 16, 1, TEN, "method.mim_weight=0", depth=2)
    batch = _batch()
    out = m(batch)
    by_hand = F.cross_entropy(m.classifier(m.encoder(batch["image"])[:, 0]), batch["label"])
    assert torch.equal(out["loss"], out["ce_loss"]) and out["mim_loss"] > 0
    torch.testing.assert_close(out["loss"], by_hand)
    out["loss"].backward()
    assert all(p.grad is None or (p.grad == 0).all() for p in m.decoder.parameters())
    assert m.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    # with w > 0 the decoder does learn
    m2 = small_method("sup_mim", 16, 1, TEN, depth=2)
    m2(batch)["loss"].backward()
    assert m2.decoder.pred.weight.grad.abs().sum() > 0


def test_the_cross_entropy_reads_the_labels_and_needs_them():
    torch.manual_seed(0)
    m = small_method("sup_mim", 16, 1, TEN, depth=2)
    batch = _batch(b=8)
    base = m(batch)
    shuffled = m({**batch, "label": batch["label"].roll(1)})
    assert not torch.allclose(base["ce_loss"], shuffled["ce_loss"])
    assert torch.equal(base["mim_loss"], shuffled["mim_loss"])  # the MIM term ignores labels
    # unlabelled images (-1) are left out of the CE; a batch with no labels at all is an error naming the source
    part = batch["label"].clone()
    part[:3] = -1
    logits = m.classifier(m.encoder(batch["image"])[:, 0])
    torch.testing.assert_close(m({**batch, "label": part})["ce_loss"], F.cross_entropy(logits[3:], part[3:]))
    with pytest.raises(ValueError, match=r"needs labels.*data\.source=fashion_mnist"):
        m({**batch, "label": torch.full((8,), -1)})
    with pytest.raises(ValueError, match="needs labels"):
        m({"image": batch["image"], "seed": batch["seed"]})
    with pytest.raises(ValueError, match=r"label 12, but method\.num_classes=10"):
        m({**batch, "label": torch.full((8,), 12)})


def test_classify_masked_reads_the_class_token_of_the_masked_pass():
    torch.manual_seed(0)
    batch = _batch()
    full = small_method("sup_mim", 16, 1, TEN, "method.mim_weight=0", depth=2)
    masked = small_method("sup_mim", 16, 1, TEN, "method.mim_weight=0", "method.classify_masked=true", depth=2)
    masked.load_state_dict(full.state_dict())
    hidden = masked.grid.expand_mask(masked.make_mask(batch).masked)
    noisy = {**batch, "image": torch.where(hidden, batch["image"] + 3 * torch.randn_like(batch["image"]),
                                           batch["image"])}
    with torch.no_grad():
        assert torch.equal(masked(batch)["loss"], masked(noisy)["loss"])  # hidden pixels never reach the classifier
        assert not torch.allclose(full(batch)["loss"], full(noisy)["loss"])  # the full pass sees them
        assert not torch.allclose(full(batch)["loss"], masked(batch)["loss"])


@pytest.mark.parametrize("target", ["pixel", "codes"])
def test_the_mim_term_counts_hidden_patches_only(target):
    torch.manual_seed(0)
    m = small_method("sup_mim", 16, 1, TEN, f"method.target={target}", "method.num_codes=8", depth=1)
    batch = _batch()
    if target == "codes":
        m.tokenizer.fit(torch.randn(32, 1, 16, 16), seed=0, iters=5)
    images = batch["image"]
    mask = m.make_mask(batch)
    pred = m.decoder(m.encoder(images, ids_keep=mask.ids_keep), mask.ids_restore).detach().requires_grad_(True)
    loss, _ = m.mim_loss(pred, images, mask)
    vis = ~mask.masked
    junk = pred.detach().clone()
    junk[vis] = 1e3
    torch.testing.assert_close(m.mim_loss(junk, images, mask)[0], loss)  # visible predictions do not count
    junk = pred.detach().clone()
    junk[mask.masked] += torch.randn_like(junk[mask.masked])
    assert not torch.allclose(m.mim_loss(junk, images, mask)[0], loss)  # hidden ones do
    loss.backward()
    assert (pred.grad[vis] == 0).all() and (pred.grad[mask.masked].abs().sum(-1) > 0).all()
    if target == "pixel":  # MAE's norm-pix MSE, by hand
        t = m.grid.patchify(images)
        t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
        torch.testing.assert_close(loss, ((pred - t) ** 2).mean(-1)[mask.masked].mean())
    else:  # cross-entropy against the k-means code ids of the hidden patches, by hand
        codes = m.tokenizer.codes(images)
        torch.testing.assert_close(loss, F.cross_entropy(pred[mask.masked], codes[mask.masked]))


def test_codes_target_fits_its_tokenizer_in_prepare_and_keeps_it_in_the_state_dict():
    torch.manual_seed(0)
    m = small_method("sup_mim", 28, 1, TEN, "method.target=codes", "method.num_codes=16", "method.kmeans_images=64",
                     "method.kmeans_iters=5", depth=1)
    assert m.decoder.pred.out_features == 16 and "tokenizer.centroids" in m.state_dict()
    batch = {"image": fashion_mnist(8), "seed": torch.arange(8), "label": fashion_mnist_labels(8)}
    with pytest.raises(RuntimeError, match="not fitted"):
        m(batch)
    images = fashion_mnist(64)
    with pytest.raises(ValueError, match="needs labels"):  # an unlabelled training split stops before step 0
        m.prepare([{"image": x, "seed": i, "label": -1} for i, x in enumerate(images)], seed=0)
    assert not m.tokenizer.fitted
    m.prepare([{"image": x, "seed": i, "label": int(y)} for i, (x, y) in
               enumerate(zip(images, fashion_mnist_labels(64)))], seed=0)
    assert m.tokenizer.fitted
    out = m(batch)
    assert torch.isfinite(out["loss"]) and 0 < out["code_usage"] <= 1 and "mim_acc" in out
    assert m.reconstruct(batch).prediction.shape == batch["image"].shape
    pixel = small_method("sup_mim", 28, 1, TEN, depth=1)
    assert pixel.tokenizer is None and not any("tokenizer" in k for k in pixel.state_dict())


def test_training_on_fashion_mnist_lowers_the_loss_and_learns_the_labels():
    torch.manual_seed(0)
    images, labels = fashion_mnist(256), fashion_mnist_labels(256)
    m = small_method("sup_mim", 28, 1, TEN, depth=1)
    assert isinstance(m, SupMIM)
    rows = train_metrics(Labelled(m, labels), images, steps=30)
    # measured: loss 4.26 -> 2.43, CE 2.34 -> 1.79, train_acc 0.07 -> 0.26 (means of the first / last 5 steps)
    assert falls([r["loss"] for r in rows]), [r["loss"] for r in rows]
    assert falls([r["mim_loss"] for r in rows]), [r["mim_loss"] for r in rows]
    assert falls([r["ce_loss"] for r in rows], factor=0.85), [r["ce_loss"] for r in rows]
    first, last = np.mean([r["train_acc"] for r in rows[:5]]), np.mean([r["train_acc"] for r in rows[-5:]])
    assert last > 0.2 and last > first + 0.1, (first, last)  # chance is 0.1
