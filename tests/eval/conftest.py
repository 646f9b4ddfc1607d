"""Real small labelled data for the protocol tests: scikit-learn's 8x8 digits (1797 images, 10 classes)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset


class Digits(Dataset):
    """{"image": Float[1, 8, 8] (standardised), "label", "index", "seed"} like mimkit's labelled datasets."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": int(self.labels[i]), "index": i, "seed": i}


@pytest.fixture(scope="session")
def digits():
    """(train, test) Digits datasets: a fixed seeded 1297 / 500 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = (x - 0.3) / 0.4
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, te = perm[500:], perm[:500]
    return Digits(x[tr], y[tr]), Digits(x[te], y[te])


@pytest.fixture(scope="session")
def digits_pixels(digits):
    """Raw pixel features [N, 64] and labels of the digits splits."""
    train, test = digits
    return train.images.flatten(1), train.labels, test.images.flatten(1), test.labels


@pytest.fixture
def tiny_vit():
    """A factory of small random-init mimkit ViTs on 8x8 single-channel images (patch 2: 16 tokens), wrapped."""
    return _tiny_vit


def _tiny_vit(depth: int = 3, dim: int = 32, seed: int = 0):
    from mimkit.backends import MimkitEncoder
    from mimkit.models import VisionTransformer

    torch.manual_seed(seed)
    vit = VisionTransformer(img_size=8, patch_size=2, in_chans=1, embed_dim=dim, depth=depth, num_heads=2)
    return MimkitEncoder(vit, 1, vit.depth, vit.embed_dim)
