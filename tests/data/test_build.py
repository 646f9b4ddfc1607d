import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.config import ConfigError, DataConfig, load_config
from mimkit.data import DataError, build_labelled, build_pretrain_data, compute_stats, split_indices
from mimkit.data.sources import TorchvisionSource


def test_split_deterministic_disjoint_and_seeded():
    tr, va = split_indices(1000, 0.1, split_seed=0)
    tr2, va2 = split_indices(1000, 0.1, split_seed=0)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)
    assert len(va) == 100 and len(tr) == 900
    assert set(tr.tolist()).isdisjoint(va.tolist()) and set(tr.tolist()) | set(va.tolist()) == set(range(1000))
    _, va3 = split_indices(1000, 0.1, split_seed=1)
    assert not torch.equal(va, va3)
    trl, val = split_indices(1000, 0.1, split_seed=0, limit=50)
    assert torch.equal(val, va) and len(trl) == 50 and set(trl.tolist()) <= set(tr.tolist())
    assert len(split_indices(10, 0.0, 0)[1]) == 0
    assert len(split_indices(10, 0.01, 0)[1]) == 1  # a positive fraction keeps at least one image
    with pytest.raises(DataError, match="val_fraction"):
        split_indices(1, 0.5, 0)


def _write_images(root, values, size=(6, 8), mode="RGB"):
    root.mkdir(parents=True, exist_ok=True)
    arrays = []
    for k, v in enumerate(values):
        rng = np.random.default_rng(k)
        shape = size + (3,) if mode == "RGB" else size
        arr = np.clip(rng.normal(v, 30, size=shape), 0, 255).astype(np.uint8)
        Image.fromarray(arr, mode).save(root / f"im{k:02d}.png")
        arrays.append(arr)
    return arrays


def test_stats_match_numpy(tmp_path):
    arrays = _write_images(tmp_path / "imgs", [40, 120, 200, 90], size=(6, 8))
    d = build_pretrain_data(DataConfig(source="folder", path=str(tmp_path / "imgs"), img_size=(6, 8),
                                       val_fraction=0.0))
    ref = np.stack(arrays).astype(np.float64) / 255  # N, H, W, C
    assert np.allclose(d.mean, ref.mean(axis=(0, 1, 2)), atol=1e-6)
    assert np.allclose(d.std, ref.std(axis=(0, 1, 2)), atol=1e-6)
    x = torch.stack([d.val.transform(d.train.source.load(i)[0]) for i in range(4)])
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    # a subset of stats_samples images, chosen deterministically
    a = build_pretrain_data(DataConfig(source="folder", path=str(tmp_path / "imgs"), img_size=(6, 8),
                                       stats_samples=2, val_fraction=0.0))
    b = build_pretrain_data(DataConfig(source="folder", path=str(tmp_path / "imgs"), img_size=(6, 8),
                                       stats_samples=2, val_fraction=0.0))
    assert a.mean == b.mean and a.mean != d.mean


def test_given_mean_std_checked_against_channels(tmp_path):
    _write_images(tmp_path / "g", [100, 150], mode="L")
    cfg = DataConfig(source="folder", path=str(tmp_path / "g"), mean=[0.5, 0.5, 0.5], std=[0.2, 0.2, 0.2],
                     val_fraction=0.0)
    with pytest.raises(DataError, match=r"data\.mean has 3 value\(s\) but the images have 1 channel"):
        build_pretrain_data(cfg)
    d = build_pretrain_data(DataConfig(source="folder", path=str(tmp_path / "g"), mean=[0.5], std=[0.25],
                                       val_fraction=0.0))
    assert d.mean == [0.5] and d.std == [0.25] and d.channels == 1
    with pytest.raises(DataError, match=r"data\.std"):
        build_labelled(DataConfig(source="imagefolder", path=str(tmp_path)), "train", [0.5], [0.2, 0.3])


