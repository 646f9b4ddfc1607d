"""Extra TIFF samples are bands unless marked alpha; compressed multi-band TIFFs; EXIF orientation."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.config import DataConfig
from mimkit.data import DataError, build_pretrain_data
from mimkit.data import images as images_mod
from mimkit.data.images import load_image, probe_image
from mimkit.data.shards import decode_bytes, probe_bytes

tifffile = pytest.importorskip("tifffile")


def _rgbn(seed=0, dtype=np.uint16, h=12, w=10):
    rng = np.random.default_rng(seed)
    top = 65535 if dtype == np.uint16 else 255
    return rng.integers(0, top, size=(h, w, 4), dtype=dtype)  # R, G, B, NIR interleaved


@pytest.mark.parametrize("compression", [None, "zlib", "lzw"])
def test_rgb_plus_nir_keeps_four_bands(tmp_path, compression):
    if compression == "lzw":
        pytest.importorskip("imagecodecs")
    arr = _rgbn()
    path = tmp_path / "rgbn.tif"
    tifffile.imwrite(path, arr, photometric="rgb", extrasamples=[0], compression=compression)  # 0 = unspecified
    assert probe_image(path).channels == 4
    x = load_image(path, None)
    assert x.shape == (4, 12, 10)
    assert torch.allclose(x, torch.from_numpy(arr.transpose(2, 0, 1).astype(np.float32) / 65535))
    data = path.read_bytes()
    assert probe_bytes(data, "tif", "m") == 4 and torch.equal(decode_bytes(data, "tif", None, "m"), x)


def test_alpha_extra_sample_is_dropped_unspecified_kept(tmp_path):
    arr = _rgbn(dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgba.tif", arr, photometric="rgb", extrasamples=[2])  # unassociated alpha
    a = load_image(tmp_path / "rgba.tif", None)
    assert a.shape == (3, 12, 10) and torch.equal(a, torch.from_numpy(arr[..., :3].transpose(2, 0, 1).copy()))
    five = np.concatenate([arr, arr[..., :1]], axis=-1)  # RGB + NIR (unspecified) + alpha (associated)
    tifffile.imwrite(tmp_path / "rgbna.tif", five, photometric="rgb", extrasamples=[0, 1])
    assert probe_image(tmp_path / "rgbna.tif").channels == 4
    assert torch.equal(load_image(tmp_path / "rgbna.tif", None), torch.from_numpy(arr.transpose(2, 0, 1).copy()))
    # a folder of RGB + NIR files trains on 4 channels
    for i in range(3):
        tifffile.imwrite(tmp_path / f"n{i}.tif", _rgbn(i, np.uint8), photometric="rgb", extrasamples=[0])
    (tmp_path / "rgba.tif").unlink()
    (tmp_path / "rgbna.tif").unlink()
    d = build_pretrain_data(DataConfig(source="folder", path=str(tmp_path), img_size=8, val_fraction=0.0))
    assert d.channels == 4 and d.train[0]["image"].shape == (4, 8, 8)


def test_pillow_path_never_drops_a_band(tmp_path, monkeypatch):
    """Without tifffile, Pillow reads an RGB + NIR TIFF as RGB: that must be an error, not 3 channels."""
    tifffile.imwrite(tmp_path / "rgbn.tif", _rgbn(dtype=np.uint8), photometric="rgb", extrasamples=[0])
    rgb = _rgbn(dtype=np.uint8)[..., :3]
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    monkeypatch.setattr(images_mod, "tifffile", None)
    with pytest.raises(DataError, match=r"holds 4 band\(s\) but Pillow would read only 3.*mimkit\[tiff\]"):
        probe_image(tmp_path / "rgbn.tif")
    with pytest.raises(DataError, match="holds 4 band"):
        load_image(tmp_path / "rgbn.tif", None)
    assert torch.equal(load_image(tmp_path / "rgb.tif", None), torch.from_numpy(rgb.transpose(2, 0, 1).copy()))


def test_scan_catches_a_codec_that_is_missing(tmp_path):
    """Without imagecodecs, an LZW 4-band TIFF is reported by the folder scan (not at load time); an LZW RGB
    photo still loads through Pillow."""
    arr = _rgbn(dtype=np.uint8)
    pytest.importorskip("imagecodecs")
    tifffile.imwrite(tmp_path / "rgbn_lzw.tif", arr, photometric="rgb", extrasamples=[0], compression="lzw")
    Image.fromarray(arr[..., :3].copy()).save(tmp_path / "rgb_lzw.tif", compression="tiff_lzw")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["imagecodecs"] = None  # as if it were not installed
        from mimkit.data.errors import DataReport
        from mimkit.data.sources import scan_folder
        report = DataReport()
        src = scan_folder({str(tmp_path)!r}, None, "skip", report)
        print("USABLE", [f.rsplit("/", 1)[1] for f in src.files], src.load(0)[0].shape[0])
        for path, reason in report.unreadable:
            print("UNREADABLE", path.rsplit("/", 1)[1], reason)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert "USABLE ['rgb_lzw.tif'] 3" in out.stdout
    line = next(x for x in out.stdout.splitlines() if x.startswith("UNREADABLE"))
    assert "rgbn_lzw.tif" in line and "imagecodecs" in line and "4 band" in line


def _oriented_jpeg(path, orientation):
    """A 64 wide x 48 high JPEG: left half red, right half blue; EXIF says how to turn it."""
    arr = np.zeros((48, 64, 3), np.uint8)
    arr[:, :32, 0] = 255
    arr[:, 32:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr).save(path, exif=exif, quality=95)


def test_exif_orientation_is_applied(tmp_path):
    _oriented_jpeg(tmp_path / "o6.jpg", 6)  # 6: rotate 90 degrees clockwise to display
    assert probe_image(tmp_path / "o6.jpg").size == (64, 48)  # (H, W): portrait as displayed
    x = load_image(tmp_path / "o6.jpg", None)
    assert x.shape == (3, 64, 48)
    # clockwise: the stored left (red) half becomes the top
    assert int(x[0, :24].float().mean()) > 200 and int(x[2, :24].float().mean()) < 40
    assert int(x[2, 40:].float().mean()) > 200
    _oriented_jpeg(tmp_path / "o1.jpg", 1)
    assert load_image(tmp_path / "o1.jpg", None).shape == (3, 48, 64)
    data = (tmp_path / "o6.jpg").read_bytes()
    assert torch.equal(decode_bytes(data, "jpg", None, "o6"), x)


def test_mixed_grey_and_colour_photos_just_train(real_images_dir, tmp_path):
    """A folder of ordinary photos, some grey-scale: converted to the usual count, one note in the report."""
    import shutil

    photos = sorted(real_images_dir.glob("cifar10_0*.png"))[:5]
    for f in photos:
        shutil.copy(f, tmp_path / f.name)
    Image.open(photos[0]).convert("L").save(tmp_path / "a_grey.png")  # sorts first: it used to fix the count
    Image.open(photos[1]).convert("L").save(tmp_path / "b_grey.jpg")
    d = build_pretrain_data(DataConfig(source="folder", path=str(tmp_path), img_size=16, val_fraction=0.0))
    assert d.channels == 3 and len(d.train) == 7
    assert d.report.notes == ["converted 2 grey-scale image(s) to 3 channel(s), the folder's usual count "
                              "(5 of 7 images); set data.channels to choose"]
    assert "note: converted 2 grey-scale" in d.report.summary()
    grey = d.train.source.load(d.train.source.files.index(str(tmp_path / "a_grey.png")))[0]
    assert grey.shape[0] == 3 and torch.equal(grey[0], grey[2])
    # a 4-band file among colour photos has no defined conversion: one error naming both counts
    tifffile.imwrite(tmp_path / "n.tif", _rgbn(dtype=np.uint8), photometric="rgb", extrasamples=[0])
    with pytest.raises(DataError, match=r"n\.tif has 4 channel\(s\) but 5 of the 8 images have 3"):
        build_pretrain_data(DataConfig(source="folder", path=str(tmp_path), img_size=16, val_fraction=0.0))
