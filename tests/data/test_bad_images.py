"""Odd and broken image files in a folder source.

Valid but unusual modes (bilevel, 16-bit grey and RGB, CMYK, palette with and without transparency, RGBA, LA)
decode to the configured channel count with the right values; broken files (truncated PNG/JPEG, empty,
random bytes, decompression bombs, NaN floats) follow data.on_error: "error" raises a DataError naming the
file, "skip" leaves them out and lists them, with the reason, in the data report.
"""

from __future__ import annotations

import json
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from mimkit.config import DataConfig
from mimkit.data import DataError, build_pretrain_data
from mimkit.data.images import MAX_IMAGE_PIXELS, load_image, probe_image

tifffile = pytest.importorskip("tifffile")


def _cfg(path, **kw):
    kw.setdefault("source", "folder")
    kw.setdefault("img_size", 12)
    kw.setdefault("val_fraction", 0.0)
    return DataConfig(path=str(path), **kw)


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, rows=None, idat: bytes | None = None) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit RGB, nor headers that lie): `rows` are raw scanlines
    (filter byte 0 is added), or `idat` is the compressed stream as is."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    if idat is None:
        idat = zlib.compress(b"".join(b"\x00" + r for r in rows))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def zero_bomb(width: int, height: int) -> bytes:
    """A real decompression bomb: a valid 8-bit grey PNG of zeros, about 1000x smaller than its pixels."""
    c = zlib.compressobj(9)
    row = bytes(width + 1)
    idat = b"".join(c.compress(row) for _ in range(height)) + c.flush()
    return png_bytes(width, height, 8, 0, idat=idat)


RGB = np.zeros((6, 8, 3), np.uint8)
RGB[..., 0], RGB[..., 1], RGB[..., 2] = 200, 30, 50
RGB[:, 4:] = (10, 220, 90)


# ------------------------------------------------------------------------------------------ valid modes


