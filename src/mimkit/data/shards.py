"""WebDataset-style tar shards: writing them from a folder (`mimkit data shard`) and reading them by random access.

Format (readable by ``webdataset``, ``tar -tf``, Python's ``tarfile``): plain uncompressed POSIX (ustar) tar
files ``shard-000000.tar``, ``shard-000001.tar``, ... in OUT, each holding ``--shard-size`` images as members
``<key>.<ext>`` (the original file's bytes; ext = its suffix, lower case) and, when the folder has class
sub-folders, ``<key>.cls`` (the class index as text). Keys are the 9-digit global sample number (no dots, so
webdataset groups members correctly). ``index.json`` in OUT lists per shard its members' key, ext, data offset,
size, label, channel count and original path, plus the class names and the files that could not be used.

Writing is deterministic (sorted paths, fixed tar headers), atomic per shard (temp file + rename) and reports
unreadable input images (path + reason, the folder scan's header checks) instead of dropping them silently.

Reading (:class:`ShardSource`, ``data.source=shards``): a map-style source like the folder sources. Images are
read by *random access* (``os.pread`` at the indexed offset; one file descriptor per shard per process, reopened
after a fork), not streamed, and decoded by the same functions as image files, so modes, channel rules and bad
images behave exactly as with ``data.source=folder``. Because the source is indexable, the trainer's
:class:`~mimkit.data.sampler.SeededSampler` splits the global indices between DDP ranks as for any source: each
sample is read by exactly one rank per epoch (that guarantee comes from the sampler, not from assigning shards
to ranks), and resuming and per-sample seeds work unchanged. Without ``index.json`` the index is rebuilt by
scanning the tars (``tarfile``'s ``offset_data``).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mimkit.data import images as _img
from mimkit.data.errors import ChannelMismatchError, DataError, DataReport
from mimkit.data.sources import SIDE_FILE_SUFFIXES, _PathTable, _walk, convertible, probe_all

INDEX_FILE = "index.json"
SHARD_PATTERN = "shard-{:06d}.tar"
IMAGE_EXTS = frozenset({"png", "jpg", "jpeg", "tif", "tiff", "webp", "bmp", "gif", "ppm", "pgm", "pbm"})
FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------ decoding bytes


def _reason(err: BaseException, tiff_err: BaseException | None) -> str:
    reason = _img._pil_reason(err)
    if tiff_err is not None and not isinstance(err, _img.PillowDropsBands):
        reason += f" (tifffile: {type(tiff_err).__name__}: {tiff_err})"
    return reason


def decode_bytes(data: bytes, ext: str, channels: int | None, name: str) -> torch.Tensor:
    """Like :func:`mimkit.data.images.load_image`, for an image file's bytes (`name` in error messages)."""
    if len(data) == 0:
        reason = "empty file (0 bytes)"
        raise DataError(f"cannot decode image {name}: {reason}") from RuntimeError(reason)
    tiff_err = None
    if _img.tifffile is not None and "." + ext.lower() in _img.TIFF_SUFFIXES:
        try:
            x = _img._read_tiff(io.BytesIO(data))
        except (_img._TiffCorrupt, _img.ImageTooLarge) as err:
            raise DataError(f"cannot decode image {name}: {err}") from err
        except Exception as err:  # noqa: BLE001 - e.g. a codec tifffile lacks: let Pillow try
            tiff_err = err
        else:
            return _img._finite(_img.convert_channels(x, channels, name), name)
    try:
        with Image.open(io.BytesIO(data)) as im:
            return _img._finite(_img.decode_pil(im, channels, name, tiff_err), name)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - truncated data, bad header, decoder errors
        reason = _reason(err, tiff_err)
        raise DataError(f"cannot decode image {name}: {reason}") from RuntimeError(reason)


def probe_bytes(data: bytes, ext: str, name: str) -> int:
    """Natural channel count from an image's header bytes (index-less shards); DataError when unreadable."""
    if len(data) == 0:
        raise DataError(f"cannot open image {name}: empty file (0 bytes)")
    if _img.tifffile is not None and "." + ext.lower() in _img.TIFF_SUFFIXES:
        try:
            with _img._strict_tifffile(), _img.tifffile.TiffFile(io.BytesIO(data)) as tf:
                _ = len(tf.pages)
                layout = _img._tiff_layout(tf)
                _img._check_codec(tf.pages[0], _img._tiff_channels(*layout))
                return _img._tiff_channels(*layout)
        except Exception as err:  # noqa: BLE001 - Pillow decides
            tiff_err = err
    else:
        tiff_err = None
    try:
        with Image.open(io.BytesIO(data)) as im:
            _img.check_pil_bands(im, tiff_err)
            return _img.natural_channels(im.mode)
    except Exception as err:  # noqa: BLE001
        raise DataError(f"cannot open image {name}: {_img._pil_reason(err)}") from err


# ------------------------------------------------------------------------------------------ writing


