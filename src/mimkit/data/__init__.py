"""Data layer: sources (Fashion-MNIST and other IDX datasets, image folders, torchvision), seeded transforms, splits, stats, reports.

Public API (relied on by the engine, evaluation and CLI):

* ``build_pretrain_data(cfg, report_dir=None) -> PretrainData`` (train, val, channels, img_size, mean, std,
  report)
* ``build_labelled(cfg, split, mean, std) -> Dataset`` for kNN evaluation
* ``DataError``, ``DataReport``, ``SeededSampler``

Items: ``dataset[(index, seed)]`` or ``dataset[index]`` -> ``{"image": Float[C, H, W] (normalized),
"seed": int, "index": int, "label": int (-1 unlabelled)}``.
"""

from mimkit.data.build import PretrainData, build_labelled, build_pretrain_data, compute_stats, split_indices
from mimkit.data.dataset import MIMDataset, fixed_batch, index_seed
from mimkit.data.errors import ChannelMismatchError, DataError, DataReport
from mimkit.data.sampler import SeededSampler
from mimkit.data.transforms import EvalTransform, TrainTransform

__all__ = [
    "ChannelMismatchError",
    "DataError",
    "DataReport",
    "EvalTransform",
    "MIMDataset",
    "PretrainData",
    "SeededSampler",
    "TrainTransform",
    "build_labelled",
    "build_pretrain_data",
    "compute_stats",
    "fixed_batch",
    "index_seed",
    "split_indices",
]
