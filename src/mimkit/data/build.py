"""Building the pretraining and evaluation datasets from a DataConfig.

Split and subset rules (all deterministic, independent of run seed, worker count and world size):

* The pretraining pool is the source's training split (Fashion-MNIST: the official 60k train images;
  torchvision: ``train=True``/``split="train"``; folder sources: every usable file).
* A seeded permutation of the pool (``data.split_seed``) puts ``round(val_fraction * n)`` images (at least
  one when val_fraction > 0) into ``val``; the rest is the training part.
* ``data.limit`` keeps the first N images of the training part *in that permuted order* (a random but
  fixed subset, so a small limit still covers all classes); indices are then sorted.
* ``data.val_limit`` keeps the first N held-out images in the same way; unset, it is ``data.limit`` when that
  is set (a quick run should not spend 60x its training forwards on the val loss: 3,000 Fashion-MNIST images
  against 48), else all. The held-out pool itself never depends on either limit, so a smaller val set is a
  subset of the larger one and no training image can enter it.
* Mean/std, when not given, are computed on ``data.stats_samples`` training images chosen by a seeded
  permutation (``split_seed``), with the eval transform (no augmentation): per-channel mean and population
  std over all pixels, accumulated in float64.

``build_labelled`` (kNN evaluation) maps ``split``: Fashion-MNIST and torchvision use the official
train/test splits; ``folder``/``imagefolder`` use the same seeded split as pretraining, "train" = the
training part (without ``data.limit``) and "test" = the held-out val part (so val_fraction must be > 0).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mimkit import rng
from mimkit.config import DataConfig
from mimkit.data.dataset import MIMDataset
from mimkit.data.errors import DataError, DataReport
from mimkit.data.shards import ShardSource
from mimkit.data.sources import FashionMNISTSource, IDXSource, TorchvisionSource, scan_folder, scan_imagefolder
from mimkit.data.transforms import EvalTransform, TrainTransform

SPLIT_STREAM = 0x5B117
STATS_STREAM = 0x57A75


@dataclass
class PretrainData:
    train: MIMDataset
    val: MIMDataset
    channels: int
    img_size: tuple[int, int]
    mean: list[float]
    std: list[float]
    report: DataReport = field(default_factory=DataReport)

    def with_views(self, specs, crop_ratio=(3 / 4, 4 / 3)) -> "PretrainData":
        """The same data whose training items carry augmented `views` (one per ViewSpec; see data.views)."""
        from dataclasses import replace

        from mimkit.data.views import MultiViewTransform

        t = self.train
        tf = MultiViewTransform(self.img_size, specs, crop_ratio, self.mean, self.std)
        if getattr(t, "streaming", False):  # data.hf_streaming: mimkit.data.hf.StreamingMIMDataset
            return replace(self, train=t.with_transform(tf))
        train = MIMDataset(t.source, t.indices, tf, t.on_error, t.report_dir, t.report)
        return replace(self, train=train)

    def meta(self) -> dict:
        """What the checkpoint stores about the data."""
        return {"img_size": list(self.img_size), "channels": self.channels, "mean": self.mean, "std": self.std}


def dataset_name(cfg: DataConfig) -> str:
    """The dataset's own name for run names and outputs: fashionmnist, an IDX dataset's (mnist, kmnist,
    emnist-digits: data.name, else its files' prefix, else its folder), a torchvision class, a folder's name."""
    if cfg.source == "idx" and cfg.path:
        if cfg.name:
            return cfg.name.lower()
        try:
            return IDXSource("train", cfg.path, None, None).name.lower()
        except DataError:
            return Path(cfg.path).name or "idx"
    if cfg.source == "torchvision" and cfg.name:
        return cfg.name.lower()
    if cfg.source in ("folder", "imagefolder", "shards") and cfg.path:
        return Path(cfg.path).name or cfg.source
    if cfg.source == "hf":
        return (cfg.name or Path(cfg.path or "hf").name or "hf").replace("/", "_").lower()
    return cfg.source.replace("_", "")


def img_size_of(cfg: DataConfig) -> tuple[int, int]:
    v = cfg.img_size
    size = (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))
    if min(size) < 1:
        raise DataError(f"data.img_size must be positive, got {v!r}")
    return size


def make_source(cfg: DataConfig, split: str, report: DataReport):
    """The raw source for `split` ("train" or "test"); folder sources ignore split (see module docs)."""
    report.source = cfg.source
    if cfg.source == "fashion_mnist":
        src = FashionMNISTSource(split, cfg.path, cfg.channels)
        report.scanned += len(src)
        report.usable += len(src)
        return src
    if cfg.source == "idx":
        src = IDXSource(split, cfg.path, cfg.channels, cfg.name)
        report.scanned += len(src)
        report.usable += len(src)
        return src
    if cfg.source == "folder":
        return scan_folder(cfg.path, cfg.channels, cfg.on_error, report)
    if cfg.source == "imagefolder":
        return scan_imagefolder(cfg.path, cfg.channels, cfg.on_error, report)
    if cfg.source == "shards":
        return ShardSource(cfg.path, cfg.channels, report)
    if cfg.source == "hf":
        from mimkit.data.hf import make_hf_source

        src = make_hf_source(cfg, split)
        report.scanned += len(src)
        report.usable += len(src)
        return src
    if cfg.source == "torchvision":
        src = TorchvisionSource(cfg.name, cfg.path, cfg.download, split, cfg.channels)
        report.scanned += len(src)
        report.usable += len(src)
        return src
    raise DataError(f"data.source={cfg.source!r} is not supported")


def split_indices(n: int, val_fraction: float, split_seed: int, limit: int | None = None,
                  val_limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) index tensors, sorted; see the module docs for the rules."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    g = torch.Generator()
    g.manual_seed(rng.combine(split_seed, n, SPLIT_STREAM))
    perm = torch.randperm(n, generator=g)
    n_val = int(round(val_fraction * n))
    if val_fraction > 0 and n_val == 0:
        n_val = 1
    if n_val >= n:
        raise DataError(f"data.val_fraction={val_fraction} leaves no training images out of {n}")
    val, train = perm[:n_val], perm[n_val:]
    if limit is not None:
        if limit < 1:
            raise DataError(f"data.limit must be >= 1, got {limit}")
        train = train[:limit]
    if val_limit is not None:
        if val_limit < 1:
            raise DataError(f"data.val_limit must be >= 1, got {val_limit}")
        val = val[:val_limit]
    return train.sort().values, val.sort().values


def held_out_cap(cfg: DataConfig) -> int | None:
    """How many held-out images the val loss uses: data.val_limit, else data.limit, else all (None)."""
    return cfg.val_limit if cfg.val_limit is not None else cfg.limit


def _check_norm(cfg_mean, cfg_std, channels: int) -> tuple[list[float], list[float]]:
    for name, values in (("data.mean", cfg_mean), ("data.std", cfg_std)):
        if len(values) != channels:
            raise DataError(f"{name} has {len(values)} value(s) but the images have {channels} channel(s); "
                            f"give one value per channel (or leave data.mean/data.std unset to compute them)")
        if not all(math.isfinite(v) for v in values):
            raise DataError(f"{name} must hold finite numbers, got {list(values)}")
    if any(s <= 0 for s in cfg_std):
        raise DataError(f"data.std values must be > 0, got {list(cfg_std)}")
    return [float(v) for v in cfg_mean], [float(v) for v in cfg_std]


def compute_stats(source, indices: torch.Tensor, img_size: tuple[int, int], samples: int, seed: int,
                  on_error: str = "error", report_dir: str | None = None,
                  report: DataReport | None = None) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of `samples` images of `indices` (seeded choice), eval transform."""
    indices = torch.as_tensor(indices, dtype=torch.long)
    if indices.numel() == 0:
        raise DataError("cannot compute data.mean/data.std from an empty training set")
    g = torch.Generator()
    g.manual_seed(rng.combine(seed, indices.numel(), STATS_STREAM))
    chosen = indices[torch.randperm(indices.numel(), generator=g)[:samples]].sort().values
    ds = MIMDataset(source, chosen, EvalTransform(img_size), on_error=on_error, report_dir=report_dir, report=report)
    c = source.channels
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    count = 0
    for i in range(len(ds)):
        x = ds[i]["image"].to(torch.float64).reshape(c, -1)
        total += x.sum(1)
        total_sq += (x * x).sum(1)
        count += x.shape[1]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0).sqrt()
    if bool((std < 1e-6).any()):
        warnings.warn(f"a channel is constant over the {len(ds)} images used for data statistics "
                      f"(std {std.tolist()}); using std=1 for it", RuntimeWarning, stacklevel=2)
        std = torch.where(std < 1e-6, torch.ones_like(std), std)
    return mean.tolist(), std.tolist()


