"""data.source=hf: Hugging Face `datasets` built on the fly from real images (save_to_disk folders, local parquet
files for streaming); never the network."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from mimkit.config import ConfigError, DataConfig, load_config
from mimkit.data import DataError, build_labelled, build_pretrain_data
from mimkit.data.build import make_source
from mimkit.data.errors import DataReport
from mimkit.data.images import load_image

datasets = pytest.importorskip("datasets")

N = 40  # 20 CIFAR-10 + 20 CIFAR-100 PNGs, RGB 32x32


@pytest.fixture(scope="module")
def files(real_images_dir):
    out = sorted(real_images_dir.glob("cifar10_*.png")) + sorted(real_images_dir.glob("cifar100_*.png"))
    assert len(out) == N
    return out


def _table(files, corrupt: int | None = None) -> dict:
    images = [{"bytes": f.read_bytes(), "path": f.name} for f in files]
    if corrupt is not None:
        images[corrupt] = {"bytes": files[corrupt].read_bytes()[:200], "path": "truncated.png"}
    return {"image": images, "label": [k % 3 for k in range(len(files))], "note": [f.stem for f in files]}


def _features():
    return datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"]),
                              "note": datasets.Value("string")})


@pytest.fixture(scope="module")
def saved(files, tmp_path_factory):
    """A DatasetDict (train = all 40, test = the first 10) saved with save_to_disk."""
    root = tmp_path_factory.mktemp("hf") / "saved"
    train = datasets.Dataset.from_dict(_table(files), features=_features())
    test = datasets.Dataset.from_dict(_table(files[:10]), features=_features())
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(root))
    return root


@pytest.fixture(scope="module")
def parquet(files, tmp_path_factory):
    """The same 40 rows as 4 parquet files of 10 rows (a stream of 4 shards)."""
    root = tmp_path_factory.mktemp("hf") / "parquet"
    root.mkdir()
    ds = datasets.Dataset.from_dict(_table(files), features=_features())
    for k in range(4):
        ds.select(range(10 * k, 10 * k + 10)).to_parquet(str(root / f"train-{k:05d}-of-00004.parquet"))
    return root


def _cfg(**kw) -> DataConfig:
    kw.setdefault("img_size", 16)
    kw.setdefault("val_fraction", 0.0)
    kw.setdefault("mean", [0.5] * 3)
    kw.setdefault("std", [0.25] * 3)
    return DataConfig(source="hf", **kw)


def test_saved_dataset_is_read_exactly_like_the_image_files(saved, files):
    src = make_source(_cfg(path=str(saved)), "train", DataReport())
    assert len(src) == N and src.channels == 3 and src.labelled and src.classes == ["a", "b", "c"]
    for i in (0, 7, 25, 39):
        x, y = src.load(i)
        assert torch.equal(x, load_image(files[i], 3)) and y == i % 3
    # forced channel conversion, as for image files
    grey = make_source(_cfg(path=str(saved), channels=1, mean=None, std=None), "train", DataReport())
    assert torch.equal(grey.load(3)[0], load_image(files[3], 1))
    # kNN splits: the official test split when named, else the seeded held-out part of hf_split
    test = build_labelled(_cfg(path=str(saved), hf_test_split="test"), "test", [0.5] * 3, [0.25] * 3)
    assert len(test) == 10 and test.classes == ["a", "b", "c"] and test[4]["label"] == 4 % 3
    held = build_labelled(_cfg(path=str(saved), val_fraction=0.25), "test", [0.5] * 3, [0.25] * 3)
    assert len(held) == 10


def test_arrays_and_pil_images_as_cells(files, tmp_path):
    import numpy as np
    from PIL import Image

    hwc = [np.asarray(Image.open(f).convert("RGB")) for f in files[:4]]
    d = datasets.Dataset.from_dict({"pixels": [a.tolist() for a in hwc], "y": [1, 2, 3, 4]})
    d.save_to_disk(str(tmp_path / "arr"))
    src = make_source(_cfg(path=str(tmp_path / "arr"), hf_image_key="pixels", hf_label_key="y"), "train",
                      DataReport())
    assert src.channels == 3 and src.load(2)[1] == 3
    assert torch.equal(src.load(2)[0], torch.from_numpy(hwc[2].copy()).permute(2, 0, 1))
    pil = datasets.Dataset.from_dict({"img": [Image.open(f).convert("L") for f in files[:3]]})
    pil.save_to_disk(str(tmp_path / "pil"))
    src = make_source(_cfg(path=str(tmp_path / "pil"), mean=None, std=None), "train", DataReport())
    assert src.channels == 1 and not src.labelled and src.load(1)[1] == -1
    assert torch.equal(src.load(1)[0], load_image(files[1], 1))


def test_errors_name_the_field(saved, tmp_path):
    with pytest.raises(DataError, match=r"data.hf_image_key='picture' is not a column .*image \(Image\), "
                                        r"label \(ClassLabel\), note \(Value\)"):
        make_source(_cfg(path=str(saved), hf_image_key="picture"), "train", DataReport())
    with pytest.raises(DataError, match=r"data.hf_label_key='target'.*available columns: image"):
        make_source(_cfg(path=str(saved), hf_label_key="target"), "train", DataReport())
    with pytest.raises(DataError, match=r"data.hf_split='valid'.*available splits: train, test"):
        make_source(_cfg(path=str(saved), hf_split="valid"), "train", DataReport())
    d = datasets.Dataset.from_dict({"a": [1, 2], "b": ["x", "y"]})
    d.save_to_disk(str(tmp_path / "noimg"))
    with pytest.raises(DataError, match=r"data.hf_image_key: .* has no Image column.*: a \(Value\), b \(Value\)"):
        make_source(_cfg(path=str(tmp_path / "noimg")), "train", DataReport())
    with pytest.raises(DataError, match="data.name/data.path"):
        make_source(_cfg(path=str(tmp_path / "missing")), "train", DataReport())
    with pytest.raises(ConfigError, match="source='hf' needs data.name"):
        load_config(None, ["data.source=hf"])
    with pytest.raises(ConfigError, match="data.hf_image_key applies to source='hf' only"):
        load_config(None, ["data.hf_image_key=img"])


def test_bad_rows_follow_on_error(files, tmp_path):
    d = datasets.Dataset.from_dict(_table(files[:8], corrupt=5), features=_features())
    d.save_to_disk(str(tmp_path / "bad"))
    data = build_pretrain_data(_cfg(path=str(tmp_path / "bad"), on_error="skip"), report_dir=tmp_path)
    items = [data.train[i] for i in range(len(data.train))]
    assert len(items) == 8 and data.report.local_errors
    path, reason = next(iter(data.report.local_errors.items()))
    assert path.endswith("[train][5]") and "truncated" in reason.lower()
    strict = build_pretrain_data(_cfg(path=str(tmp_path / "bad")))
    with pytest.raises(DataError, match=r"\[train\]\[5\]"):
        strict.train[5]


# ---------------------------------------------------------------------------------------------- streaming


def _stream_data(parquet, **kw):
    kw.setdefault("val_fraction", 0.1)  # the first 4 examples of the stream
    return build_pretrain_data(_cfg(name="parquet", path=str(parquet), hf_streaming=True, **kw))


def _epoch(train, rank, world, epoch=0, start=0, micro=2, workers=0):
    train.configure(seed=3, rank=rank, world=world, micro=micro, global_batch=8)
    train.set_epoch(epoch, start)
    loader = DataLoader(train, batch_size=micro, num_workers=workers)
    return [it for b in loader for it in zip(b["index"].tolist(), b["seed"].tolist(), b["image"])]


def test_stream_split_val_and_order(parquet, files):
    data = _stream_data(parquet)
    assert len(data.val) == 4 and len(data.train) == 36 and data.channels == 3
    assert torch.equal(data.val.source.load(2)[0], load_image(files[2], 3))  # val = head of the stream
    one = _epoch(data.train, 0, 1)
    assert len(one) == 32  # 4 whole global batches of 8
    # the epoch is shuffled (buffer), each position has the SeededSampler-style seed, every image once
    assert [i for i, _, _ in one] == list(range(32))
    imgs = torch.stack([x for _, _, x in one])
    assert len({x.sum().item() for x in imgs}) == 32
    order1 = [x.sum().item() for _, _, x in _epoch(data.train, 0, 1, epoch=1)]
    assert order1 != [x.sum().item() for x in imgs]
    # two ranks (examples dealt round robin): disjoint, and together exactly the one-process epoch
    r0, r1 = _epoch(data.train, 0, 2), _epoch(data.train, 1, 2)
    assert len(r0) == len(r1) == 16
    merged = sorted(r0 + r1, key=lambda t: t[0])
    assert [(i, s) for i, s, _ in merged] == [(i, s) for i, s, _ in one]
    assert all(torch.equal(a[2], b[2]) for a, b in zip(merged, one))
    # loader workers split a rank's stream by micro-batch: same batches in the same order
    two_workers = _epoch(data.train, 1, 2, workers=2)
    assert [(i, s) for i, s, _ in two_workers] == [(i, s) for i, s, _ in r1]
    assert all(torch.equal(a[2], b[2]) for a, b in zip(two_workers, r1))
    # resume mid-epoch: a rank that consumed 6 examples gets exactly the rest
    tail = _epoch(data.train, 1, 2, start=6)
    assert [(i, s) for i, s, _ in tail] == [(i, s) for i, s, _ in r1[6:]]


def test_stream_split_by_shards(parquet, tmp_path):
    # 4 files of 10, no val: each of 2 ranks reads 2 whole files (20 examples), its share is 20 (2 x 8 + 4
    # would be partial batches: 40 // 8 * 8 / 2 = 20)
    data = _stream_data(parquet, val_fraction=0.0, hf_split_by="shards", hf_shuffle_buffer=0)
    r0, r1 = _epoch(data.train, 0, 2), _epoch(data.train, 1, 2)
    assert len(r0) == len(r1) == 20
    sums0 = {x.sum().item() for _, _, x in r0}
    sums1 = {x.sum().item() for _, _, x in r1}
    assert not sums0 & sums1 and len(sums0 | sums1) == 40
    # five ranks cannot each get a whole one of 4 files: datasets refuses, and the error names the field
    with pytest.raises(DataError, match="data.hf_split_by='shards'"):
        _epoch(data.train, 0, 5, micro=1)
    # shards of unequal size (16, 8, 12, 4): whichever way datasets deals them, one rank's files hold fewer than
    # its 20 examples of the epoch; that rank stops with an error instead of desynchronising the others
    uneven = tmp_path / "uneven"
    uneven.mkdir()
    full = datasets.concatenate_datasets([datasets.Dataset.from_parquet(str(p)) for p in sorted(parquet.iterdir())])
    start = 0
    for k, size in enumerate([16, 8, 12, 4]):
        full.select(range(start, start + size)).to_parquet(str(uneven / f"train-{k:05d}-of-00004.parquet"))
        start += size
    data = _stream_data(uneven, val_fraction=0.0, hf_split_by="shards", hf_shuffle_buffer=0)
    errors = []
    for rank in (0, 1):
        try:
            _epoch(data.train, rank, 2)
        except DataError as err:
            errors.append(str(err))
    assert len(errors) == 1 and "fewer than its share 20" in errors[0] and "hf_split_by=examples" in errors[0]


def test_streaming_pretraining_resumes_exactly(parquet, tmp_path):
    """The trainer on a stream: a run stopped mid-epoch and resumed ends bit for bit where the uninterrupted
    run ends (the stream is re-read, a rank skips what it consumed)."""
    from mimkit.engine import train

    base = [f"trainer.out_dir={tmp_path}", "trainer.accelerator=cpu", "trainer.progress=false",
            "data.source=hf", "data.name=parquet", f"data.path={parquet}", "data.hf_streaming=true",
            "data.img_size=16", "data.val_fraction=0.1", "data.num_workers=0", "data.mean=[0.5,0.5,0.5]",
            "data.std=[0.25,0.25,0.25]", "model.encoder=vit_tiny", "model.depth=1", "model.patch_size=4",
            "model.decoder=tiny", "optim.batch_size=8", "optim.lr=1e-3", "optim.max_steps=7",
            "eval.knn=false", "eval.visualize=false", "eval.recon_every_epochs=0"]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = train(load_config(None, base + ["trainer.run_name=ref"]))
        stopped = train(load_config(None, base + ["trainer.run_name=cut", "trainer.stop_after_steps=2"]))
        assert stopped.metrics["global_step"] == 2
        resumed = train(load_config(None, base + ["trainer.run_name=cut"]), resume="auto")
    finally:
        torch.set_num_threads(n)
    assert ref.metrics["global_step"] == resumed.metrics["global_step"] == 7  # 4 steps/epoch: crosses epoch 1
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in ref.history][2:]
    a, b = ref.method.state_dict(), resumed.method.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.metrics["val_loss"] == ref.metrics["val_loss"]
