"""Hugging Face ``datasets`` as an image source (``data.source=hf``); needs ``pip install 'mimkit[hf]'``.

Where the data comes from:

* ``data.path`` a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``: ``load_from_disk``;
* otherwise ``load_dataset(data.name or data.path, data.hf_config, split=data.hf_split, data_dir=...)``: a Hub
  dataset (``data.name=cifar10``), a packaged builder over local files (``data.name=parquet`` or
  ``imagefolder`` with ``data.path`` the folder), or a local folder of data files (``data.path`` alone).

Columns: ``data.hf_image_key`` (default: the first column of type ``Image``, else ``image`` / ``img``) holds
images (encoded bytes, a path, a PIL image or an HWC/HW array); ``data.hf_label_key`` (default ``label`` when
present) an int label, -1 otherwise. Encoded images are decoded by the same functions as image files and tar
shards, so modes, channel rules, decompression-bomb limits and ``data.on_error`` behave as for
``data.source=folder``.

Map-style (``data.hf_streaming=false``): :class:`HFSource` is indexable like every other source, so the
trainer's SeededSampler deals it to the ranks as usual (val split, ``data.limit``, resume: unchanged).

Streaming (``data.hf_streaming=true``): the split is read as an ``IterableDataset`` and never indexed.

* The held-out val images are the first ``round(val_fraction * N)`` examples of the stream, the mean/std
  (unless given) come from the first ``data.stats_samples`` training examples, both kept encoded in memory;
  the training part is the rest of the stream (``.skip``; ``data.limit`` -> ``.take``). N is the split's
  example count from the dataset's metadata, or one counting pass over the stream when it has none.
* Each epoch the training stream is buffer-shuffled (``data.hf_shuffle_buffer`` examples, seed from
  trainer.seed and the epoch; 0: stream order) and split between the ranks with datasets'
  ``split_dataset_by_node``: ``data.hf_split_by=examples`` (default) deals example k of the shuffled stream
  to rank k mod W (every rank reads the stream, each decodes only its own examples), ``shards`` gives each
  rank whole files (each rank reads only its own; the shards' sizes must let every rank fill its share of
  the epoch, which is checked). Either way no example is used twice in an epoch across ranks.
* :class:`StreamingMIMDataset` is the torch ``IterableDataset`` the trainer loads from: it yields each rank
  exactly its share of the epoch's whole global batches, gives the example at global position p of the epoch
  (p = k * W + r for the k-th example of rank r) the seed ``rng.sample_seeds(seed, epoch, p)`` as
  SeededSampler would, splits a rank's examples between DataLoader workers by micro-batch (worker w takes
  micro-batches w, w + n, ...; the loader's round robin restores the order) and resumes mid-epoch by skipping
  the examples a rank has consumed. With ``hf_split_by=examples`` the global order does not depend on the
  number of ranks, so W processes see what one process sees, as with a map-style source.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from mimkit import rng
from mimkit.data.errors import ChannelMismatchError, DataError, record_load_error
from mimkit.data.images import array_to_tensor, convert_channels, image_from_pil

STREAM_SHUFFLE = 0x5A3
ROWS_PER_READ = 64


def _datasets():
    try:
        import datasets
    except ImportError as err:
        raise DataError("data.source=hf needs the Hugging Face `datasets` package: pip install 'mimkit[hf]' "
                        "(or pip install datasets)") from err
    return datasets


def _ident(cfg) -> str:
    parts = [p for p in (cfg.name, cfg.path) if p]
    return "hf:" + ":".join(parts)


def _is_saved_to_disk(path: str | None) -> bool:
    if not path or not Path(path).is_dir():
        return False
    p = Path(path)
    return (p / "dataset_dict.json").is_file() or (p / "state.json").is_file()


def open_split(cfg, split: str, streaming: bool):
    """The split as a datasets ``Dataset`` (or ``IterableDataset`` when streaming); DataError naming the field."""
    ds_mod = _datasets()
    where = _ident(cfg)
    if _is_saved_to_disk(cfg.path):
        try:
            d = ds_mod.load_from_disk(cfg.path)
        except Exception as err:  # noqa: BLE001 - reported with the folder
            raise DataError(f"cannot load the dataset saved in data.path={cfg.path!r}: {type(err).__name__}: {err}"
                            ) from err
        if isinstance(d, ds_mod.DatasetDict):
            if split not in d:
                raise DataError(f"data.hf_split={split!r}: {cfg.path} has no such split; available splits: "
                                f"{', '.join(d)}")
            d = d[split]
        elif split != cfg.hf_split and cfg.hf_test_split is not None:
            raise DataError(f"data.hf_test_split={split!r}: {cfg.path} holds one Dataset, not a DatasetDict with "
                            "splits; leave data.hf_test_split unset to hold out data.val_fraction of it")
        if streaming:
            d = d.to_iterable_dataset(num_shards=max(1, min(64, len(d))))
        return d
    target = cfg.name or cfg.path
    kwargs = {}
    if cfg.name and cfg.path:
        kwargs["data_dir" if Path(cfg.path).is_dir() else "data_files"] = cfg.path
    try:
        return ds_mod.load_dataset(target, cfg.hf_config, split=split, streaming=streaming, **kwargs)
    except ValueError as err:
        msg = str(err)
        field = "data.hf_split" if "split" in msg.lower() else "data.name/data.path"
        raise DataError(f"{field}: cannot load {where} split {split!r}: {msg}") from err
    except Exception as err:  # noqa: BLE001 - e.g. FileNotFoundError, DatasetNotFoundError, connection errors
        raise DataError(f"data.name/data.path: cannot load {where} (split {split!r}, config {cfg.hf_config!r}): "
                        f"{type(err).__name__}: {err}") from err


def _first_row(d) -> dict:
    for row in d.take(1) if hasattr(d, "take") else d:
        return row
    raise DataError("the dataset is empty")


def resolve_columns(d, image_key: str | None, label_key: str | None, where: str) -> tuple[str, str | None, list | None]:
    """(image column, label column or None, class names or None); DataError naming the field otherwise."""
    ds_mod = _datasets()
    features = d.features
    if features is None:  # some streamed builders only know their columns once read
        features = {k: None for k in _first_row(d)}
    cols = list(features)
    listing = ", ".join(f"{c} ({type(features[c]).__name__})" if features[c] is not None else c for c in cols)
    if image_key is None:
        typed = [c for c in cols if isinstance(features[c], ds_mod.Image)]
        named = [c for c in ("image", "img", "pixel_values") if c in cols]
        if not (typed or named):
            raise DataError(f"data.hf_image_key: {where} has no Image column and none named image/img; set "
                            f"data.hf_image_key to one of its columns: {listing}")
        image_key = (typed or named)[0]
    elif image_key not in cols:
        raise DataError(f"data.hf_image_key={image_key!r} is not a column of {where}; available columns: {listing}")
    if label_key is None:
        label_key = next((c for c in ("label", "labels") if c in cols and c != image_key), None)
    elif label_key not in cols:
        raise DataError(f"data.hf_label_key={label_key!r} is not a column of {where}; available columns: {listing}")
    classes = None
    if label_key is not None and isinstance(features[label_key], ds_mod.ClassLabel):
        classes = list(features[label_key].names)
    return image_key, label_key, classes


def _raw_images(d, image_key: str):
    """The dataset with its Image column left encoded ({"bytes", "path"}): decoded by mimkit, not by datasets."""
    ds_mod = _datasets()
    feat = d.features.get(image_key) if d.features is not None else None
    if isinstance(feat, ds_mod.Image) and feat.decode:
        d = d.cast_column(image_key, ds_mod.Image(decode=False))
    return d


def decode_value(value, channels: int | None, name: str) -> torch.Tensor:
    """An image cell (encoded bytes/path dict, raw bytes, PIL image, HWC or HW array) -> uint8/float [C, H, W]."""
    from PIL import Image

    from mimkit.data.shards import decode_bytes

    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        data, path = value.get("bytes"), value.get("path")
        if data is None:
            if not path:
                reason = "empty cell (no bytes, no path)"
                raise DataError(f"cannot decode image {name}: {reason}") from RuntimeError(reason)
            try:
                data = Path(path).read_bytes()
            except OSError as err:
                raise DataError(f"cannot read image {name} ({path}): {err}") from err
        ext = Path(path).suffix.lstrip(".").lower() if path else ""
        return decode_bytes(data, ext, channels, name)
    if isinstance(value, (bytes, bytearray)):
        return decode_bytes(bytes(value), "", channels, name)
    if isinstance(value, Image.Image):
        return image_from_pil(value, channels, name)
    if value is None:
        reason = "empty cell"
        raise DataError(f"cannot decode image {name}: {reason}") from RuntimeError(reason)
    try:
        arr = np.asarray(value)
    except Exception as err:  # noqa: BLE001
        raise DataError(f"cannot decode image {name}: {type(value).__name__} is not an image") from err
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3 and arr.shape[-1] in (1, 2, 3, 4) and arr.shape[0] not in (1, 2, 3, 4):
        arr = arr.transpose(2, 0, 1)  # HWC
    elif arr.ndim != 3:
        raise DataError(f"cannot decode image {name}: array of shape {arr.shape} is not an image (HW, HWC or CHW)")
    if arr.dtype == np.int64 or arr.dtype == np.int32:  # lists of ints from JSON/arrow: 8-bit pixels
        if arr.min() < 0 or arr.max() > 255:
            raise DataError(f"cannot decode image {name}: integer pixels outside 0..255")
        arr = arr.astype(np.uint8)
    x = array_to_tensor(np.ascontiguousarray(arr))
    return convert_channels(x, channels, name) if channels is not None else x


def _label(v) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return -1


class _Channels:
    """The channel rule shared by the HF sources: forced (convert), or inferred from the first image (mismatch
    is a ChannelMismatchError)."""

    def _init_channels(self, channels: int | None) -> None:
        self.forced = channels is not None
        self.channels = channels
        if channels is None:
            self.channels = int(self._decode(0).shape[0])

    def _checked(self, x: torch.Tensor, i: int) -> torch.Tensor:
        if x.shape[0] != self.channels:
            raise ChannelMismatchError(f"{self.describe(i)} has {x.shape[0]} channel(s) but the first image has "
                                       f"{self.channels}; set data.channels to convert all images to one count")
        return x


class HFSource(_Channels):
    """A map-style ``datasets.Dataset``: ``load(i)`` -> (image [C, H, W], label)."""

    def __init__(self, d, image_key: str | None, label_key: str | None, channels: int | None, where: str,
                 split: str):
        self.where, self.split = where, split
        if len(d) == 0:
            raise DataError(f"{where} split {split!r} is empty")
        self.image_key, self.label_key, self.classes = resolve_columns(d, image_key, label_key, where)
        self.labelled = self.label_key is not None
        if self.labelled:
            self.labels = np.asarray([_label(v) for v in d[self.label_key]], dtype=np.int64)
        else:
            self.labels = np.full(len(d), -1, dtype=np.int64)
        self.images = _raw_images(d.select_columns([self.image_key]), self.image_key)
        self._init_channels(channels)

    def __len__(self) -> int:
        return len(self.labels)

    def _decode(self, i: int) -> torch.Tensor:
        try:
            value = self.images[int(i)][self.image_key]
        except Exception as err:  # noqa: BLE001 - arrow/decoder failure of this row
            raise DataError(f"cannot read {self.describe(i)}: {type(err).__name__}: {err}") from err
        return decode_value(value, self.channels if self.forced else None, self.describe(i))

    def load(self, i: int) -> tuple[torch.Tensor, int]:
        return self._checked(self._decode(i), i), int(self.labels[i])

    def describe(self, i: int) -> str:
        return f"{self.where}[{self.split}][{i}]"

    def __repr__(self) -> str:
        return f"HFSource({self.where!r}, {self.split!r}, n={len(self)}, channels={self.channels})"


class MemorySource(_Channels):
    """A few streamed rows kept encoded in memory (the streaming val split and stats sample)."""

    def __init__(self, rows: list, labels: list[int], names: list[str], channels: int | None, labelled: bool,
                 classes=None):
        if not rows:
            raise DataError("no examples")
        self.rows, self.labels, self.names = rows, np.asarray(labels, dtype=np.int64), names
        self.labelled, self.classes = labelled, classes
        self._init_channels(channels)

    def __len__(self) -> int:
        return len(self.rows)

    def _decode(self, i: int) -> torch.Tensor:
        return decode_value(self.rows[i], self.channels if self.forced else None, self.names[i])

    def load(self, i: int) -> tuple[torch.Tensor, int]:
        return self._checked(self._decode(i), i), int(self.labels[i])

    def describe(self, i: int) -> str:
        return self.names[i]


def _iter_rows(d, image_key: str, label_key: str | None):
    """(image cell, label) of every example of an IterableDataset, read in blocks (public ``.iter`` API: no
    automatic split between DataLoader workers, which StreamingMIMDataset does itself)."""
    for block in d.iter(batch_size=ROWS_PER_READ):
        images = block[image_key]
        labels = block[label_key] if label_key is not None else [-1] * len(images)
        yield from zip(images, labels)


class HFStream:
    """A streamed split: the training part's stream per (epoch, rank), and the in-memory val/stats parts."""

    def __init__(self, cfg, split: str, report=None):
        self.where, self.split = _ident(cfg), split
        d = open_split(cfg, split, streaming=True)
        self.image_key, self.label_key, self.classes = resolve_columns(d, cfg.hf_image_key, cfg.hf_label_key,
                                                                       self.where)
        self.labelled = self.label_key is not None
        d = _raw_images(d.select_columns([c for c in (self.image_key, self.label_key) if c]), self.image_key)
        total = None
        info = getattr(d, "info", None)
        splits = getattr(info, "splits", None) or {}
        if split in splits and splits[split].num_examples:
            total = int(splits[split].num_examples)
        if total is None:  # no metadata: count (labels only when there are labels)
            col = self.label_key or self.image_key
            total = sum(len(b[col]) for b in d.select_columns([col]).iter(batch_size=1024))
        if total == 0:
            raise DataError(f"{self.where} split {split!r} is empty")
        self.total = total
        self.stream = d
        self.split_by = cfg.hf_split_by
        self.shuffle_buffer = cfg.hf_shuffle_buffer
        self.report = report

    def head(self, start: int, count: int, channels: int | None) -> MemorySource:
        """Examples start .. start + count - 1 of the stream order, kept encoded in memory."""
        rows, labels, names = [], [], []
        for k, (v, y) in enumerate(_iter_rows(self.stream.skip(start).take(count), self.image_key, self.label_key)):
            rows.append(v)
            labels.append(_label(y))
            names.append(f"{self.where}[{self.split}][{start + k}]")
        return MemorySource(rows, labels, names, channels, self.labelled, self.classes)

    def part(self, skip: int, count: int) -> "HFStream":
        """This stream restricted to examples skip .. skip + count - 1."""
        other = copy.copy(self)
        other.stream = self.stream.skip(skip).take(count) if skip or count < self.total else self.stream
        other.offset, other.total = skip, count
        return other

    def rank_rows(self, epoch: int, seed: int, rank: int, world: int):
        d = self.stream
        if self.shuffle_buffer > 0:
            d = d.shuffle(seed=rng.combine(seed, STREAM_SHUFFLE), buffer_size=self.shuffle_buffer)
            d.set_epoch(epoch)
        if world > 1:
            from datasets.distributed import split_dataset_by_node

            try:
                d = split_dataset_by_node(d, rank=rank, world_size=world, strategy=self.split_by)
            except ValueError as err:
                raise DataError(f"data.hf_split_by={self.split_by!r}: {err}") from err
        return _iter_rows(d, self.image_key, self.label_key)


