"""Image sources: indexable collections returning ``(image, label)`` with a fixed channel count.

A source's ``load(i)`` returns a ``uint8`` or float ([0, 1]) tensor ``[C, H, W]`` and an int label (-1 when
unlabelled), and raises :class:`DataError` (with the original exception as ``__cause__``) when item ``i``
cannot be decoded; ``describe(i)`` names the item (a file path) for error messages and reports.
"""

from __future__ import annotations

import difflib
import gzip
import inspect
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from mimkit.data.errors import ChannelMismatchError, DataError, DataReport
from mimkit.data.images import (
    SIDE_FILE_SUFFIXES,
    array_to_tensor,
    convert_channels,
    convertible,
    image_from_pil,
    load_image,
    probe_image,
)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_idx_cache: dict[tuple[str, float], np.ndarray] = {}


# ==========================================================================================================
# IDX files: Fashion-MNIST (Debian's dataset-fashion-mnist) and any MNIST-like dataset


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx") + ".gz", stem.replace("-idx", ".idx")):
        if (directory / name).is_file():
            return directory / name
    return None


def read_idx(path: str | Path) -> np.ndarray:
    """Decode an IDX file (optionally gzipped) into a numpy array; cached per process."""
    path = Path(path)
    key = (str(path.resolve()), path.stat().st_mtime)
    if key in _idx_cache:
        return _idx_cache[key]
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"cannot read IDX file {path}: {err}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim)]
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - offset != expected:
        raise DataError(f"IDX file {path} is truncated or corrupt: header says {dims} "
                        f"({expected} bytes) but it holds {len(raw) - offset} bytes")
    arr = np.frombuffer(raw, dtype=dtype, offset=offset).reshape(dims)
    _idx_cache[key] = arr
    return arr


class IDXSource:
    """An MNIST-like dataset in IDX files (MNIST, Fashion-MNIST, KMNIST, EMNIST, ...): a folder holding an image
    file (``*idx3-ubyte``, optionally ``.gz``) and a label file (``*idx1-ubyte``) per split, "train" for the
    training split and "t10k" or "test" for the test split, decoded once into a uint8 tensor [N, 1, H, W].

    When the folder holds several datasets (EMNIST's balanced, byclass, digits...), `name` picks the one whose
    file names contain it; ``self.name`` (the dataset's own name, used in run names and outputs) is `name`,
    else the files' common prefix (``emnist-digits``), else the folder's name. EMNIST stores its images
    transposed; they are read as stored.
    """

    labelled = True
    channels = 1
    _SPLIT_WORDS = {"train": ("train",), "test": ("t10k", "test")}

    def __init__(self, split: str = "train", path: str | None = None, channels: int | None = None,
                 name: str | None = None):
        if channels is not None:
            self.channels = int(channels)  # 1 -> N replicates the grey channel
        if split not in self._SPLIT_WORDS:
            raise DataError(f"IDX split must be 'train' or 'test', got {split!r}")
        if not path:
            raise DataError("data.path must be the folder holding the IDX files for data.source='idx'")
        directory = Path(path)
        if not directory.is_dir():
            raise DataError(f"data.path {directory} (IDX files) is not a directory")
        img_file, lbl_file = self._find(directory, split, name)
        self._read(directory, img_file, lbl_file, split)
        stem = _common_stem(img_file.name, lbl_file.name)
        self.name = name or stem or directory.resolve().name

    def _find(self, directory: Path, split: str, name: str | None) -> tuple[Path, Path]:
        def files(kind: str) -> list[Path]:
            found = [f for f in sorted(directory.iterdir()) if f.is_file() and _idx_kind(f.name) == kind
                     and any(w in f.name.lower() for w in self._SPLIT_WORDS[split])
                     and (name is None or name.lower() in f.name.lower())]
            return found

        images, labels = files("idx3"), files("idx1")
        which = f" matching data.name={name!r}" if name else ""
        if not images or not labels:
            missing = "image (*idx3-ubyte)" if not images else "label (*idx1-ubyte)"
            raise DataError(f"{directory} has no {split} {missing} file{which} (IDX names say 'train' or "
                            "'t10k'/'test', e.g. train-images-idx3-ubyte.gz)")
        if len(images) > 1 or len(labels) > 1:
            listed = ", ".join(f.name for f in images + labels)
            raise DataError(f"{directory} holds several {split} IDX files{which} ({listed}); set data.name to a "
                            "part of the file names that picks one dataset (e.g. data.name=emnist-digits)")
        return images[0], labels[0]

    def _read(self, directory: Path, img_file: Path, lbl_file: Path, split: str) -> None:
        images, labels = read_idx(img_file), read_idx(lbl_file)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"unexpected IDX shapes in {directory}: images {images.shape} ({img_file.name}), "
                            f"labels {labels.shape} ({lbl_file.name})")
        if images.dtype != np.uint8:
            raise DataError(f"{img_file}: IDX images of type {images.dtype}; only unsigned bytes are supported")
        self.split, self.directory, self.path = split, str(directory), str(img_file)
        # [N, 1, H, W] uint8 view of the decoded buffer (read-only numpy memory -> copy once into torch)
        self.images = torch.from_numpy(np.array(images, dtype=np.uint8)).unsqueeze(1)
        self.labels = torch.from_numpy(np.array(labels, dtype=np.int64))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def load(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.images[i]
        if self.channels != 1:
            img = img.expand(self.channels, -1, -1)
        return img, int(self.labels[i])

    def describe(self, i: int) -> str:
        return f"{self.path}[{i}]"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.split!r}, n={len(self)})"


