"""Seeded, class-balanced index sets for evaluation: a validation split carved from the training images and
nested labelled subsets (1% inside 10% inside 100%) of the rest.

Everything here is a function of the training labels and a seed alone, so every encoder compared on the same
data gets the same images, and the test split never enters.
"""

from __future__ import annotations

import torch
from torch.utils.data import Subset


def dataset_labels(ds) -> torch.Tensor:
    """Long[len(ds)]: the label of every item, read from the source's label table where there is one (a
    MIMDataset over Fashion-MNIST or a folder), else by loading each item."""
    if isinstance(ds, Subset):
        return dataset_labels(ds.dataset)[torch.as_tensor(list(ds.indices), dtype=torch.long)]
    table = getattr(getattr(ds, "source", None), "labels", None)
    indices = getattr(ds, "indices", None)
    if table is not None and indices is not None:
        return torch.as_tensor(table, dtype=torch.long)[torch.as_tensor(indices, dtype=torch.long)]
    return torch.tensor([int(ds[i]["label"] if isinstance(ds[i], dict) else ds[i][1]) for i in range(len(ds))])


def _class_orders(labels: torch.Tensor, seed: int) -> list[torch.Tensor]:
    """Per class (ascending id): its indices in a seeded random order. One generator serves the classes in
    turn, so the order of a class depends only on the labels and the seed."""
    g = torch.Generator().manual_seed(int(seed))
    orders = []
    for c in torch.unique(labels).tolist():
        idx = (labels == c).nonzero().flatten()
        orders.append(idx[torch.randperm(idx.numel(), generator=g)])
    return orders


def _take(count: int, fraction: float) -> int:
    """round(fraction * count), at least one image of a class that has any."""
    return min(count, max(1, int(round(fraction * count)))) if count else 0


def carve_balanced_val(labels: torch.Tensor, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(pool, val) sorted index tensors: `fraction` of every class held out for choosing settings, the rest
    the pool that labelled subsets are drawn from. Raises if a class would be left with nothing to train on."""
    if not 0 < fraction < 1:
        raise ValueError(f"eval.val_fraction must be in (0, 1), got {fraction}")
    pool, val = [], []
    for order in _class_orders(labels, seed):
        k = _take(order.numel(), fraction)
        if k >= order.numel():
            raise ValueError(f"a class has {order.numel()} training image(s): too few to hold out a validation "
                             f"split (eval.val_fraction={fraction})")
        val.append(order[:k])
        pool.append(order[k:])
    return torch.cat(pool).sort().values, torch.cat(val).sort().values


def label_subsets(labels: torch.Tensor, fractions, seed: int = 0,
                  pool: torch.Tensor | None = None) -> dict[float, torch.Tensor]:
    """{fraction: sorted indices}: `fraction` of every class's images within `pool` (default: all), at least one
    per class. Nested: each class's images come in one seeded order and a subset takes a prefix of it, so a
    smaller fraction's subset lies inside every larger one's."""
    pool = torch.arange(labels.numel()) if pool is None else torch.as_tensor(pool, dtype=torch.long)
    for f in fractions:
        if not 0 < float(f) <= 1:
            raise ValueError(f"label fractions must be in (0, 1], got {f}")
    orders = _pool_orders(labels, pool, seed)
    return {float(f): torch.cat([o[:_take(o.numel(), float(f))] for o in orders]).sort().values for f in fractions}


def per_class_subset(labels: torch.Tensor, count: int, seed: int = 0, pool: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted indices of `count` images of every class within `pool` (all of a smaller class), in the order
    `label_subsets` draws from, so it nests with those subsets."""
    pool = torch.arange(labels.numel()) if pool is None else torch.as_tensor(pool, dtype=torch.long)
    return torch.cat([o[:count] for o in _pool_orders(labels, pool, seed)]).sort().values


def _pool_orders(labels: torch.Tensor, pool: torch.Tensor, seed: int) -> list[torch.Tensor]:
    return [pool[o] for o in _class_orders(labels[pool], seed + 1)]  # +1: not the val carve's order


def class_counts(labels: torch.Tensor, idx: torch.Tensor) -> dict[int, int]:
    """{class: images} of the labels at `idx` (every class of `labels` listed, zeros included)."""
    sel = labels[idx]
    return {int(c): int((sel == c).sum()) for c in torch.unique(labels).tolist()}
