"""Shared test fixtures: real sample images and Fashion-MNIST (skipped with a reason when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def real_images_path() -> Path:
    """CIFAR-10/100, ImageNet and MNIST sample images from the foolbox wheel (`make test-data`)."""
    return Path(os.environ.get("MIMKIT_TEST_DATA", REPO / ".data" / "foolbox" / "foolbox" / "data"))


@pytest.fixture(scope="session")
def real_images_dir() -> Path:
    d = real_images_path()
    if not d.is_dir() or not any(d.glob("cifar10_*.png")):
        pytest.skip(f"real sample images not found in {d}: run `make test-data` or set MIMKIT_TEST_DATA")
    return d


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST not installed in {FASHION_MNIST_DIR}: `sudo apt-get install dataset-fashion-mnist`")
    return FASHION_MNIST_DIR