def _idx_kind(filename: str) -> str | None:
    low = filename.lower()
    for kind in ("idx3", "idx1"):
        if f"{kind}-ubyte" in low or f"{kind}.ubyte" in low:
            return kind
    return None


def _common_stem(a: str, b: str) -> str:
    """What two IDX file names share before their split word: 'emnist-digits' for EMNIST, '' for MNIST's."""
    low = a.lower()
    cut = min((low.find(w) for w in ("train", "t10k", "test") if w in low), default=0)
    stem = a[:cut].rstrip("-_.")
    return stem if b.lower().startswith(stem.lower()) else ""


class FashionMNISTSource(IDXSource):
    """The official Fashion-MNIST train (60k) or test (10k) split (Debian's dataset-fashion-mnist by default)."""

    def __init__(self, split: str = "train", path: str | None = None, channels: int | None = None):
        if channels is not None:
            self.channels = int(channels)
        if split not in _FMNIST_FILES:
            raise DataError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
        directory = Path(path or FASHION_MNIST_DIR)
        img_stem, lbl_stem = _FMNIST_FILES[split]
        hint = ("install it with `sudo apt-get install dataset-fashion-mnist`, or set data.path to a directory "
                f"holding {img_stem}.gz and {lbl_stem}.gz")
        if not directory.is_dir():
            raise DataError(f"Fashion-MNIST not found: directory {directory} does not exist; {hint}")
        img_file, lbl_file = _find_idx(directory, img_stem), _find_idx(directory, lbl_stem)
        if img_file is None or lbl_file is None:
            missing = img_stem if img_file is None else lbl_stem
            raise DataError(f"Fashion-MNIST not found: {directory} has no {missing}(.gz); {hint}")
        self._read(directory, img_file, lbl_file, split)
        self.name = "fashion_mnist"


# ==========================================================================================================
# Files on disk: "folder" (unlabelled, recursive) and "imagefolder" (class sub-folders)


def _walk(root: Path, report: DataReport) -> list[Path]:
    """All non-hidden files under root, recursively, in a deterministic (sorted) order.

    Hidden files and directories (name starting with ".") are not read; they are listed in the report's
    ``ignored`` entries (a hidden directory as one entry).
    """
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        for d in sorted(dirnames):
            if d.startswith("."):
                report.ignored.append((str(Path(dirpath) / d), "hidden directory (not scanned)"))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if f.startswith("."):
                report.ignored.append((str(Path(dirpath) / f), "hidden file"))
            else:
                out.append(Path(dirpath) / f)
    return out


def _probe_or_error(path: Path):
    try:
        return probe_image(path)
    except DataError as err:
        return err


def probe_all(files: list[Path], threads: int = 8) -> list:
    """ImageInfo or DataError per file, in order; headers are read by a few threads (I/O bound)."""
    if len(files) < 64:
        return [_probe_or_error(f) for f in files]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(_probe_or_error, files, chunksize=64))


class _PathTable:
    """Many paths stored as one bytes blob + offsets: cheap to pickle, and no per-path Python objects whose
    refcounts would un-share forked DataLoader workers' memory."""

    def __init__(self, paths: list[str]):
        encoded = [p.encode("utf-8", "surrogateescape") for p in paths]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self.offsets[1:])
        self.blob = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.blob[a:b].tobytes().decode("utf-8", "surrogateescape")


_CHANNEL_NAMES = {1: "grey-scale", 3: "RGB"}


def usual_channels(counts: list[int]) -> int:
    """The most common channel count; a tie goes to the larger count (converting up loses nothing)."""
    return max(set(counts), key=lambda c: (counts.count(c), c))


