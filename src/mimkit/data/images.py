"""Decoding image files into ``[C, H, W]`` tensors with a fixed channel count.

Natural channel counts (what ``data.channels=None`` infers):

* 1: PIL modes ``1``, ``L``, ``LA`` (alpha dropped), ``I;16*``, ``I``, ``F``;
* 3: ``RGB``, ``RGBA``/``RGBX``/``RGBa`` (alpha dropped), ``P``/``PA`` (palette -> RGB), ``CMYK``, ``YCbCr``,
  ``LAB``, ``HSV`` (converted to RGB by Pillow);
* TIFF (``.tif``/``.tiff``) with tifffile installed (``pip install 'mimkit[tiff]'``: tifffile + imagecodecs)
  and a grey-scale/RGB photometric: every band, any bit depth (multispectral). Extra samples are bands
  unless the file marks them as alpha (ExtraSamples 1 or 2): RGB + NIR (ExtraSamples 0, "unspecified", the
  usual 4-band GeoTIFF) has 4 channels, RGBA has 3. Other TIFFs (palette, CMYK, YCbCr) go through Pillow.
  A compression tifffile cannot decode without imagecodecs (LZW, deflate with predictor, zstd, ...) falls
  back to Pillow only when Pillow delivers every band; otherwise the header scan reports the file (it is
  never trained on with bands missing). Pillow never silently drops a band: a TIFF whose samples per pixel
  (less alpha) exceed what Pillow decodes is a DataError.
* EXIF orientation (JPEG, TIFF, WebP...) is applied: a portrait photo stored landscape with orientation 6
  loads portrait, and the header probe reports the displayed size.

Value scaling: 8-bit stays ``uint8`` (the transforms divide by 255); other integer data is divided by its
dtype's maximum (16-bit -> /65535; PIL's 32-bit ``I`` mode, which Pillow uses for 16-bit PNGs, -> /65535
clipped); float data is taken as already in [0, 1].

Forced conversion (``data.channels``): 1 -> N replicates; RGB -> 1 uses ITU-R 601 luma
(0.299 R + 0.587 G + 0.114 B, as Pillow's ``convert("L")``); anything else is a DataError naming the file.

Unusual modes, precisely: ``1`` (bilevel) -> 0/255; ``I;16`` (16-bit grey PNG/TIFF) -> value / 65535, never
clipped at 255; 16-bit RGB(A) PNGs are reduced to 8 bits by Pillow (high byte, i.e. scaled, not clipped);
``CMYK`` -> RGB by Pillow's conversion; ``P`` -> the palette's RGB colours. Alpha is *dropped, not
composited*: a transparent pixel keeps the colour stored under it (``RGBA``, ``LA``, ``PA``, and ``P`` with
a transparent palette index alike), so an image means the same whatever background it was meant for.

Refused (a :class:`DataError` naming the file, handled by ``data.on_error`` like any unreadable file):

* empty (0-byte) files, truncated or corrupt data (a short file is an error, not a grey-filled image, as
  long as nothing in the process sets Pillow's global ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True``);
* decompression bombs: a header claiming more than :data:`MAX_IMAGE_PIXELS` pixels (H x W, default
  89,478,485, about 9459 x 9459: Pillow's own warning threshold; environment variable
  ``MIMKIT_MAX_IMAGE_PIXELS``) or a decoded array over :data:`MAX_IMAGE_BYTES` (all bands and bit depth;
  default 2 GiB; ``MIMKIT_MAX_IMAGE_BYTES``) is refused from its header, before any pixel is decoded.
  Pillow itself refuses more than twice its ``PIL.Image.MAX_IMAGE_PIXELS``, so raising mimkit's limit
  beyond 178,956,970 pixels also needs that attribute raised;
* float images holding NaN or infinity (they would turn the loss into NaN).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mimkit.data.errors import DataError

try:  # optional: multi-band and high-bit-depth TIFF
    import tifffile
except ImportError:  # pragma: no cover - depends on the environment
    tifffile = None

# files that commonly sit next to images; recorded as "ignored" in the report instead of being decoded
SIDE_FILE_SUFFIXES = frozenset({".txt", ".csv", ".json", ".jsonl", ".md", ".yaml", ".yml", ".xml", ".ini",
                                ".log", ".db", ".pkl", ".pickle", ".py", ".html", ".htm", ".zip", ".tar", ".gz"})
TIFF_SUFFIXES = frozenset({".tif", ".tiff"})

MAX_IMAGE_PIXELS = 89_478_485  # H x W; Pillow's default PIL.Image.MAX_IMAGE_PIXELS (its warning threshold)
MAX_IMAGE_BYTES = 2 << 30  # decoded size of one image, all bands


def _limit(env: str, default: int) -> int:
    """A size limit: the environment variable when set (read at each call, so DataLoader workers see it)."""
    raw = os.environ.get(env, "").strip()
    if not raw:
        return int(default)
    try:
        value = int(float(raw))
    except ValueError:
        raise DataError(f"{env}={raw!r} is not a number of pixels/bytes") from None
    if value < 1:
        raise DataError(f"{env} must be >= 1, got {raw!r}")
    return value


def max_image_pixels() -> int:
    return _limit("MIMKIT_MAX_IMAGE_PIXELS", MAX_IMAGE_PIXELS)


def max_image_bytes() -> int:
    return _limit("MIMKIT_MAX_IMAGE_BYTES", MAX_IMAGE_BYTES)


class ImageTooLarge(ValueError):
    """A header that claims more pixels or bytes than the decompression-bomb limits allow."""


def check_image_size(height: int, width: int, decoded_bytes: int) -> None:
    """Raise ImageTooLarge when an image of this size would exceed the limits (see module docs)."""
    pixels, limit = int(height) * int(width), max_image_pixels()
    if pixels > limit:
        raise ImageTooLarge(f"{width}x{height} = {pixels:,} pixels exceeds the limit of {limit:,} pixels "
                            "(decompression-bomb guard; raise it with MIMKIT_MAX_IMAGE_PIXELS)")
    byte_limit = max_image_bytes()
    if decoded_bytes > byte_limit:
        raise ImageTooLarge(f"{width}x{height} decodes to {decoded_bytes:,} bytes, over the limit of "
                            f"{byte_limit:,} bytes (decompression-bomb guard; raise it with MIMKIT_MAX_IMAGE_BYTES)")


def _pil_bytes(im: Image.Image) -> int:
    w, h = im.size
    per_band = 4 if im.mode in ("I", "F") else 2 if im.mode.startswith("I;16") else 1
    return int(w) * int(h) * len(im.getbands()) * per_band


def _pil_reason(err: BaseException) -> str:
    if isinstance(err, (ImageTooLarge, PillowDropsBands)):
        return str(err)
    reason = f"{type(err).__name__}: {err}"
    if isinstance(err, Image.DecompressionBombError):
        reason += " (decompression-bomb guard: Pillow refuses more than twice PIL.Image.MAX_IMAGE_PIXELS)"
    return reason


_ONE = {"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N", "I;16S", "I;16LS", "I;16BS"}
_RGB_KEEP = {"RGB"}
_LUMA = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32).view(3, 1, 1)


@dataclass
class ImageInfo:
    channels: int
    size: tuple[int, int]  # (H, W)
    reader: str  # "pil" or "tifffile"


def natural_channels(mode: str) -> int:
    return 1 if mode in _ONE else 3


# ------------------------------------------------------------------------------------------ array -> tensor


def array_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """[C, H, W] numpy array -> uint8 tensor (8-bit) or float32 tensor in [0, 1]."""
    if arr.dtype == np.uint8:
        if not (arr.flags.writeable and arr.flags.c_contiguous):
            arr = np.array(arr, copy=True, order="C")
        return torch.from_numpy(arr)
    if arr.dtype == np.bool_:
        return torch.from_numpy(arr.astype(np.float32))
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        x = arr.astype(np.float32) / float(info.max)
        return torch.from_numpy(np.clip(x, 0.0, 1.0))
    if np.issubdtype(arr.dtype, np.floating):
        return torch.from_numpy(np.array(arr, dtype=np.float32, copy=True, order="C"))
    raise TypeError(f"unsupported pixel type {arr.dtype}")


def convertible(have: int, want: int) -> bool:
    return have == want or have == 1 or (have == 3 and want == 1)


def convert_channels(x: torch.Tensor, channels: int | None, name: str = "image", strict: bool = True) -> torch.Tensor:
    """Force a [C, H, W] tensor to `channels` (None: unchanged). 1 -> N replicate, 3 -> 1 luma; else error."""
    if x.ndim == 2:
        x = x.unsqueeze(0)
    if x.ndim != 3:
        raise DataError(f"{name}: expected an image [C, H, W], got shape {tuple(x.shape)}")
    c = x.shape[0]
    if channels is None or c == channels:
        return x
    if c == 1:
        return x.expand(channels, -1, -1).contiguous()
    if c == 3 and channels == 1:
        dtype = x.dtype
        y = (x.to(torch.float32) * _LUMA).sum(0, keepdim=True)
        return y.round_().clamp_(0, 255).to(torch.uint8) if dtype == torch.uint8 else y
    raise DataError(f"{name}: cannot convert an image with {c} channel(s) to data.channels={channels} "
                    "(only 1 -> N replication and RGB -> 1 luminance are defined)")


def image_from_pil(im: Image.Image, channels: int | None, name: str = "image") -> torch.Tensor:
    """A PIL image -> [C, H, W] tensor with the natural channel count, then forced to `channels`."""
    mode = im.mode
    if mode in ("1", "L"):
        im = im.convert("L")
    elif mode in ("LA", "La"):
        im = im.getchannel(0)
    elif mode.startswith("I;16"):
        arr = np.asarray(im)
        arr = arr.astype(np.uint16) if arr.dtype != np.uint16 else arr
        return convert_channels(array_to_tensor(arr[None]), channels, name)
    elif mode == "I":
        arr = np.clip(np.asarray(im, dtype=np.float64) / 65535.0, 0.0, 1.0).astype(np.float32)
        return convert_channels(torch.from_numpy(arr[None]), channels, name)
    elif mode == "F":
        return convert_channels(torch.from_numpy(np.asarray(im, dtype=np.float32)[None].copy()), channels, name)
    elif channels == 1 and natural_channels(mode) == 3:
        im = im.convert("RGB").convert("L")  # Pillow's luma, same weights as convert_channels
        return array_to_tensor(np.asarray(im)[None])
    elif mode != "RGB":
        im = im.convert("RGBA").convert("RGB") if mode in ("P", "PA") else im.convert("RGB")
    arr = np.asarray(im)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return convert_channels(array_to_tensor(arr), channels, name)


# ------------------------------------------------------------------------------------------ TIFF via tifffile


def _tiff_layout(tf) -> tuple[str, tuple[int, ...], tuple[int, ...] | None]:
    """(axes, shape, kept samples) of the first series, or raise ValueError when Pillow should handle it.

    Extra samples are bands unless the file marks them as alpha (ExtraSamples 1 = associated, 2 =
    unassociated): a 4-band RGB + NIR GeoTIFF (ExtraSamples 0, "unspecified") keeps its 4 bands, an RGBA
    file drops its alpha. `kept` lists the sample indices to keep along the ``S`` axis (None: all).
    """
    page = tf.pages[0]
    photometric = int(page.photometric)
    P = tifffile.PHOTOMETRIC
    if photometric not in (int(P.MINISBLACK), int(P.MINISWHITE), int(P.RGB)):
        raise ValueError(f"photometric {page.photometric!r} left to Pillow")
    series = tf.series[0]
    axes, shape = series.axes, tuple(series.shape)
    if "Y" not in axes or "X" not in axes:
        raise ValueError(f"cannot find image axes in TIFF axes {axes!r}")
    extra = [(a, n) for a, n in zip(axes, shape) if a not in "YX" and n > 1]
    if len(extra) > 1:
        raise ValueError(f"TIFF has several non-spatial axes {axes!r} {shape}; expected one band axis")
    kept = None
    extras = tuple(int(e) for e in (page.extrasamples or ()))
    if "S" in axes and extras:
        samples = shape[axes.index("S")]
        first_extra = samples - len(extras)
        alpha = {first_extra + k for k, e in enumerate(extras) if e in _ALPHA_EXTRASAMPLES}
        if alpha:
            kept = tuple(k for k in range(samples) if k not in alpha)
    check_image_size(shape[axes.index("Y")], shape[axes.index("X")],
                     int(np.prod(shape, dtype=np.float64)) * np.dtype(series.dtype).itemsize)
    return axes, shape, kept


_ALPHA_EXTRASAMPLES = (1, 2)  # TIFF ExtraSamples: 1 associated alpha, 2 unassociated alpha; 0 = unspecified


class MissingCodec(ValueError):
    """A TIFF compressed with a codec this installation cannot decode (tifffile needs ``imagecodecs``).

    ``channels``: the band count the header promises, which a Pillow fallback must then deliver."""

    channels: int | None = None


def _check_codec(page, channels: int | None = None) -> None:
    """Raise MissingCodec unless tifffile can decode this page's compression and predictor (header only)."""
    for table, value, what in ((tifffile.TIFF.DECOMPRESSORS, page.compression, "compression"),
                               (tifffile.TIFF.UNPREDICTORS, page.predictor, "predictor")):
        try:
            table[value]
        except KeyError as err:
            name = getattr(value, "name", value)
            missing = MissingCodec(f"TIFF {what} {name} cannot be decoded: {err.args[0] if err.args else err} "
                                   "(pip install 'mimkit[tiff]', or pip install imagecodecs)")
            missing.channels = channels
            raise missing from None


