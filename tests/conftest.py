"""Shared test fixtures: real sample images and Fashion-MNIST (skipped with a reason when absent)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "tests") not in sys.path:  # shared helpers (method_wiring) whatever pytest's import mode
    sys.path.insert(0, str(REPO / "tests"))
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


@pytest.fixture(scope="session")
def teacher_checkpoint(tmp_path_factory) -> Path:
    """A small mimkit MAE checkpoint (ViT-Tiny width, 4 blocks, patch 4 on 28x28 grey images: the shape of the
    method tests' students) trained for 40 steps on 512 Fashion-MNIST images, for the frozen-teacher methods
    (MaskAlign, DTM, Hybrid Distillation, VQ-KD): `method.teacher.source=<this path>`."""
    import torch

    from mimkit.config import load_config
    from mimkit.interop.io import save_method_checkpoint
    from mimkit.methods import build_method
    import gzip

    import numpy as np

    source = FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz"
    if not source.is_file():
        pytest.skip(f"Fashion-MNIST not installed in {FASHION_MNIST_DIR}: `sudo apt-get install dataset-fashion-mnist`")
    with gzip.open(source) as fh:
        raw = np.frombuffer(fh.read(), np.uint8, offset=16)
    mean, std = 0.286, 0.353  # the standardisation of tests/methods/method_helpers.fashion_mnist
    images = (torch.from_numpy(raw[: 512 * 784].copy()).float().view(512, 1, 28, 28) / 255 - mean) / std
    cfg = load_config(overrides=["method=mae", "model.depth=4", "model.decoder=tiny", "data.img_size=28",
                                 f"data.mean=[{mean}]", f"data.std=[{std}]"])
    torch.manual_seed(0)
    method = build_method(cfg, (28, 28), 1)
    opt = torch.optim.AdamW(method.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(40):
        idx = torch.randperm(len(images), generator=g)[:64]
        loss = method({"image": images[idx], "seed": idx + step * len(images)})["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("teacher") / "mae_teacher.ckpt"
    return save_method_checkpoint(method.eval(), cfg, {"img_size": [28, 28], "channels": 1, "mean": [mean],
                                                       "std": [std]}, path)


@pytest.fixture(scope="session")
def vqkd_run(tmp_path_factory, teacher_checkpoint) -> Path:
    """A 3-step VQ-KD tokenizer run (BEiT v2's stage 1, 28x28 grey, patch 4) for `beit_v2`'s `method.tokenizer`."""
    from mimkit.cli import main

    out = tmp_path_factory.mktemp("vqkd")
    assert main(["pretrain", "--config", str(REPO / "configs" / "vqkd_vit_tiny_fmnist.yaml"), "optim.max_steps=3",
                 "optim.batch_size=16", "data.limit=64", "data.num_workers=0", "data.stats_samples=32",
                 "data.val_fraction=0.02", "eval.knn=false", "eval.visualize=false", "trainer.progress=false",
                 "model.depth=2", "model.decoder_depth=1", f"method.teacher.source={teacher_checkpoint}",
                 f"trainer.out_dir={out}", "trainer.run_name=r"]) == 0
    return out / "r"