def _scan_input(root: Path, recursive: bool, report: DataReport) -> tuple[list[Path], list[int], list | None]:
    """(files, labels, classes): class sub-folders -> labelled (unless `recursive`), else every file, unlabelled."""
    if not root.is_dir():
        raise DataError(f"{root} is not a directory")
    subdirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    top_files = [f for f in root.iterdir() if f.is_file() and not f.name.startswith(".")]
    if recursive or not subdirs or top_files:
        files = _walk(root, report)
        return files, [-1] * len(files), None
    for f in sorted(root.iterdir()):
        if f.name.startswith("."):
            report.ignored.append((str(f), "hidden " + ("directory (not scanned)" if f.is_dir() else "file")))
    files, labels = [], []
    for k, c in enumerate(subdirs):
        sub = _walk(root / c, report)
        files += sub
        labels += [k] * len(sub)
    return files, labels, subdirs


def _ext_of(path: Path) -> str:
    ext = path.suffix.lower().lstrip(".")
    return ext if ext.isalnum() else "img"


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = size, 0, 0o644, 0, 0, "", ""
    return ti


def write_shards(folder: str | Path, out: str | Path, shard_size: int, recursive: bool = False) -> dict:
    """Write the usable images of `folder` into tar shards in `out`; returns the index (also `out/index.json`)."""
    folder, out = Path(folder), Path(out)
    if shard_size < 1:
        raise DataError(f"--shard-size must be >= 1, got {shard_size}")
    if out.exists() and any(out.glob("shard-*.tar")):
        raise DataError(f"{out} already holds shards; remove them or choose another output folder")
    report = DataReport(source="folder")
    files, labels, classes = _scan_input(folder, recursive, report)
    candidates = []
    for f, label in zip(files, labels):
        report.scanned += 1
        if f.suffix.lower() in SIDE_FILE_SUFFIXES:
            report.ignored.append((str(f), f"not an image ({f.suffix} side file)"))
        else:
            candidates.append((f, label))
    usable = []
    for (f, label), info in zip(candidates, probe_all([f for f, _ in candidates])):
        if isinstance(info, DataError):
            report.unreadable.append((str(f), str(info.__cause__ or info)))
        else:
            usable.append((f, label, info.channels))
    if not usable:
        raise DataError(f"no usable images in {folder} ({report.scanned} files scanned, "
                        f"{len(report.unreadable)} unreadable, {len(report.ignored)} ignored)")
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for s, start in enumerate(range(0, len(usable), shard_size)):
        name = SHARD_PATTERN.format(s)
        tmp = out / (name + ".tmp")
        chunk = usable[start:start + shard_size]
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for k, (f, label, _) in enumerate(chunk):
                key = f"{start + k:09d}"
                data = f.read_bytes()
                tar.addfile(_tarinfo(f"{key}.{_ext_of(f)}", len(data)), io.BytesIO(data))
                if label >= 0:
                    text = f"{label}".encode()
                    tar.addfile(_tarinfo(f"{key}.cls", len(text)), io.BytesIO(text))
        with tarfile.open(tmp, "r") as tar:  # offsets as any tar reader sees them
            offsets = {m.name: (m.offset_data, m.size) for m in tar.getmembers()}
        members = []
        for k, (f, label, ch) in enumerate(chunk):
            key, ext = f"{start + k:09d}", _ext_of(f)
            off, size = offsets[f"{key}.{ext}"]
            members.append({"key": key, "ext": ext, "offset": off, "size": size, "label": label, "channels": ch,
                            "path": str(f.relative_to(folder))})
        os.replace(tmp, out / name)
        shards.append({"name": name, "bytes": (out / name).stat().st_size, "members": members})
    index = {"format": "mimkit-shards", "version": FORMAT_VERSION, "shard_size": shard_size,
             "labelled": classes is not None, "classes": classes, "count": len(usable), "shards": shards,
             "unreadable": [{"path": p, "reason": r} for p, r in report.unreadable],
             "ignored": [{"path": p, "reason": r} for p, r in report.ignored]}
    tmp = out / (INDEX_FILE + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, out / INDEX_FILE)
    return index


# ------------------------------------------------------------------------------------------ reading


def scan_shards(root: Path) -> dict:
    """An index like index.json, built by reading the tar headers of every shard-*.tar in root."""
    paths = sorted(root.glob("*.tar"))
    if not paths:
        raise DataError(f"data.path {root} holds no .tar shards (write them with `mimkit data shard FOLDER OUT`)")
    shards, labelled = [], False
    for p in paths:
        try:
            with tarfile.open(p, "r:") as tar:
                groups: dict[str, dict] = {}
                for m in tar:
                    if not m.isfile():
                        continue
                    prefix, _, base = m.name.rpartition("/")  # webdataset: key = up to the basename's first dot
                    stem, _, ext = base.partition(".")
                    key = f"{prefix}/{stem}" if prefix else stem
                    g = groups.setdefault(key, {"key": key, "label": -1})
                    if ext.lower() == "cls":
                        g["label"] = int(tar.extractfile(m).read().decode().strip())
                        labelled = True
                    elif ext.lower() in IMAGE_EXTS:
                        g.update(ext=ext, offset=m.offset_data, size=m.size)
        except (tarfile.TarError, OSError, EOFError, ValueError) as err:
            raise DataError(f"cannot read shard {p}: {type(err).__name__}: {err}") from err
        members = [g for g in groups.values() if "offset" in g]
        with open(p, "rb") as fh:
            for g in members:
                fh.seek(g["offset"])
                g["channels"] = probe_bytes(fh.read(g["size"]), g["ext"], f"{p}:{g['key']}.{g['ext']}")
        shards.append({"name": p.name, "bytes": p.stat().st_size, "members": members})
    return {"labelled": labelled, "classes": None, "shards": shards}


