import json
import shutil
import tarfile

import pytest
import torch
from torch.utils.data import DataLoader

from mimkit.cli import main
from mimkit.config import DataConfig
from mimkit.data import DataError, SeededSampler, build_labelled, build_pretrain_data
from mimkit.data.build import make_source
from mimkit.data.errors import DataReport
from mimkit.data.shards import INDEX_FILE, ShardSource, write_shards


@pytest.fixture
def class_folder(real_images_dir, tmp_path):
    """Two class sub-folders of real images (RGB CIFAR-10 PNGs and ImageNet JPEGs)."""
    root = tmp_path / "classes"
    for k, pattern in enumerate(["cifar10_0*.png", "imagenet_0[0-4]*.jpg"]):
        (root / f"c{k}").mkdir(parents=True)
        for f in sorted(real_images_dir.glob(pattern)):
            shutil.copy(f, root / f"c{k}" / f.name)
    return root


def _cfg(path, source, **kw):
    kw.setdefault("img_size", 32)
    kw.setdefault("val_fraction", 0.0)
    return DataConfig(source=source, path=str(path), **kw)


def test_shards_match_folder_source_exactly(class_folder, tmp_path):
    out = tmp_path / "shards"
    index = write_shards(class_folder, out, shard_size=4)
    n = 15  # 10 CIFAR-10 + 5 ImageNet
    assert index["count"] == n and index["classes"] == ["c0", "c1"]
    assert sorted(p.name for p in out.glob("*.tar")) == [f"shard-{k:06d}.tar" for k in range(4)]
    assert [len(s["members"]) for s in index["shards"]] == [4, 4, 4, 3]
    folder = make_source(_cfg(class_folder, "imagefolder"), "train", DataReport())
    shards = make_source(_cfg(out, "shards"), "train", DataReport())
    assert len(shards) == len(folder) == n and shards.channels == folder.channels == 3 and shards.labelled
    for i in range(n):
        a, la = folder.load(i)
        b, lb = shards.load(i)
        assert la == lb and a.dtype == b.dtype and torch.equal(a, b), i
    # standard tar readers see <key>.<ext> + <key>.cls, in order, with the original bytes
    with tarfile.open(out / "shard-000000.tar") as tar:
        names = tar.getnames()
        assert names[:2] == ["000000000.png", "000000000.cls"] and len(names) == 8
        assert tar.extractfile("000000000.cls").read() == b"0"
        assert tar.extractfile("000000000.png").read() == sorted((class_folder / "c0").iterdir())[0].read_bytes()
    with tarfile.open(out / "shard-000003.tar") as tar:
        assert tar.getnames()[-2:] == ["000000014.jpg", "000000014.cls"]
        assert tar.extractfile("000000014.cls").read() == b"1"
    # without index.json the index is rebuilt from the tar headers: same images
    (out / INDEX_FILE).unlink()
    scanned = ShardSource(out)
    assert len(scanned) == n and scanned.labelled
    for i in (0, 7, 14):
        assert torch.equal(scanned.load(i)[0], folder.load(i)[0]) and scanned.load(i)[1] == folder.load(i)[1]


def test_shard_writing_is_deterministic_and_labelled_splits(class_folder, tmp_path):
    write_shards(class_folder, tmp_path / "a", shard_size=6)
    write_shards(class_folder, tmp_path / "b", shard_size=6)
    for k in range(3):
        name = f"shard-{k:06d}.tar"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    with pytest.raises(DataError, match="already holds shards"):
        write_shards(class_folder, tmp_path / "a", shard_size=6)
    # labelled evaluation splits follow imagefolder's seeded split
    kw = dict(val_fraction=0.2)
    for split in ("train", "test"):
        s = build_labelled(_cfg(tmp_path / "a", "shards", **kw), split, [0.5] * 3, [0.25] * 3)
        f = build_labelled(_cfg(class_folder, "imagefolder", **kw), split, [0.5] * 3, [0.25] * 3)
        assert s.source_indices == f.source_indices and len(s) == (12 if split == "train" else 3)
        assert torch.equal(s[1]["image"], f[1]["image"]) and s[1]["label"] == f[1]["label"]


