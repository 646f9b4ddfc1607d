"""Online probing: how good the encoder is *during* pretraining, on a fixed labelled held-out subset.

As stable-pretraining's OnlineProbe / OnlineKNN, but without touching the run: the probe images are a fixed,
seeded subset of the run's validation split (images pretraining never trains on), split once into a probe
bank/train half and a probe query/test half. Every call encodes both halves with the encoder in eval mode
under no_grad, then scores weighted kNN and a linear probe (a small lr sweep, chosen on a slice of the probe
train half). Its randomness runs under a forked RNG, so calling it changes neither the training run's weights
nor its random stream (tests/eval/test_online_probe.py checks the run is bit-for-bit unchanged).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from mimkit.eval.features import extract_features
from mimkit.eval.knn import knn_classify
from mimkit.eval.linear import linear_probe

ONLINE_LRS = (0.01, 0.1, 1.0)


@dataclass
class ProbeSet:
    """The fixed labelled images: the probe's train half and test half (normalised image tensors)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int

    @classmethod
    def from_dataset(cls, dataset, num_images: int, seed: int = 0) -> "ProbeSet":
        """`num_images` labelled items of a map-style dataset of {"image", "label"} dicts, drawn with `seed`
        (labels < 0 mean unlabelled and are refused), split in two halves by a second seeded shuffle."""
        n = len(dataset)
        if n < 4:
            raise ValueError(f"the online probe needs at least 4 held-out images, the validation split has {n}")
        g = torch.Generator().manual_seed(seed)
        pick = torch.randperm(n, generator=g)[: min(num_images, n)]
        items = [dataset[int(i)] for i in pick]
        labels = torch.tensor([int(it["label"]) for it in items])
        if (labels < 0).any():
            raise ValueError("the online probe needs labelled images, and this data's validation split has none "
                             "(set eval.online_probe_every_steps=null, or use a labelled source)")
        images = torch.stack([it["image"] for it in items])
        half = images.shape[0] // 2
        num_classes = int(labels.max()) + 1
        return cls(images[:half], labels[:half], images[half:], labels[half:], num_classes)


def probe_encoder(encoder: torch.nn.Module, probes: ProbeSet, pool: str = "cls", knn_k: int = 20,
                  linear_epochs: int = 20, seed: int = 0) -> dict:
    """{"online_knn", "online_linear", "online_probe_s"} of `encoder` on the probe set (accuracies in [0, 1])."""
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        x_tr, _ = extract_features(encoder, list(zip(probes.train_images.split(256), probes.train_labels.split(256))),
                                   pool=pool)
        x_te, _ = extract_features(encoder, list(zip(probes.test_images.split(256), probes.test_labels.split(256))),
                                   pool=pool)
        pred = knn_classify(x_tr, probes.train_labels, x_te, k=knn_k, num_classes=probes.num_classes)
        lin = linear_probe(x_tr, probes.train_labels, x_te, probes.test_labels, lrs=ONLINE_LRS,
                           epochs=linear_epochs, batch_size=128, val_fraction=0.2, seed=seed,
                           num_classes=probes.num_classes)
    return {
        "online_knn": float((pred == probes.test_labels).float().mean()),
        "online_linear": float(lin["test_acc"]),
        "online_probe_s": time.perf_counter() - start,
    }
