"""Any MNIST-like IDX dataset (MNIST, KMNIST, EMNIST share the format) as data.source=idx, under its own name."""

import gzip
import struct

import numpy as np
import pytest
import torch

from mimkit.config import DataConfig, load_config
from mimkit.data import DataError, build_labelled, build_pretrain_data
from mimkit.data.build import dataset_name


def _write_idx(path, array: np.ndarray, gz: bool):
    """The IDX format, written here from its definition: 0, 0, type code (0x08 = unsigned byte), ndim, then
    each dimension as a big-endian uint32, then the data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def _dataset(folder, prefix="", n=(40, 12), hw=(28, 28), seed=0, gz=True, sep="-"):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, count in (("train", n[0]), ("test" if prefix else "t10k", n[1])):
        images = rng.integers(0, 256, size=(count, *hw), dtype=np.uint8)
        labels = rng.integers(0, 10, size=count, dtype=np.uint8)
        ext = ".gz" if gz else ""
        _write_idx(folder / f"{prefix}{split}-images-idx3-ubyte{ext}", images, gz)
        _write_idx(folder / f"{prefix}{split}{sep}labels-idx1-ubyte{ext}", labels, gz)
        out[split] = (images, labels)
    return out


def test_mnist_like_folder_is_a_source_with_its_own_name(tmp_path):
    arrays = _dataset(tmp_path / "kmnist", gz=False)
    cfg = DataConfig(source="idx", path=str(tmp_path / "kmnist"), stats_samples=20)
    d = build_pretrain_data(cfg)
    assert d.channels == 1 and len(d.train) + len(d.val) == 40 and d.img_size == (28, 28)
    src = d.train.source
    assert src.name == "kmnist" and dataset_name(cfg) == "kmnist"
    img, label = src.load(3)
    assert torch.equal(img[0], torch.from_numpy(arrays["train"][0][3])) and label == int(arrays["train"][1][3])
    test = build_labelled(cfg, "test", d.mean, d.std)  # the official test split (t10k)
    assert len(test) == 12 and test[5]["label"] == int(arrays["t10k"][1][5])
    assert load_config(overrides=["data.source=idx", f"data.path={tmp_path / 'kmnist'}"]).data.source == "idx"


def test_emnist_folder_with_several_datasets_needs_a_name(tmp_path):
    root = tmp_path / "gzip"
    digits = _dataset(root, prefix="emnist-digits-", seed=1)
    _dataset(root, prefix="emnist-letters-", seed=2, n=(30, 10))
    cfg = DataConfig(source="idx", path=str(root), stats_samples=20)
    with pytest.raises(DataError, match=r"several train IDX files.*set data\.name"):
        build_pretrain_data(cfg)
    cfg = DataConfig(source="idx", path=str(root), name="emnist-digits", stats_samples=20)
    d = build_pretrain_data(cfg)
    assert len(d.train) + len(d.val) == 40 and dataset_name(cfg) == "emnist-digits"
    test = build_labelled(cfg, "test", d.mean, d.std)
    assert len(test) == 12 and test.source.name == "emnist-digits"
    assert torch.equal(test.source.load(0)[0][0], torch.from_numpy(digits["test"][0][0]))


def test_idx_errors_name_the_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty has no train image"):
        build_pretrain_data(DataConfig(source="idx", path=str(tmp_path / "empty")))
    with pytest.raises(Exception, match="data.path is required"):
        DataConfig(source="idx")


def test_fashion_mnist_folder_as_idx(fashion_mnist_dir):
    cfg = DataConfig(source="idx", path=str(fashion_mnist_dir), limit=100, stats_samples=50)
    assert dataset_name(cfg) == "fashion-mnist"  # the folder's name: its files carry no prefix
    assert dataset_name(DataConfig()) == "fashionmnist"
    assert len(build_pretrain_data(cfg).train) == 100