def _tiff_channels(axes: str, shape: tuple[int, ...], kept: tuple[int, ...] | None) -> int:
    c = 1
    for a, n in zip(axes, shape):
        if a not in "YX":
            c *= n
    return c if kept is None else c // shape[axes.index("S")] * len(kept)


class _TiffCorrupt(ValueError):
    """A TIFF that tifffile parsed but found damaged: reported, never silently read partially by Pillow."""


class _TiffProblems(logging.Handler):
    """tifffile *logs* (instead of raising) when pages are missing or corrupt; treat that as a failure."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _strict_tifffile():
    log = logging.getLogger("tifffile")
    handler = _TiffProblems()
    log.addHandler(handler)
    propagate, log.propagate = log.propagate, False
    try:
        yield
    except (_TiffCorrupt, ImageTooLarge):
        raise
    except Exception as err:
        if handler.messages:
            raise _TiffCorrupt("corrupt or truncated TIFF: " + "; ".join(dict.fromkeys(handler.messages))) from err
        raise
    finally:
        log.removeHandler(handler)
        log.propagate = propagate
    if handler.messages:
        raise _TiffCorrupt("corrupt or truncated TIFF: " + "; ".join(dict.fromkeys(handler.messages)))


def _read_tiff(path: Path) -> torch.Tensor:
    with _strict_tifffile(), tifffile.TiffFile(path) as tf:
        _ = len(tf.pages)  # walk the page chain first: missing pages are logged -> _TiffCorrupt
        axes, shape, kept = _tiff_layout(tf)
        _check_codec(tf.pages[0], _tiff_channels(axes, shape, kept))
        try:
            arr = tf.series[0].asarray()
        except KeyError:  # a codec tifffile lacks (needs imagecodecs): let Pillow try
            raise
        except Exception as err:  # noqa: BLE001 - tifffile parsed the file, so the data is damaged
            if "imagecodecs" in str(err):
                raise
            raise _TiffCorrupt(f"{type(err).__name__}: {err}") from err
        minis_white = int(tf.pages[0].photometric) == int(tifffile.PHOTOMETRIC.MINISWHITE)
    if arr.size != int(np.prod(shape)):
        raise _TiffCorrupt(f"TIFF data holds {arr.size} values, expected {shape}")
    arr = arr.reshape(shape)
    if kept is not None:
        arr = np.take(arr, kept, axis=axes.index("S"))
        shape = arr.shape
    y, x = axes.index("Y"), axes.index("X")
    rest = [k for k in range(arr.ndim) if k not in (y, x)]
    arr = arr.transpose(*rest, y, x).reshape(-1, shape[y], shape[x])
    if minis_white and np.issubdtype(arr.dtype, np.integer):
        arr = np.iinfo(arr.dtype).max - arr
    return array_to_tensor(arr)


# ------------------------------------------------------------------------------------------ public helpers


def _refuse_empty(path: Path, verb: str) -> None:
    try:
        empty = path.stat().st_size == 0
    except OSError:
        return  # missing or unreadable: the decoders report it
    if empty:
        reason = "empty file (0 bytes)"
        raise DataError(f"cannot {verb} image {path}: {reason}") from RuntimeError(reason)


def _finite(x: torch.Tensor, path: Path) -> torch.Tensor:
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        reason = f"{bad} pixel value(s) are NaN or infinite"
        raise DataError(f"cannot use image {path}: {reason}") from RuntimeError(reason)
    return x


_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap height and width


def exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation tag (1-8; 1 = as stored), read from the header only."""
    try:
        value = int(im.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a damaged EXIF block: show the pixels as stored
        return 1
    return value if 1 <= value <= 8 else 1


class PillowDropsBands(ValueError):
    """A TIFF whose bands Pillow would silently drop (e.g. the NIR band of an RGB + NIR GeoTIFF)."""


def check_pil_bands(im: Image.Image, tiff_err: BaseException | None = None) -> None:
    """Refuse a TIFF that Pillow would decode into fewer bands than the file holds (header only).

    Pillow reads an RGB TIFF with an extra sample of unspecified meaning as plain RGB, and only the first
    page of a band stack; those bands are data (only ExtraSamples 1/2 mark alpha), so the file needs
    tifffile (with imagecodecs for LZW/deflate/...) instead of a silent 3-band image.
    """
    if im.format != "TIFF":
        return
    have = natural_channels(im.mode)
    tags = getattr(im, "tag_v2", {})
    samples = int(tags.get(277, 1) or 1)
    extras = tags.get(338, ()) or ()
    extras = (extras,) if isinstance(extras, int) else tuple(extras)
    want = samples - sum(1 for e in extras if int(e) in _ALPHA_EXTRASAMPLES)
    promised = getattr(tiff_err, "channels", None)
    if promised is not None:
        want = max(want, int(promised))
    if want > have:
        if tiff_err is not None:
            how = f"tifffile: {tiff_err}"
        elif tifffile is None:
            how = "reading every band needs tifffile and imagecodecs: pip install 'mimkit[tiff]'"
        else:
            how = "tifffile could not read it"
        raise PillowDropsBands(f"the TIFF holds {want} band(s) but Pillow would read only {have} ({im.mode}); {how}")


def decode_pil(im: Image.Image, channels: int | None, name: str,
               tiff_err: BaseException | None = None) -> torch.Tensor:
    """An opened Pillow image -> [C, H, W]: size guard, band check, decode, EXIF orientation applied."""
    check_image_size(im.size[1], im.size[0], _pil_bytes(im))  # before decoding any pixel
    check_pil_bands(im, tiff_err)
    orientation = exif_orientation(im)
    im.load()
    if orientation != 1:
        from PIL import ImageOps

        im = ImageOps.exif_transpose(im)  # as cameras and viewers show it (a portrait photo stays portrait)
    return image_from_pil(im, channels, name)


def probe_image(path: str | Path) -> ImageInfo:
    """Read only the header: channel count and size. Raises DataError (cause attached) if unreadable."""
    path = Path(path)
    _refuse_empty(path, "open")
    tiff_err = None
    if tifffile is not None and path.suffix.lower() in TIFF_SUFFIXES:
        try:
            with _strict_tifffile(), tifffile.TiffFile(path) as tf:
                _ = len(tf.pages)  # walk the page chain: missing pages are logged -> _TiffCorrupt
                axes, shape, kept = _tiff_layout(tf)
                _check_codec(tf.pages[0], _tiff_channels(axes, shape, kept))
            return ImageInfo(_tiff_channels(axes, shape, kept),
                             (shape[axes.index("Y")], shape[axes.index("X")]), "tifffile")
        except (_TiffCorrupt, ImageTooLarge) as err:
            raise DataError(f"cannot open image {path}: {err}") from err
        except Exception as err:  # noqa: BLE001 - fall back to Pillow, keep the reason
            tiff_err = err
    try:
        with Image.open(path) as im:
            mode, (w, h) = im.mode, im.size
            check_image_size(h, w, _pil_bytes(im))
            check_pil_bands(im, tiff_err)
            if isinstance(tiff_err, MissingCodec):
                im.load()  # tifffile cannot decode it: make sure Pillow can, so the scan catches it
            if exif_orientation(im) in _TRANSPOSED_ORIENTATIONS:
                h, w = w, h
    except Exception as err:  # noqa: BLE001 - UnidentifiedImageError, OSError, SyntaxError, ...
        reason = _pil_reason(err)
        if tiff_err is not None and not isinstance(err, PillowDropsBands):
            reason += f" (tifffile: {type(tiff_err).__name__}: {tiff_err})"
        raise DataError(f"cannot open image {path}: {reason}") from RuntimeError(reason)
    return ImageInfo(natural_channels(mode), (h, w), "pil")


def load_image(path: str | Path, channels: int | None) -> torch.Tensor:
    """Decode a file into [C, H, W] (uint8 or float in [0, 1]) with `channels` channels.

    Raises DataError naming the file (with the reason as ``__cause__``) when it cannot be decoded or
    converted; a file whose channel count differs from a fixed `channels` is converted when a conversion is
    defined (see module docs).
    """
    path = Path(path)
    _refuse_empty(path, "decode")
    tiff_err = None
    if tifffile is not None and path.suffix.lower() in TIFF_SUFFIXES:
        try:
            x = _read_tiff(path)
        except (_TiffCorrupt, ImageTooLarge) as err:
            raise DataError(f"cannot decode image {path}: {err}") from err
        except Exception as err:  # noqa: BLE001 - e.g. a codec tifffile lacks: let Pillow try
            tiff_err = err
        else:
            return _finite(convert_channels(x, channels, str(path)), path)
    try:
        with Image.open(path) as im:
            return _finite(decode_pil(im, channels, str(path), tiff_err), path)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - truncated data, bad header, decoder errors
        reason = _pil_reason(err)
        if tiff_err is not None and not isinstance(err, PillowDropsBands):
            reason += f" (tifffile: {type(tiff_err).__name__}: {tiff_err})"
        raise DataError(f"cannot decode image {path}: {reason}") from RuntimeError(reason)