def _refuse_single_image(cfg: DataConfig, source, report: DataReport) -> None:
    """One usable image cannot be split into training and validation: say so, and first say why that image
    itself fails when it does (a file can pass the header scan and fail to decode)."""
    where = f"data.path {cfg.path}" if cfg.path else f"data.source={cfg.source}"
    counts = (f"{report.scanned} scanned, {len(report.unreadable)} unreadable, {len(report.ignored)} ignored"
              if report.scanned else "")
    try:
        source.load(0)
    except DataError as err:
        raise DataError(f"{err} -- and it is the only image in {where} that passed the header scan "
                        f"({counts}); no usable images remain") from err
    raise DataError(f"{where} holds only 1 usable image ({source.describe(0)}; {counts}): pretraining needs at "
                    f"least 2, since data.val_fraction={cfg.val_fraction} holds one out for validation; add images "
                    "or set data.val_fraction=0")


def build_pretrain_data(cfg: DataConfig, report_dir: str | Path | None = None) -> PretrainData:
    """Training (augmenting) and validation (eval transform) datasets plus channels, size, mean/std, report.

    `report_dir` (the run directory): where DataLoader workers append load-time failures when
    ``data.on_error="skip"``; ``report.write(run_dir)`` writes the full report there.
    """
    size = img_size_of(cfg)
    report_dir = str(report_dir) if report_dir is not None else None
    report = DataReport(report_dir=report_dir)
    if cfg.source == "hf" and cfg.hf_streaming:
        from mimkit.data.hf import build_streaming_data

        train, val, channels, mean, std = build_streaming_data(
            cfg, report_dir, report, size,
            lambda m, s: TrainTransform(size, cfg.crop_scale, cfg.crop_ratio, cfg.hflip, m, s),
            lambda m, s: EvalTransform(size, m, s), _check_norm, compute_stats)
        return PretrainData(train=train, val=val, channels=channels, img_size=size, mean=mean, std=std,
                            report=report)
    source = make_source(cfg, "train", report)
    channels = int(source.channels)
    if len(source) < 2 and cfg.val_fraction > 0:
        _refuse_single_image(cfg, source, report)
    train_idx, val_idx = split_indices(len(source), cfg.val_fraction, cfg.split_seed, cfg.limit,
                                       held_out_cap(cfg))
    if cfg.mean is not None:
        mean, std = _check_norm(cfg.mean, cfg.std, channels)
    else:
        mean, std = compute_stats(source, train_idx, size, cfg.stats_samples, cfg.split_seed,
                                  cfg.on_error, report_dir, report)
    train_tf = TrainTransform(size, cfg.crop_scale, cfg.crop_ratio, cfg.hflip, mean, std)
    train = MIMDataset(source, train_idx, train_tf, cfg.on_error, report_dir, report)
    val = MIMDataset(source, val_idx, EvalTransform(size, mean, std), cfg.on_error, report_dir, report)
    return PretrainData(train=train, val=val, channels=channels, img_size=size, mean=mean, std=std, report=report)