@pytest.mark.parametrize("override, field", [
    ("data.img_size=0", "data.img_size"),
    ("data.crop_scale=[0.5,0.2]", "data.crop_scale"),
    ("data.crop_ratio=[0,1]", "data.crop_ratio"),
    ("data.val_fraction=1.0", "data.val_fraction"),
    ("data.limit=0", "data.limit"),
    ("data.std=[-1]", "data.std"),
    ("data.channels=0", "data.channels"),
    ("data.on_error=ignore", "data.on_error"),
    ("data.source=folder", "data.path"),
    ("data.stats_samples=0", "data.stats_samples"),
])
def test_bad_config_values_name_the_field(override, field):
    extra = ["data.mean=[0.1]"] if "std" in override else []
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(overrides=[override, *extra])


def test_mean_std_length_mismatch_in_config():
    with pytest.raises(ConfigError, match=r"data\.mean"):
        load_config(overrides=["data.mean=[0.1,0.2]", "data.std=[0.3]"])


def test_compute_stats_empty_is_an_error(tmp_path):
    with pytest.raises(DataError, match="empty"):
        compute_stats(None, torch.tensor([], dtype=torch.long), (4, 4), 10, 0)


# ------------------------------------------------------------------------------------------ torchvision


def _write_idx(path, arr):
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in arr.shape)
    path.write_bytes(header + arr.tobytes())


@pytest.fixture
def tv_root(fashion_mnist_dir, tmp_path):
    """A torchvision FashionMNIST root made of real Fashion-MNIST images (200 train, 100 test), offline."""
    from mimkit.data.sources import read_idx

    raw = tmp_path / "tv" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for stem, n in (("train", 200), ("t10k", 100)):
        _write_idx(raw / f"{stem}-images-idx3-ubyte", read_idx(fashion_mnist_dir / f"{stem}-images-idx3-ubyte.gz")[:n])
        _write_idx(raw / f"{stem}-labels-idx1-ubyte", read_idx(fashion_mnist_dir / f"{stem}-labels-idx1-ubyte.gz")[:n])
    return tmp_path / "tv"


def test_torchvision_source(tv_root):
    cfg = DataConfig(source="torchvision", name="FashionMNIST", path=str(tv_root), img_size=32, val_fraction=0.1)
    d = build_pretrain_data(cfg)
    assert d.channels == 1 and len(d.train) == 180 and len(d.val) == 20
    item = d.train[(0, 3)]
    assert item["image"].shape == (1, 32, 32) and 0 <= item["label"] <= 9
    test = build_labelled(cfg, "test", d.mean, d.std)
    assert len(test) == 100
    rgb = build_pretrain_data(cfg.model_copy(update={"channels": 3}))
    assert rgb.train[0]["image"].shape == (3, 32, 32)


def test_torchvision_errors(tmp_path):
    with pytest.raises(DataError, match="FashionMNIST"):  # close match suggested
        TorchvisionSource("FashonMNIST", str(tmp_path), False, "train", None)
    with pytest.raises(DataError, match="data.download") as e:
        TorchvisionSource("FashionMNIST", str(tmp_path), False, "train", None)
    assert "train=True" in str(e.value)


def test_torchvision_split_argument(monkeypatch):
    import torchvision.datasets as tvd

    class SplitOnly:
        def __init__(self, root, split="train", download=False):
            if split not in ("train", "val"):
                raise ValueError(f"unknown split {split}")
            self.split = split

        def __len__(self):
            return 3

        def __getitem__(self, i):
            return Image.new("RGB", (5, 7), (10 * i, 0, 0)), i

    monkeypatch.setattr(tvd, "SplitOnly", SplitOnly, raising=False)
    src = TorchvisionSource("SplitOnly", "/nonexistent", False, "test", None)
    assert src.dataset.split == "val" and src.channels == 3
    x, label = src.load(2)
    assert x.shape == (3, 7, 5) and label == 2 and int(x[0, 0, 0]) == 20


def test_batch_larger_than_the_data_is_fitted_with_a_note():
    from mimkit.data.build import fit_batch_to_data

    assert fit_batch_to_data(128, 1000, 4) == (128, None)
    assert fit_batch_to_data(128, 128) == (128, None)
    size, note = fit_batch_to_data(128, 82)
    assert size == 82 and note == ("optim.batch_size=128 is more than the 82 training images: using "
                                   "optim.batch_size=82 (one step per epoch); set optim.batch_size to choose")
    assert fit_batch_to_data(128, 82, divisor=8)[0] == 80  # whole micro-batches on every device
    assert fit_batch_to_data(128, 5, divisor=8) == (None, None)