def test_bilevel_and_16bit_grey_scale_properly(tmp_path):
    bits = (np.indices((6, 8)).sum(0) % 2).astype(bool)
    Image.fromarray(bits).save(tmp_path / "bw.png")
    assert Image.open(tmp_path / "bw.png").mode == "1"
    x = load_image(tmp_path / "bw.png", None)
    assert x.dtype == torch.uint8 and x.shape == (1, 6, 8)
    assert torch.equal(x[0], torch.from_numpy(bits.astype(np.uint8) * 255))

    g16 = np.array([[0, 255, 256, 4095], [32768, 60000, 65534, 65535]], np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    x = load_image(tmp_path / "g16.png", 3)  # replicated to 3 channels, scaled by 65535 (not clipped at 255)
    assert x.dtype == torch.float32 and x.shape == (3, 2, 4) and torch.equal(x[0], x[2])
    assert torch.allclose(x[0], torch.from_numpy(g16.astype(np.float32) / 65535), atol=1e-6)
    assert len(torch.unique(x[0])) == 8 and float(x.max()) == 1.0


def test_16bit_rgb_png_is_scaled_not_clipped(tmp_path):
    arr = np.zeros((2, 3, 3), np.uint16)
    arr[0] = [(0x8000, 0x0100, 0xFFFF)] * 3
    arr[1] = [(0x00FF, 0x4000, 0xC000)] * 3
    (tmp_path / "rgb48.png").write_bytes(png_bytes(3, 2, 16, 2, rows=[r.astype(">u2").tobytes() for r in arr]))
    x = load_image(tmp_path / "rgb48.png", None)
    assert x.shape == (3, 2, 3)
    expect = torch.from_numpy((arr >> 8).astype(np.uint8)).permute(2, 0, 1)  # high byte: value / 257
    got = x if x.dtype == torch.uint8 else (x * 255).round().to(torch.uint8)
    assert (got.int() - expect.int()).abs().max() <= 1, got


def test_palette_cmyk_and_alpha_modes(tmp_path):
    # palette without and with a transparent index: the palette's colours, alpha dropped
    pal = Image.fromarray(RGB).quantize(colors=4)
    pal.save(tmp_path / "pal.png")
    pal.save(tmp_path / "pal_t.png", transparency=int(np.asarray(pal)[0, 0]))
    assert "transparency" in Image.open(tmp_path / "pal_t.png").info
    for name in ("pal.png", "pal_t.png"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # Pillow's "palette with transparency" warning is handled
            x = load_image(tmp_path / name, None)
        assert x.shape == (3, 6, 8) and torch.equal(x, torch.from_numpy(RGB).permute(2, 0, 1)), name
        grey = load_image(tmp_path / name, 1)
        assert abs(int(grey[0, 0, 0]) - round(0.299 * 200 + 0.587 * 30 + 0.114 * 50)) <= 1

    Image.fromarray(RGB).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    x = load_image(tmp_path / "cmyk.jpg", None)
    assert x.shape == (3, 6, 8) and (x[:, 2, 1].int() - torch.tensor([200, 30, 50])).abs().max() <= 12
    assert (x[:, 2, 6].int() - torch.tensor([10, 220, 90])).abs().max() <= 12

    # RGBA / LA with a fully transparent area: dropped, not composited (the stored colour stays)
    alpha = np.full((6, 8), 255, np.uint8)
    alpha[:, :2] = 0
    Image.fromarray(np.dstack([RGB, alpha])).save(tmp_path / "rgba.png")
    assert torch.equal(load_image(tmp_path / "rgba.png", None), torch.from_numpy(RGB).permute(2, 0, 1))
    Image.fromarray(np.dstack([RGB[..., 1], alpha])).save(tmp_path / "la.png")
    la = load_image(tmp_path / "la.png", None)
    assert la.shape == (1, 6, 8) and torch.equal(la[0], torch.from_numpy(RGB[..., 1]))


def test_folder_of_every_mode_builds_with_forced_channels(tmp_path):
    Image.fromarray(RGB).save(tmp_path / "a_rgb.png")
    Image.fromarray(RGB).convert("CMYK").save(tmp_path / "b_cmyk.jpg")
    Image.fromarray(RGB).quantize(colors=4).save(tmp_path / "c_pal.png", transparency=0)
    Image.fromarray(np.dstack([RGB, RGB[..., :1]])).save(tmp_path / "d_rgba.png")
    Image.fromarray(RGB[..., 0]).convert("LA").save(tmp_path / "e_la.png")
    Image.fromarray(RGB[..., 0] > 100).save(tmp_path / "f_bw.png")
    Image.fromarray(RGB[..., 0].astype(np.uint16) * 257).save(tmp_path / "g_g16.png")
    d = build_pretrain_data(_cfg(tmp_path))  # 4 colour, 3 grey-scale: the usual count (3) wins, one note says so
    assert d.channels == 3 and d.report.notes == [
        "converted 3 grey-scale image(s) to 3 channel(s), the folder's usual count (4 of 7 images); "
        "set data.channels to choose"]
    for channels in (1, 3):
        d = build_pretrain_data(_cfg(tmp_path, channels=channels))
        assert d.report.ok and d.report.usable == 7 and d.channels == channels
        items = [d.train[i]["image"] for i in range(7)]
        assert all(x.shape == (channels, 12, 12) and bool(x.isfinite().all()) for x in items)
    # the 16-bit file equals the 8-bit one (v * 257 / 65535 == v / 255) after normalization
    d = build_pretrain_data(_cfg(tmp_path, channels=1, mean=[0.5], std=[0.25]))
    files = [p.rsplit("/", 1)[-1] for p in d.train.source.files]
    g16, la = d.val.transform(d.train.source.load(files.index("g_g16.png"))[0], 0), \
        d.val.transform(d.train.source.load(files.index("e_la.png"))[0], 0)
    assert torch.allclose(g16, la, atol=1e-5)


# ------------------------------------------------------------------------------------------ broken files


@pytest.fixture
def broken(tmp_path):
    """4 good RGB PNGs and one broken file of each kind; `stage` says when each is found."""
    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)).save(root / f"ok{i}.png")
    png = (root / "ok0.png").read_bytes()
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / "tmp.jpg", quality=90)
    jpg = (root / "tmp.jpg").read_bytes()
    (root / "tmp.jpg").unlink()
    files = {
        "cut_png.png": (png[: len(png) // 2], "load"),  # header intact, pixel data cut
        "cut_jpg.jpg": (jpg[: len(jpg) // 2], "load"),
        "empty.png": (b"", "scan"),
        "noise.jpg": (rng.bytes(400), "scan"),
        "bomb_header.png": (png_bytes(30000, 30000, 8, 0, idat=zlib.compress(b"\x00" * 30001)), "scan"),
        "bomb_zeros.png": (zero_bomb(10000, 10000), "scan"),  # 100 Mpx: over mimkit's limit, under Pillow's error
        "nan.tif": (None, "load"),
    }
    for name, (data, _) in files.items():
        if data is not None:
            (root / name).write_bytes(data)
    nan = np.full((10, 14, 3), 0.5, np.float32)
    nan[3, 4, 1] = np.nan
    tifffile.imwrite(root / "nan.tif", nan, photometric="rgb")
    return root, {k: stage for k, (_, stage) in files.items()}


REASONS = {
    "cut_png.png": "truncated|broken|Error",
    "cut_jpg.jpg": "truncated|Error",
    "empty.png": "empty file",
    "noise.jpg": "cannot identify|Unidentified",
    "bomb_header.png": "decompression",
    "bomb_zeros.png": "10000x10000 = 100,000,000 pixels exceeds the limit of 89,478,485",
    "nan.tif": "NaN or infinite",
}


def test_every_broken_file_is_an_error_naming_it(broken):
    root, stages = broken
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        for name, stage in stages.items():
            calls = [lambda p: load_image(p, 3), lambda p: load_image(p, None)]
            if stage == "scan":
                calls.append(probe_image)
            else:
                probe_image(root / name)  # the header is fine: found only when decoded
            for call in calls:
                with pytest.raises(DataError) as err:
                    call(root / name)
                msg = str(err.value)
                assert str(root / name) in msg, msg
                assert any(r in msg for r in REASONS[name].split("|")), msg


def test_on_error_policies_over_a_folder(broken, tmp_path):
    root, stages = broken
    scan = sorted(n for n, s in stages.items() if s == "scan")
    load = sorted(n for n, s in stages.items() if s == "load")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(DataError) as err:
            build_pretrain_data(_cfg(root, channels=3, mean=[0.5] * 3, std=[0.2] * 3))
        msg = str(err.value)
        assert all(str(root / n) in msg for n in scan) and "on_error" in msg

        run = tmp_path / "run"
        d = build_pretrain_data(_cfg(root, channels=3, on_error="skip", mean=[0.5] * 3, std=[0.2] * 3),
                                report_dir=run)
        with pytest.warns(RuntimeWarning):
            items = [d.train[i]["image"] for i in range(len(d.train))]
    assert len(items) == 4 + len(load) and all(x.shape == (3, 12, 12) and bool(x.isfinite().all()) for x in items)
    report = json.loads(d.report.write(run).read_text())
    assert sorted(e["path"].rsplit("/", 1)[-1] for e in report["unreadable"]) == scan
    assert sorted(e["path"].rsplit("/", 1)[-1] for e in report["load_errors"]) == load
    for e in report["unreadable"] + report["load_errors"]:
        name = e["path"].rsplit("/", 1)[-1]
        assert e["path"] == str(root / name)
        assert any(r in e["reason"] for r in REASONS[name].split("|")), e

    # the error policy at load time (headers fine, data not) names the file too
    for name in load:
        folder = tmp_path / f"only_{name}"
        folder.mkdir()
        (folder / "ok.png").write_bytes((root / "ok0.png").read_bytes())
        (folder / name).write_bytes((root / name).read_bytes())
        d = build_pretrain_data(_cfg(folder, channels=3, mean=[0.5] * 3, std=[0.2] * 3))
        bad = [p.rsplit("/", 1)[-1] for p in d.train.source.files].index(name)
        assert len(d.train) == 2 and d.train[1 - bad]["image"].shape == (3, 12, 12)
        with pytest.raises(DataError, match=name.replace(".", r"\.")):
            d.train[bad]
        with pytest.raises(DataError, match=name.replace(".", r"\.")):  # the stats pass meets it first
            build_pretrain_data(_cfg(folder, channels=3))


def test_bomb_is_refused_from_its_header_without_decoding(broken, monkeypatch):
    root, _ = broken

    def decode(self, *a, **k):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", decode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        for name in ("bomb_zeros.png", "bomb_header.png"):
            with pytest.raises(DataError) as err:
                load_image(root / name, None)
            assert "decoded" not in str(err.value) and "decompression-bomb guard" in str(err.value)


def test_limits_are_configurable_and_cover_tiff_bands(tmp_path, monkeypatch):
    Image.fromarray(RGB).save(tmp_path / "small.png")
    monkeypatch.setenv("MIMKIT_MAX_IMAGE_PIXELS", "47")
    with pytest.raises(DataError, match=r"8x6 = 48 pixels exceeds the limit of 47 pixels.*MIMKIT_MAX_IMAGE_PIXELS"):
        probe_image(tmp_path / "small.png")
    monkeypatch.setenv("MIMKIT_MAX_IMAGE_PIXELS", "48")
    assert probe_image(tmp_path / "small.png").size == (6, 8)
    monkeypatch.delenv("MIMKIT_MAX_IMAGE_PIXELS")
    assert MAX_IMAGE_PIXELS == Image.MAX_IMAGE_PIXELS == 89_478_485  # mimkit's default is Pillow's

    # many bands: the decoded size counts every band and the bit depth
    tifffile.imwrite(tmp_path / "bands.tif", np.zeros((40, 8, 8), np.uint16), photometric="minisblack")
    monkeypatch.setenv("MIMKIT_MAX_IMAGE_BYTES", str(40 * 64 * 2 - 1))
    with pytest.raises(DataError, match=r"bands\.tif.*5,120 bytes.*MIMKIT_MAX_IMAGE_BYTES"):
        load_image(tmp_path / "bands.tif", None)
    monkeypatch.delenv("MIMKIT_MAX_IMAGE_BYTES")
    assert load_image(tmp_path / "bands.tif", None).shape == (40, 8, 8)

    # a TIFF header that claims 30000 x 30000 x 8 bands (14 GB): refused at scan time, never allocated
    tifffile.imwrite(tmp_path / "huge.tif", np.zeros((8, 4, 4), np.uint16), photometric="minisblack")
    with tifffile.TiffFile(tmp_path / "huge.tif", mode="r+b") as tf:
        for page in tf.pages:
            page.tags["ImageWidth"].overwrite(30000)
            page.tags["ImageLength"].overwrite(30000)
    with pytest.raises(DataError, match=r"huge\.tif.*30000x30000 = 900,000,000 pixels exceeds"):
        probe_image(tmp_path / "huge.tif")
    with pytest.raises(DataError, match=r"huge\.tif.*exceeds"):
        load_image(tmp_path / "huge.tif", None)
    monkeypatch.setenv("MIMKIT_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(DataError, match="MIMKIT_MAX_IMAGE_PIXELS='lots' is not a number"):
        probe_image(tmp_path / "small.png")


def test_error_raised_in_a_loader_worker_prints_as_its_own_message():
    """torch re-raises a worker's DataError with the worker traceback as its message: str() is the cause."""
    from torch.utils.data import DataLoader, Dataset

    from mimkit.data.errors import ChannelMismatchError

    class Failing(Dataset):
        def __init__(self, error):
            self.error = error

        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise self.error

    for err in (DataError("cannot decode image /x/y.png: OSError: truncated\n  second line"),
                ChannelMismatchError("/x/z.png has 4 channel(s)")):
        with pytest.raises(type(err)) as caught:
            next(iter(DataLoader(Failing(err), num_workers=1)))
        assert "Traceback" in caught.value.args[0]  # what torch hands back
        assert str(caught.value) == f"{err.args[0]} (in DataLoader worker 0)"
    assert str(DataError("plain")) == "plain"
