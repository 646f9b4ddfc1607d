import pickle
import time

import pytest
import torch
from torch.utils.data import DataLoader

from mimkit.config import DataConfig
from mimkit.data import DataError, SeededSampler, build_labelled, build_pretrain_data
from mimkit.data.sources import FashionMNISTSource, read_idx


@pytest.fixture(scope="module")
def fmnist(fashion_mnist_dir):
    return build_pretrain_data(DataConfig(stats_samples=500))


def test_official_splits_and_items(fmnist):
    assert fmnist.channels == 1 and fmnist.img_size == (28, 28)
    assert len(fmnist.train) + len(fmnist.val) == 60_000
    assert len(fmnist.val) == 3_000  # val_fraction 0.05
    assert not set(fmnist.train.source_indices) & set(fmnist.val.source_indices)
    item = fmnist.train[(5, 1234)]
    assert set(item) == {"image", "seed", "index", "label"}
    assert item["image"].shape == (1, 28, 28) and item["image"].dtype == torch.float32
    assert item["seed"] == 1234 and item["index"] == 5 and 0 <= item["label"] <= 9
    # plain int index: seed derived from the index, reproducible
    a, b = fmnist.train[7], fmnist.train[7]
    assert torch.equal(a["image"], b["image"]) and a["seed"] == b["seed"]
    test = build_labelled(DataConfig(), "test", fmnist.mean, fmnist.std)
    train = build_labelled(DataConfig(), "train", fmnist.mean, fmnist.std)
    assert len(test) == 10_000 and len(train) == 60_000
    labels = torch.tensor([test[i]["label"] for i in range(0, 10_000, 7)])
    assert set(labels.tolist()) == set(range(10))


def test_stats_are_plausible_and_normalize(fmnist):
    # Fashion-MNIST's pixel mean is about 0.286 and std about 0.353
    assert abs(fmnist.mean[0] - 0.286) < 0.01 and abs(fmnist.std[0] - 0.353) < 0.01
    x = torch.stack([fmnist.val[i]["image"] for i in range(300)])
    assert abs(float(x.mean())) < 0.1 and abs(float(x.std()) - 1) < 0.1


def test_idx_decoding_matches_raw_bytes(fashion_mnist_dir):
    import gzip

    raw = gzip.open(fashion_mnist_dir / "t10k-images-idx3-ubyte.gz").read()
    arr = read_idx(fashion_mnist_dir / "t10k-images-idx3-ubyte.gz")
    assert arr.shape == (10_000, 28, 28)
    assert bytes(arr[3].tobytes()) == raw[16 + 3 * 784 : 16 + 4 * 784]


def test_missing_directory_says_how_to_install(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist") as e:
        build_pretrain_data(DataConfig(path=str(tmp_path / "nope")))
    assert "data.path" in str(e.value)
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        FashionMNISTSource("train", str(tmp_path))


def test_forced_three_channels(fashion_mnist_dir):
    d = build_pretrain_data(DataConfig(channels=3, limit=64, stats_samples=64, img_size=(32, 24)))
    x = d.train[(0, 9)]["image"]
    assert d.channels == 3 and len(d.mean) == 3 and x.shape == (3, 32, 24)
    assert torch.allclose(x[0], x[1]) and torch.allclose(x[1], x[2])


def test_limit_after_split_is_deterministic(fashion_mnist_dir):
    a = build_pretrain_data(DataConfig(limit=100, stats_samples=50))
    b = build_pretrain_data(DataConfig(limit=100, stats_samples=50))
    assert len(a.train) == 100 and a.train.source_indices == b.train.source_indices
    assert len(a.val) == 100  # the val loss is scored on at most data.limit held-out images
    labels = {a.train[i]["label"] for i in range(100)}
    assert len(labels) >= 8  # a seeded subset, not the first 100 files


def test_val_limit_takes_a_subset_of_the_same_held_out_pool(fashion_mnist_dir):
    full = build_pretrain_data(DataConfig(stats_samples=50))
    small = build_pretrain_data(DataConfig(limit=100, stats_samples=50, val_limit=40))
    capped = build_pretrain_data(DataConfig(limit=100, stats_samples=50))
    pool, train = set(full.val.source_indices), set(small.train.source_indices)
    assert len(full.val) == 3_000 and len(small.val) == 40 and len(capped.val) == 100
    # the smaller val sets come out of the one held-out pool (it does not depend on either limit) ...
    assert set(small.val.source_indices) <= pool and set(capped.val.source_indices) <= pool
    assert not pool & train
    # ... as a seeded subset (not the pool's first files), the 40 inside the 100
    assert set(small.val.source_indices) <= set(capped.val.source_indices)
    assert max(small.val.source_indices) > 30_000
    labels = {small.val[i]["label"] for i in range(40)}
    assert len(labels) >= 8


def test_throughput_and_picklable(fmnist):
    ds = pickle.loads(pickle.dumps(fmnist.train))
    sampler = SeededSampler(len(ds), seed=0)
    it = iter(sampler)
    keys = [next(it) for _ in range(2000)]
    t = time.perf_counter()
    for k in keys:
        ds[k]
    rate = len(keys) / (time.perf_counter() - t)
    assert rate > 1000, f"{rate:.0f} items/s"  # ~9000/s measured; loose bound for a shared CI machine


def test_loader_independent_of_worker_count(fmnist):
    ds = build_pretrain_data(DataConfig(limit=48, stats_samples=48)).train
    sampler = SeededSampler(len(ds), seed=3, global_batch=16)

    def batches(workers):
        dl = DataLoader(ds, batch_size=16, sampler=sampler, num_workers=workers)
        return [(b["image"], b["seed"], b["index"]) for b in dl]

    a, b = batches(0), batches(2)
    assert len(a) == 3
    for (xa, sa, ia), (xb, sb, ib) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(sa, sb) and torch.equal(ia, ib)