class FileSource:
    """Image files found by scanning; each file's header is probed once (format, size, channels).

    ``channels`` forces a conversion of every image; when None it is the folder's usual (most common)
    count, and images with another count are converted when a conversion is defined (grey-scale -> RGB
    replicates, RGB -> grey uses luma), with one line in the report's notes saying how many; a count that
    cannot be converted (e.g. a 4-band file among RGB photos) is a DataError naming both counts.
    Unreadable files are listed in the report; with on_error="error" the scan then raises, naming them.
    """

    def __init__(self, files: list[Path], labels: list[int], channels: int | None, on_error: str,
                 report: DataReport, classes: list[str] | None = None):
        self.classes = classes
        self.labelled = classes is not None
        candidates, cand_labels = [], []
        for f, label in zip(files, labels):
            report.scanned += 1
            if f.suffix.lower() in SIDE_FILE_SUFFIXES:
                report.ignored.append((str(f), f"not an image ({f.suffix} side file)"))
            else:
                candidates.append(f)
                cand_labels.append(label)
        keep_files, keep_labels, counts = [], [], []
        for f, label, info in zip(candidates, cand_labels, probe_all(candidates)):
            if isinstance(info, DataError):
                report.unreadable.append((str(f), str(info.__cause__ or info)))
                continue
            keep_files.append(f)
            keep_labels.append(label)
            counts.append(info.channels)
        forced = channels is not None
        if not forced and counts:
            channels = usual_channels(counts)
        converted: dict[int, int] = {}
        for f, c in zip(keep_files, counts):
            if c == channels:
                continue
            if not convertible(c, channels):
                if forced:
                    raise DataError(f"{f} has {c} channel(s), which cannot be converted to "
                                    f"data.channels={channels} (only 1 -> N and RGB -> 1 are defined)")
                raise ChannelMismatchError(
                    f"{f} has {c} channel(s) but {counts.count(channels)} of the {len(counts)} images have "
                    f"{channels}, and {c} -> {channels} is not a defined conversion (only 1 -> N and RGB -> 1); "
                    "set data.channels, or move the other images out")
            converted[c] = converted.get(c, 0) + 1
        if converted and not forced:
            kinds = ", ".join(f"{n} {_CHANNEL_NAMES.get(c, f'{c}-channel')}" for c, n in sorted(converted.items()))
            report.notes.append(f"converted {kinds} image(s) to {channels} channel(s), the folder's usual count "
                                f"({counts.count(channels)} of {len(counts)} images); set data.channels to choose")
        keep_files = [str(f) for f in keep_files]
        if report.unreadable and on_error == "error":
            shown = "\n  ".join(f"{p}: {r}" for p, r in report.unreadable[:10])
            more = f"\n  ... and {len(report.unreadable) - 10} more" if len(report.unreadable) > 10 else ""
            raise DataError(f"{len(report.unreadable)} of {report.scanned} files cannot be opened as images:\n  "
                            f"{shown}{more}\n(set data.on_error=skip to exclude them and record them in the "
                            "data report)")
        report.usable += len(keep_files)
        if not keep_files:
            raise DataError(f"no usable images found ({report.scanned} files scanned, "
                            f"{len(report.unreadable)} unreadable, {len(report.ignored)} ignored)")
        self._paths = _PathTable(keep_files)
        self.labels = np.asarray(keep_labels, dtype=np.int64)
        self.channels = int(channels)

    @property
    def files(self) -> list[str]:
        return [self._paths[i] for i in range(len(self._paths))]

    def __len__(self) -> int:
        return len(self._paths)

    def load(self, i: int) -> tuple[torch.Tensor, int]:
        return load_image(self._paths[i], self.channels), int(self.labels[i])

    def describe(self, i: int) -> str:
        return self._paths[i]

    def __repr__(self) -> str:
        return f"FileSource(n={len(self)}, channels={self.channels}, labelled={self.labelled})"


def scan_folder(root: str | Path, channels: int | None, on_error: str, report: DataReport) -> FileSource:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.path {root} is not a directory")
    files = _walk(root, report)
    if not files:
        raise DataError(f"data.path {root} holds no files")
    return FileSource(files, [-1] * len(files), channels, on_error, report)