class StreamingMIMDataset(torch.utils.data.IterableDataset):
    """The training part of a streamed split as the trainer loads it (see the module docs); it stands in for
    the SeededSampler too (``set_epoch``, ``epoch_length``)."""

    streaming = True

    def __init__(self, stream: HFStream, transform, channels: int, forced: bool, on_error: str = "error",
                 report_dir: str | None = None, report=None):
        self.stream, self.transform = stream, transform
        self.channels, self.forced = int(channels), forced
        self.on_error, self.report_dir, self.report = on_error, report_dir, report
        self.seed, self.rank, self.world, self.micro, self.global_batch = 0, 0, 1, 1, 1
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return int(self.stream.total)

    def with_transform(self, transform) -> "StreamingMIMDataset":
        other = copy.copy(self)
        other.transform = transform
        return other

    def configure(self, seed: int, rank: int, world: int, micro: int, global_batch: int) -> "StreamingMIMDataset":
        self.seed, self.rank, self.world, self.micro, self.global_batch = seed, rank, world, micro, global_batch
        return self

    @property
    def epoch_length(self) -> int:
        """Examples per epoch across all ranks: whole global batches only."""
        return (len(self) // self.global_batch) * self.global_batch

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """`start`: examples of this rank already consumed in the epoch (resume mid-epoch)."""
        self.epoch, self.start = epoch, start

    def _decode(self, value, name: str) -> torch.Tensor:
        x = decode_value(value, self.channels if self.forced else None, name)
        if x.shape[0] != self.channels:
            raise ChannelMismatchError(f"{name} has {x.shape[0]} channel(s) but the first image has {self.channels}; "
                                       "set data.channels to convert all images to one count")
        return x

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        n_workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        quota = self.epoch_length // self.world  # this rank's examples in the epoch
        last_good, k = None, -1
        for k, (value, label) in enumerate(self.stream.rank_rows(self.epoch, self.seed, self.rank, self.world)):
            if k >= quota:
                return
            if k < self.start or ((k - self.start) // self.micro) % n_workers != worker:
                continue
            p = k * self.world + self.rank  # position in the epoch's global order
            name = f"{self.stream.where}[{self.stream.split}] epoch {self.epoch} position {p}"
            try:
                img = self._decode(value, name)
                last_good = img
            except DataError as err:
                if self.on_error == "error" or isinstance(err, ChannelMismatchError) or last_good is None:
                    raise
                reason = str(err.__cause__ or err)
                record_load_error(self.report_dir, name, reason)
                if self.report is not None:
                    self.report.local_errors.setdefault(name, " ".join(reason.split()))
                img = last_good  # substitute: the previous readable image of this worker
            seed = int(rng.sample_seeds(self.seed, self.epoch, torch.tensor([p]))[0])
            out = self.transform(img, seed)
            item = out if isinstance(out, dict) else {"image": out}
            yield {**item, "seed": seed, "index": p, "label": _label(label)}
        if k + 1 < quota:
            how = ("whole shards (data.hf_split_by=shards) of unequal size" if self.world > 1 and self.split_by_shards
                   else "a shorter stream than its metadata says")
            raise DataError(f"{self.stream.where}: rank {self.rank} got {k + 1} examples in epoch {self.epoch}, fewer "
                            f"than its share {quota} of the epoch ({how}); use data.hf_split_by=examples, or "
                            "shards of equal size whose count is a multiple of the number of processes")

    @property
    def split_by_shards(self) -> bool:
        return self.stream.split_by == "shards"


def build_streaming_data(cfg, report_dir: str | None, report, size, train_transform_factory, eval_transform_factory,
                         check_norm, compute_stats):
    """(train StreamingMIMDataset, val MIMDataset, channels, mean, std) for data.hf_streaming=true."""
    from mimkit.data.dataset import MIMDataset

    stream = HFStream(cfg, cfg.hf_split, report)
    n = stream.total
    n_val = int(round(cfg.val_fraction * n))
    if cfg.val_fraction > 0 and n_val == 0:
        n_val = 1
    if n_val >= n:
        raise DataError(f"data.val_fraction={cfg.val_fraction} leaves no training images out of {n}")
    n_train = n - n_val if cfg.limit is None else min(cfg.limit, n - n_val)
    train_part = stream.part(n_val, n_train)
    first = stream.head(n_val, 1, cfg.channels)  # the channel count: forced, or the first training image's
    channels = int(first.channels)
    report.scanned += n
    report.usable += n
    if cfg.mean is not None:
        mean, std = check_norm(cfg.mean, cfg.std, channels)
    else:
        sample = stream.head(n_val, min(cfg.stats_samples, n_train), channels)
        mean, std = compute_stats(sample, torch.arange(len(sample)), size, cfg.stats_samples, cfg.split_seed,
                                  cfg.on_error, report_dir, report)
    train = StreamingMIMDataset(train_part, train_transform_factory(mean, std), channels, cfg.channels is not None,
                                cfg.on_error, report_dir, report)
    if n_val:
        cap = cfg.val_limit if cfg.val_limit is not None else cfg.limit  # as data.build.held_out_cap
        n_scored = n_val if cap is None else min(n_val, cap)
        val_src = stream.head(0, n_scored, channels)
        val = MIMDataset(val_src, torch.arange(n_scored), eval_transform_factory(mean, std), cfg.on_error, report_dir,
                         report)
    else:
        val = MIMDataset(first, torch.arange(0), eval_transform_factory(mean, std), cfg.on_error, report_dir, report)
    return train, val, channels, mean, std


def make_hf_source(cfg, split: str):
    """The map-style source of data.source=hf for `split` ("train": data.hf_split; "test": data.hf_test_split)."""
    name = cfg.hf_test_split if split == "test" and cfg.hf_test_split else cfg.hf_split
    d = open_split(cfg, name, streaming=False)
    return HFSource(d, cfg.hf_image_key, cfg.hf_label_key, cfg.channels, _ident(cfg), name)