def build_labelled(cfg: DataConfig, split: str, mean, std) -> MIMDataset:
    """Labelled images with the eval transform, normalized with the run's mean/std (kNN evaluation).

    Fashion-MNIST/torchvision: the official split. folder/imagefolder: "train" = training part of the
    seeded split (no data.limit), "test" = the held-out val part. The dataset's ``.report`` lists unreadable
    files; ``.classes`` names the labels where known.
    """
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    size = img_size_of(cfg)
    report = DataReport()
    source = make_source(cfg, split, report)
    mean, std = _check_norm(list(mean), list(std), int(source.channels))
    if cfg.source == "shards" and not source.labelled:
        raise DataError(f"the shards in {cfg.path} hold no labels (<key>.cls members); write them from a folder "
                        "with class sub-folders")
    if cfg.source == "hf" and not source.labelled:
        raise DataError(f"{source.where} has no label column (data.hf_label_key); kNN evaluation needs labels")
    if cfg.source in ("folder", "imagefolder", "shards") or (cfg.source == "hf" and cfg.hf_test_split is None):
        if split == "test" and cfg.val_fraction == 0:
            raise DataError(f"data.val_fraction is 0, so source={cfg.source!r} has no held-out images for the "
                            "'test' split; set data.val_fraction > 0")
        train_idx, val_idx = split_indices(len(source), cfg.val_fraction, cfg.split_seed)
        indices = train_idx if split == "train" else val_idx
    else:
        indices = torch.arange(len(source))
    ds = MIMDataset(source, indices, EvalTransform(size, mean, std), cfg.on_error, report=report)
    ds.classes = getattr(source, "classes", None)
    return ds


def fit_batch_to_data(batch_size: int, n_train: int, divisor: int = 1) -> tuple[int, str | None]:
    """The global batch to use for `n_train` training images, and a note when it had to be lowered.

    A batch larger than the training split would give no optimizer step at all; it is lowered to the largest
    multiple of `divisor` (world size x optim.accumulate, so every device still gets whole micro-batches)
    that fits, so a small folder of photos just trains. None as the batch when not even `divisor` images fit.
    """
    if n_train >= batch_size:
        return batch_size, None
    fitted = (n_train // divisor) * divisor
    if fitted < 1:
        return None, None
    return fitted, (f"optim.batch_size={batch_size} is more than the {n_train} training images: using "
                    f"optim.batch_size={fitted} (one step per epoch); set optim.batch_size to choose")