def scan_imagefolder(root: str | Path, channels: int | None, on_error: str, report: DataReport) -> FileSource:
    """Class = name of the top-level sub-folder (sorted -> label 0, 1, ...); files inside are found recursively."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.path {root} is not a directory")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"data.path {root} has no class sub-folders (source=imagefolder needs root/<class>/<image>; "
                        "use source=folder for unlabelled images)")
    for f in sorted(root.iterdir()):
        if f.name.startswith("."):
            report.ignored.append((str(f), "hidden " + ("directory (not scanned)" if f.is_dir() else "file")))
        elif f.is_file():
            report.ignored.append((str(f), "not inside a class sub-folder"))
    files, labels = [], []
    for k, c in enumerate(classes):
        sub = _walk(root / c, report)
        files += sub
        labels += [k] * len(sub)
    return FileSource(files, labels, channels, on_error, report, classes=classes)


# ==========================================================================================================
# torchvision.datasets


def _torchvision_class(name: str):
    import torchvision.datasets as tvd

    cls = getattr(tvd, name, None)
    if not (inspect.isclass(cls) and hasattr(cls, "__getitem__")):
        available = sorted(n for n in dir(tvd) if inspect.isclass(getattr(tvd, n)) and n[0].isupper())
        close = difflib.get_close_matches(name, available, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise DataError(f"data.name={name!r} is not a torchvision.datasets class{hint}; "
                        f"available: {', '.join(available)}")
    return cls


def _split_kwargs(cls, split: str) -> list[dict]:
    """Candidate split arguments for this class: train=bool, or split='train'/'test'/'val'... in order."""
    params = inspect.signature(cls.__init__).parameters
    if "train" in params:
        return [{"train": split == "train"}]
    if "split" in params:
        if split == "train":
            return [{"split": "train"}]
        return [{"split": "test"}, {"split": "val"}, {"split": "valid"}]
    if split == "train":
        return [{}]
    return []


class TorchvisionSource:
    """Any torchvision.datasets class: ``cls(root=data.path, download=data.download, train=/split=...)``.

    ``train=True/False`` when the class takes ``train``; otherwise ``split="train"`` for training and the
    first of ``"test"``, ``"val"``, ``"valid"`` that the class accepts for "test". Channels are inferred from
    the first item when not forced; an item with another count is a ChannelMismatchError.
    """

    def __init__(self, name: str, root: str | None, download: bool, split: str, channels: int | None):
        cls = _torchvision_class(name)
        params = inspect.signature(cls.__init__).parameters
        root = root or os.path.join(".data", "torchvision")
        candidates = _split_kwargs(cls, split)
        if not candidates:
            raise DataError(f"torchvision dataset {name} has neither a 'train' nor a 'split' argument, "
                            f"so it has no {split!r} split")
        if "root" not in params:
            raise DataError(f"torchvision dataset {name} takes no 'root' argument; it cannot be used as data.source")
        errors = []
        self.dataset = None
        for kwargs in candidates:
            if "download" in params:
                kwargs = {**kwargs, "download": download}
            try:
                self.dataset = cls(root=root, **kwargs)
                self.kwargs = kwargs
                break
            except Exception as err:  # noqa: BLE001 - reported with the exact call that failed
                args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
                errors.append(f"{name}(root={root!r}, {args}): {type(err).__name__}: {err}")
        if self.dataset is None:
            hint = "" if download else " (set data.download=true to fetch it, or data.path to where it is)"
            raise DataError(f"cannot build torchvision dataset {name!r} for split {split!r}{hint}:\n  "
                            + "\n  ".join(errors))
        self.name, self.split, self.root = name, split, root
        self.labelled = True
        if len(self.dataset) == 0:
            raise DataError(f"torchvision dataset {name} ({split}) is empty")
        self.forced = channels is not None
        self.channels = channels
        if channels is None:
            self.channels = int(self._decode(0)[0].shape[0])

    def __len__(self) -> int:
        return len(self.dataset)

    def _decode(self, i: int) -> tuple[torch.Tensor, int]:
        try:
            item = self.dataset[i]
        except Exception as err:  # noqa: BLE001 - any decoding failure is reported with the item name
            raise DataError(f"cannot load {self.describe(i)}: {err}") from err
        img, target = (item[0], item[1]) if isinstance(item, (tuple, list)) and len(item) > 1 else (item, -1)
        name = self.describe(i)
        if torch.is_tensor(img):
            x = img if img.ndim == 3 else img.unsqueeze(0)
            if x.is_floating_point():
                x = x.float()
        elif isinstance(img, np.ndarray):
            x = _hwc_array(img)
        else:
            x = image_from_pil(img, self.channels if self.forced else None, name=name)
        try:
            label = int(target)
        except (TypeError, ValueError):
            label = -1
        return x, label

    def load(self, i: int) -> tuple[torch.Tensor, int]:
        x, label = self._decode(i)
        if x.shape[0] != self.channels:
            if not self.forced:
                raise ChannelMismatchError(f"{self.describe(i)} has {x.shape[0]} channel(s) but the first item has "
                                           f"{self.channels}; set data.channels to convert all images to one count")
            x = convert_channels(x, self.channels, name=self.describe(i))
        return x, label

    def describe(self, i: int) -> str:
        return f"torchvision.{self.name}({self.split})[{i}]"

    def __repr__(self) -> str:
        return f"TorchvisionSource({self.name!r}, {self.split!r}, n={len(self)})"


def _hwc_array(arr: np.ndarray) -> torch.Tensor:
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3:
        arr = arr.transpose(2, 0, 1)
    else:
        raise DataError(f"unsupported image array shape {arr.shape}")
    return array_to_tensor(np.ascontiguousarray(arr))