class ShardSource:
    """Images in tar shards (see module docs); ``load(i)`` -> (image [C, H, W], label).

    Channel rules as for folder sources, from the channel counts index.json recorded at writing time. A member
    that fails to decode raises a DataError named ``<shard path>:<key>.<ext>``; data.on_error (applied by
    MIMDataset) then stops or substitutes and reports it, as for a bad file in a folder.
    """

    def __init__(self, root: str | Path, channels: int | None = None, report: DataReport | None = None):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"data.path {root} is not a directory of shards")
        index_path = root / INDEX_FILE
        if index_path.is_file():
            try:
                index = json.loads(index_path.read_text())
            except (OSError, ValueError) as err:
                raise DataError(f"cannot read {index_path}: {err}") from err
        else:
            index = scan_shards(root)
        self.root = str(root)
        self.classes = index.get("classes")
        self.labelled = bool(index.get("labelled"))
        self.shard_names = [s["name"] for s in index["shards"]]
        rows = [(k, m) for k, s in enumerate(index["shards"]) for m in s["members"]]
        if not rows:
            raise DataError(f"the shards in {root} hold no images")
        for k, s in enumerate(index["shards"]):
            p = root / s["name"]
            need = max((m["offset"] + m["size"] for m in s["members"]), default=0)
            have = p.stat().st_size if p.is_file() else -1
            if have < 0:
                raise DataError(f"shard {p} listed in {INDEX_FILE} is missing")
            if have < need:
                raise DataError(f"shard {p} is truncated: {have} bytes, but its members need {need} "
                                "(rewrite it with `mimkit data shard`)")
        self.shard = np.array([k for k, _ in rows], dtype=np.int32)
        self.offset = np.array([m["offset"] for _, m in rows], dtype=np.int64)
        self.size = np.array([m["size"] for _, m in rows], dtype=np.int64)
        self.labels = np.array([m.get("label", -1) for _, m in rows], dtype=np.int64)
        self._names = _PathTable([f"{m['key']}.{m['ext']}" for _, m in rows])
        natural = [int(m["channels"]) for _, m in rows]
        if channels is None:
            channels = natural[0]
            bad = [i for i, c in enumerate(natural) if c != channels]
            if bad:
                raise ChannelMismatchError(
                    f"{self.describe(bad[0])} has {natural[bad[0]]} channel(s) but {self.describe(0)} (the first "
                    f"image) has {channels}; set data.channels to convert all images to one count")
        else:
            bad = [i for i, c in enumerate(natural) if not convertible(c, channels)]
            if bad:
                raise DataError(f"{self.describe(bad[0])} has {natural[bad[0]]} channel(s), which cannot be "
                                f"converted to data.channels={channels}")
        self.channels = int(channels)
        if report is not None:
            report.scanned += len(rows)
            report.usable += len(rows)
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self.offset.shape[0])

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fds"] = {}
        return state

    def _fd(self, k: int) -> int:
        if self._pid != os.getpid():  # forked worker: never share the parent's descriptors
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(k)
        if fd is None:
            path = os.path.join(self.root, self.shard_names[k])
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as err:
                raise DataError(f"cannot open shard {path}: {err}") from err
            self._fds[k] = fd
        return fd

    def read_bytes(self, i: int) -> bytes:
        k, off, size = int(self.shard[i]), int(self.offset[i]), int(self.size[i])
        data = os.pread(self._fd(k), size, off)
        if len(data) != size:
            reason = f"shard truncated: read {len(data)} of {size} bytes at offset {off}"
            raise DataError(f"cannot read {self.describe(i)}: {reason}") from RuntimeError(reason)
        return data

    def load(self, i: int) -> tuple[torch.Tensor, int]:
        name = self._names[i]
        x = decode_bytes(self.read_bytes(i), name.rpartition(".")[2], self.channels, self.describe(i))
        return x, int(self.labels[i])

    def describe(self, i: int) -> str:
        return f"{os.path.join(self.root, self.shard_names[int(self.shard[i])])}:{self._names[i]}"

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __del__(self):
        try:
            if self._pid == os.getpid():
                self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __repr__(self) -> str:
        return f"ShardSource({self.root!r}, n={len(self)}, shards={len(self.shard_names)}, channels={self.channels})"
