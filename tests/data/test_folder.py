import json
import pickle
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mimkit.config import DataConfig
from mimkit.data import DataError, SeededSampler, build_labelled, build_pretrain_data
from mimkit.data.images import load_image, probe_image

tifffile = pytest.importorskip("tifffile")


def _cfg(path, **kw):
    kw.setdefault("source", "folder")
    kw.setdefault("img_size", 32)
    kw.setdefault("val_fraction", 0.0)
    return DataConfig(path=str(path), **kw)


@pytest.fixture
def real_folder(real_images_dir, tmp_path):
    """CIFAR-10 and ImageNet sample images in nested folders (no class structure needed)."""
    root = tmp_path / "imgs"
    (root / "x" / "deep").mkdir(parents=True)
    (root / "y").mkdir()
    for f in sorted(real_images_dir.glob("cifar10_0*.png")):
        shutil.copy(f, root / "x" / f.name)
    for f in sorted(real_images_dir.glob("imagenet_0[0-4]*.jpg")):
        shutil.copy(f, root / "x" / "deep" / f.name)
    for f in sorted(real_images_dir.glob("cifar100_0[0-4]*.png")):
        shutil.copy(f, root / "y" / f.name)
    return root


def test_folder_recursive_rgb(real_folder):
    d = build_pretrain_data(_cfg(real_folder, val_fraction=0.2, img_size=(24, 40)))
    assert d.channels == 3 and d.img_size == (24, 40)
    assert len(d.train) + len(d.val) == 20 and len(d.val) == 4
    assert d.report.unreadable == [] and d.report.usable == 20
    item = d.train[(3, 77)]
    assert item["image"].shape == (3, 24, 40) and item["label"] == -1
    assert d.val[0]["image"].shape == (3, 24, 40)
    assert torch.equal(d.train[(3, 77)]["image"], item["image"])
    # picklable for spawn-started workers
    again = pickle.loads(pickle.dumps(d.train))
    assert torch.equal(again[(3, 77)]["image"], item["image"])


def test_imagefolder_labels_and_held_out_test(real_images_dir, tmp_path):
    root = tmp_path / "classes"
    for k, pattern in enumerate(["cifar10_0*.png", "imagenet_0*.jpg"]):
        (root / f"c{k}").mkdir(parents=True)
        for f in sorted(real_images_dir.glob(pattern)):
            shutil.copy(f, root / f"c{k}" / f.name)
    cfg = _cfg(root, source="imagefolder", val_fraction=0.25)
    d = build_pretrain_data(cfg)
    labels = {d.train[i]["label"] for i in range(len(d.train))}
    assert labels == {0, 1}
    train = build_labelled(cfg, "train", d.mean, d.std)
    test = build_labelled(cfg, "test", d.mean, d.std)
    assert train.classes == ["c0", "c1"]
    assert sorted(train.source_indices) == d.train.source_indices
    assert sorted(test.source_indices) == d.val.source_indices and len(test) == 5
    with pytest.raises(DataError, match="class sub-folders"):
        build_pretrain_data(_cfg(root / "c0", source="imagefolder"))
    with pytest.raises(DataError, match="val_fraction"):
        build_labelled(_cfg(root, source="imagefolder"), "test", d.mean, d.std)