def test_workers_and_ranks_read_every_sample_once(class_folder, tmp_path):
    write_shards(class_folder, tmp_path / "s", shard_size=4, recursive=True)
    data = build_pretrain_data(_cfg(tmp_path / "s", "shards", mean=[0.5] * 3, std=[0.25] * 3))
    assert not data.train.source.labelled and data.train[0]["label"] == -1
    seen = []
    for rank in range(2):
        sampler = SeededSampler(len(data.train), seed=3, rank=rank, world_size=2, drop_last=False)
        sampler.set_epoch(1)
        loader = DataLoader(data.train, batch_size=4, sampler=sampler, num_workers=2)
        for batch in loader:
            seen += batch["index"].tolist()
            ref = torch.stack([data.train[(int(i), int(s))]["image"] for i, s in zip(batch["index"], batch["seed"])])
            assert torch.equal(batch["image"], ref)  # forked workers reopen their own shard descriptors
    assert sorted(seen) == list(range(15))


def test_cli_reports_unreadable_and_trains_from_shards(class_folder, tmp_path, capsys):
    (class_folder / "c1" / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "shards"
    assert main(["data", "shard", str(class_folder), str(out), "--shard-size", "8"]) == 0
    cap = capsys.readouterr()
    assert "wrote 15 images into 2 shard(s)" in cap.out
    assert "broken.png" in cap.err and "UnidentifiedImageError" in cap.err
    index = json.loads((out / INDEX_FILE).read_text())
    assert [u["path"] for u in index["unreadable"]] == [str(class_folder / "c1" / "broken.png")]
    rc = main(["pretrain", "data.source=shards", f"data.path={out}", "data.img_size=16", "data.num_workers=0",
               "data.val_fraction=0.2", "model.encoder=vit_tiny", "model.depth=1", "model.patch_size=4",
               "model.decoder=tiny", "optim.batch_size=4", "optim.max_steps=2", "trainer.accelerator=cpu",
               "trainer.devices=1", "trainer.progress=false", f"trainer.out_dir={tmp_path / 'runs'}",
               "trainer.run_name=r", "eval.knn=false", "eval.visualize=false"])
    assert rc == 0
    results = json.loads((tmp_path / "runs" / "r" / "results.json").read_text())
    assert results["global_step"] == 2 and results["loss"] == results["loss"]  # finite, not NaN
    assert json.loads((tmp_path / "runs" / "r" / "data_report.json").read_text())["source"] == "shards"
    assert (tmp_path / "runs" / "r" / "checkpoints" / "last.ckpt").is_file()


def test_truncated_shard_is_a_data_error_naming_it(class_folder, tmp_path):
    out = tmp_path / "s"
    write_shards(class_folder, out, shard_size=8)
    victim = out / "shard-000001.tar"
    victim.write_bytes(victim.read_bytes()[:3000])
    with pytest.raises(DataError, match="shard-000001.tar is truncated"):
        ShardSource(out)
    (out / INDEX_FILE).unlink()  # no index: scanning the tar headers meets the cut
    with pytest.raises(DataError, match="shard-000001.tar"):
        ShardSource(out)


def test_corrupt_member_is_named_and_skipped_like_a_bad_file(class_folder, tmp_path):
    out = tmp_path / "s"
    index = write_shards(class_folder, out, shard_size=8)
    m = index["shards"][0]["members"][2]  # a CIFAR-10 PNG: cut its data short inside the tar
    raw = bytearray((out / "shard-000000.tar").read_bytes())
    raw[m["offset"] + 40: m["offset"] + m["size"]] = bytes(m["size"] - 40)
    (out / "shard-000000.tar").write_bytes(bytes(raw))
    src = ShardSource(out)
    with pytest.raises(DataError, match=r"shard-000000\.tar:000000002\.png"):
        src.load(2)
    assert torch.is_tensor(src.load(3)[0])
    kw = dict(mean=[0.5] * 3, std=[0.25] * 3)
    with pytest.raises(DataError, match="000000002.png"):
        build_pretrain_data(_cfg(out, "shards", **kw)).train[2]
    data = build_pretrain_data(_cfg(out, "shards", on_error="skip", **kw), report_dir=tmp_path / "run")
    with pytest.warns(RuntimeWarning, match="000000002.png"):
        item = data.train[2]
    assert item["image"].shape == (3, 32, 32)
    assert [p for p, _ in data.report.load_errors()] == [src.describe(2)]