def test_multispectral_tiff(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(4):
        arr = rng.integers(0, 65535, size=(6, 20, 30), dtype=np.uint16)  # 6 bands, 16-bit, planar
        tifffile.imwrite(tmp_path / f"s{i}.tif", arr, photometric="minisblack")
    arr = rng.integers(0, 255, size=(20, 30, 6), dtype=np.uint8)  # 6 bands, interleaved, 8-bit
    tifffile.imwrite(tmp_path / "s9.tiff", arr, photometric="minisblack", planarconfig="contig")
    assert probe_image(tmp_path / "s0.tif").channels == 6
    x = load_image(tmp_path / "s0.tif", None)
    ref = tifffile.imread(tmp_path / "s0.tif").astype(np.float32) / 65535
    assert x.shape == (6, 20, 30) and torch.allclose(x, torch.from_numpy(ref))
    x9 = load_image(tmp_path / "s9.tiff", None)
    assert x9.dtype == torch.uint8 and torch.equal(x9, torch.from_numpy(arr).permute(2, 0, 1))
    d = build_pretrain_data(_cfg(tmp_path, img_size=(16, 24)))
    assert d.channels == 6 and len(d.mean) == 6
    assert d.train[(0, 1)]["image"].shape == (6, 16, 24)
    with pytest.raises(DataError, match="6 channel"):
        build_pretrain_data(_cfg(tmp_path, channels=3))


def test_16bit_palette_cmyk_rgba_la_conversions(tmp_path):
    g16 = (np.arange(20 * 30, dtype=np.uint16).reshape(20, 30) * 100)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    x = load_image(tmp_path / "g16.png", None)
    assert x.shape == (1, 20, 30) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.from_numpy(g16.astype(np.float32) / 65535), atol=1e-6)
    tifffile.imwrite(tmp_path / "rgb16.tif", np.full((8, 8, 3), 65535, np.uint16), photometric="rgb")
    assert torch.allclose(load_image(tmp_path / "rgb16.tif", None), torch.ones(3, 8, 8))

    rgb = np.zeros((10, 12, 3), np.uint8)
    rgb[..., 0] = 200
    rgb[..., 2] = 50
    Image.fromarray(rgb).convert("P").save(tmp_path / "pal.png")
    p = load_image(tmp_path / "pal.png", None)
    assert p.shape == (3, 10, 12) and abs(int(p[0, 0, 0]) - 200) <= 8

    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    c = load_image(tmp_path / "cmyk.jpg", None)
    assert c.shape == (3, 10, 12) and abs(int(c[0, 5, 5]) - 200) <= 12 and int(c[1, 5, 5]) <= 12

    rgba = np.dstack([rgb, np.full((10, 12), 7, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    a = load_image(tmp_path / "rgba.png", None)
    assert torch.equal(a, torch.from_numpy(rgb).permute(2, 0, 1))  # alpha dropped, colour kept
    lum = load_image(tmp_path / "rgba.png", 1)
    assert lum.shape == (1, 10, 12) and abs(int(lum[0, 0, 0]) - round(0.299 * 200 + 0.114 * 50)) <= 1

    Image.fromarray(np.full((10, 12), 90, np.uint8)).convert("LA").save(tmp_path / "la.png")
    la = load_image(tmp_path / "la.png", None)
    assert la.shape == (1, 10, 12) and int(la[0, 0, 0]) == 90
    rep = load_image(tmp_path / "la.png", 3)
    assert rep.shape == (3, 10, 12) and torch.equal(rep[0], rep[2])


def test_channel_mismatch_names_file_and_counts(real_images_dir, tmp_path):
    shutil.copy(real_images_dir / "cifar10_00_3.png", tmp_path / "a.png")
    shutil.copy(real_images_dir / "mnist_00_7.png", tmp_path / "b.png")
    d = build_pretrain_data(_cfg(tmp_path, on_error="skip"))  # one each: a tie goes to the larger count
    assert d.channels == 3 and d.report.notes[0].startswith("converted 1 grey-scale image(s) to 3 channel(s)")
    tifffile.imwrite(tmp_path / "c.tif", np.zeros((6, 8, 8), np.uint8), photometric="minisblack")
    shutil.copy(real_images_dir / "cifar10_01_8.png", tmp_path / "a2.png")
    with pytest.raises(DataError) as e:
        build_pretrain_data(_cfg(tmp_path, on_error="skip"))
    msg = str(e.value)
    assert "c.tif" in msg and "6 channel" in msg and "2 of the 4 images have 3" in msg
    (tmp_path / "c.tif").unlink()
    (tmp_path / "a2.png").unlink()
    d = build_pretrain_data(_cfg(tmp_path, channels=1))
    assert d.channels == 1 and d.train[0]["image"].shape == (1, 32, 32)
    d3 = build_pretrain_data(_cfg(tmp_path, channels=3))
    assert d3.train[1]["image"].shape == (3, 32, 32)


@pytest.fixture
def broken_folder(real_images_dir, tmp_path):
    root = tmp_path / "broken"
    root.mkdir()
    for f in sorted(real_images_dir.glob("imagenet_0*.jpg")):
        shutil.copy(f, root / f.name)
    (root / "garbage.png").write_bytes(np.random.default_rng(1).bytes(500))
    (root / "unknown.bin").write_bytes(b"\x00\x01 not an image")
    data = (real_images_dir / "imagenet_01_559.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (root / "notes.txt").write_text("side file")
    return root


def test_scan_errors_raise_with_path(broken_folder):
    with pytest.raises(DataError) as e:
        build_pretrain_data(_cfg(broken_folder))
    msg = str(e.value)
    assert "garbage.png" in msg and "unknown.bin" in msg and "on_error" in msg
    assert "2 of 14 files" in msg  # 10 good + truncated (header fine) + garbage + unknown + notes.txt


def test_hidden_files_are_reported_not_read(real_images_dir, tmp_path):
    shutil.copy(real_images_dir / "cifar10_00_3.png", tmp_path / "a.png")
    (tmp_path / ".DS_Store").write_bytes(b"junk")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "x.png").write_bytes(b"junk")
    d = build_pretrain_data(_cfg(tmp_path))
    assert len(d.train) == 1
    assert sorted(r for _, r in d.report.ignored) == ["hidden directory (not scanned)", "hidden file"]


def test_truncated_multiband_tiff_both_policies(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        tifffile.imwrite(tmp_path / f"ok{i}.tif", rng.integers(0, 65535, (20, 30, 5), dtype=np.uint16),
                         photometric="minisblack", planarconfig="contig")
    data = (tmp_path / "ok0.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])  # header intact, pixel data cut
    stack = tmp_path / "stack"
    stack.mkdir()
    pages = rng.integers(0, 65535, (5, 20, 30), dtype=np.uint16)
    tifffile.imwrite(stack / "pages.tif", pages, photometric="minisblack")
    data = (stack / "pages.tif").read_bytes()
    (stack / "pages.tif").write_bytes(data[: len(data) // 2])  # later pages missing: never read partially
    with pytest.raises(DataError, match="pages.tif"):
        load_image(stack / "pages.tif", None)
    with pytest.raises(DataError, match="cut.tif"):
        load_image(tmp_path / "cut.tif", None)
    with pytest.raises(DataError, match="pages.tif"):
        build_pretrain_data(_cfg(tmp_path, mean=[0.5] * 5, std=[0.2] * 5))
    d = build_pretrain_data(_cfg(tmp_path, on_error="skip", mean=[0.5] * 5, std=[0.2] * 5), report_dir=tmp_path / "r")
    assert [p.rsplit("/", 1)[-1] for p, _ in d.report.unreadable] == ["pages.tif"]
    with pytest.warns(RuntimeWarning, match="cut.tif"):
        items = [d.train[i]["image"] for i in range(len(d.train))]
    assert all(x.shape == (5, 32, 32) for x in items)
    assert [p.rsplit("/", 1)[-1] for p, _ in d.report.load_errors()] == ["cut.tif"]


def test_skip_policy_reports_scan_and_load_failures(broken_folder, tmp_path):
    run = tmp_path / "run"
    d = build_pretrain_data(_cfg(broken_folder, on_error="skip", mean=[0.5] * 3, std=[0.25] * 3), report_dir=run)
    bad = {p.rsplit("/", 1)[-1] for p, _ in d.report.unreadable}
    assert bad == {"garbage.png", "unknown.bin"}
    assert [p.rsplit("/", 1)[-1] for p, _ in d.report.ignored] == ["notes.txt"]
    assert len(d.train) == 11  # 10 good + the truncated one (its header is fine)
    trunc = next(i for i, p in enumerate(d.train.source.files) if p.endswith("truncated.jpg"))
    with pytest.warns(RuntimeWarning, match="truncated.jpg"):
        a = d.train[(trunc, 5)]
    b = d.train[(trunc, 5)]
    assert torch.equal(a["image"], b["image"]) and a["index"] == trunc  # deterministic substitute
    # workers in other processes record to the append-only file too
    sampler = SeededSampler(len(d.train), seed=0, shuffle=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n = sum(len(b["index"]) for b in DataLoader(d.train, batch_size=4, sampler=sampler, num_workers=2))
    assert n == 11
    errors = d.report.load_errors()
    assert len(errors) == 1 and errors[0][0].endswith("truncated.jpg")
    out = d.report.write(run)
    rep = json.loads(out.read_text())
    assert rep["unreadable_count"] == 2 and rep["load_error_count"] == 1 and rep["ignored_count"] == 1
    summary = d.report.summary()
    assert "garbage.png" in summary and "truncated.jpg" in summary


def test_error_policy_at_load_time_names_path(broken_folder, tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    shutil.copy(broken_folder / "truncated.jpg", good / "truncated.jpg")
    shutil.copy(broken_folder / "imagenet_00_243.jpg", good / "ok.jpg")
    d = build_pretrain_data(_cfg(good, mean=[0.5] * 3, std=[0.25] * 3))
    trunc = next(i for i, p in enumerate(d.train.source.files) if p.endswith("truncated.jpg"))
    with pytest.raises(DataError, match="truncated.jpg"):
        d.train[trunc]
    with pytest.raises(DataError, match="truncated.jpg"):  # stats computation hits it too
        build_pretrain_data(_cfg(good))


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        build_pretrain_data(_cfg(tmp_path / "missing"))
    (tmp_path / "e").mkdir()
    with pytest.raises(DataError, match="no files"):
        build_pretrain_data(_cfg(tmp_path / "e"))


def test_skip_without_report_dir_keeps_errors_in_memory_and_warns_once(broken_folder, tmp_path):
    good = tmp_path / "good2"
    good.mkdir()
    shutil.copy(broken_folder / "truncated.jpg", good / "zz_truncated.jpg")
    for name in ("imagenet_00_243.jpg", "imagenet_02_438.jpg"):
        shutil.copy(broken_folder / name, good / name)
    with pytest.warns(RuntimeWarning, match="zz_truncated.jpg"):
        d = build_pretrain_data(_cfg(good, on_error="skip"))  # the stats pass hits the truncated file
    assert len(d.train) == 3
    assert [p.rsplit("/", 1)[-1] for p, _ in d.report.load_errors()] == ["zz_truncated.jpg"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # already warned once for this file: no second warning
        assert d.train[2]["image"].shape == (3, 32, 32)
    assert "zz_truncated.jpg" in d.report.summary()
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(broken_folder / "truncated.jpg", single / "only.jpg")
    with pytest.raises(DataError, match="only.jpg"), pytest.warns(RuntimeWarning, match="only.jpg"):
        build_pretrain_data(_cfg(single, on_error="skip"))


def test_single_usable_image_says_what_is_wrong(real_images_dir, tmp_path):
    """The only scan-passing file fails to decode: its own error, not a data.val_fraction message."""
    good = real_images_dir / "cifar10_00_3.png"
    (tmp_path / "trunc.png").write_bytes(good.read_bytes()[:300])  # header intact, pixel data cut
    assert probe_image(tmp_path / "trunc.png").channels == 3
    with pytest.raises(DataError) as e:
        build_pretrain_data(_cfg(tmp_path, val_fraction=0.05))
    msg = str(e.value)
    assert "trunc.png" in msg and "truncated" in msg and "only image" in msg and "val_fraction" not in msg
    (tmp_path / "trunc.png").unlink()
    shutil.copy(good, tmp_path / "a.png")
    with pytest.raises(DataError, match=r"only 1 usable image .*a\.png.*set data\.val_fraction=0"):
        build_pretrain_data(_cfg(tmp_path, val_fraction=0.05))
    assert len(build_pretrain_data(_cfg(tmp_path, val_fraction=0.0)).train) == 1
