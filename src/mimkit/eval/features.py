"""Frozen-encoder feature extraction for kNN / linear evaluation."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset

from mimkit.models.vit import pool as pool_tokens


def _collate(items: list) -> dict:
    """Stack only what evaluation needs, so other sample fields (paths, None, ...) cannot break batching."""
    if isinstance(items[0], dict):
        images = [it["image"] for it in items]
        labels = [int(it["label"]) for it in items]
    else:
        images = [it[0] for it in items]
        labels = [int(it[1]) for it in items]
    return {"image": torch.stack([torch.as_tensor(im) for im in images]), "label": torch.tensor(labels)}


def _is_dataset(data) -> bool:
    """A map-style dataset of single samples (as opposed to a loader or list of batches)."""
    if isinstance(data, DataLoader):
        return False
    if isinstance(data, Dataset):
        return True
    if not (hasattr(data, "__getitem__") and hasattr(data, "__len__")) or len(data) == 0:
        return False
    first = data[0]
    image = first.get("image") if isinstance(first, dict) else first[0] if isinstance(first, (tuple, list)) else None
    return isinstance(image, torch.Tensor) and image.ndim == 3


def _batches(data, batch_size: int, limit: int | None) -> Iterable:
    if not _is_dataset(data):
        return data  # already yields batches
    if limit is not None and limit < len(data):
        data = Subset(data, range(limit))
    return DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=_collate)


def _split(batch) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, dict):
        images, labels = batch["image"], batch["label"]
    else:  # (images, labels) tuples, as torchvision datasets give
        images, labels = batch[0], batch[1]
    return images, torch.as_tensor(labels).long().reshape(-1)


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    dataset_or_loader,
    pool: str = "cls",
    batch_size: int = 256,
    device: str | torch.device | None = None,
    limit: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled encoder features of every image: (Float32[N, D], Long[N]), both on the CPU, in data order.

    `dataset_or_loader` is a map-style dataset of dicts {"image": Float[C,H,W], "label": int, ...} (batched
    here with `batch_size`, in order) or any iterable of batches (dicts with "image"/"label", or
    (images, labels) tuples). `encoder(images)` must return [B, 1 + N, D]; `pool` is "cls" or "mean"
    (see `mimkit.models.pool`). `limit` keeps only the first `limit` images. The encoder runs in eval mode
    on `device` (default: where its parameters are) and its train/eval mode is restored afterwards.
    """
    if pool not in ("cls", "mean"):
        raise ValueError(f"unknown pooling {pool!r}; choose 'cls' or 'mean'")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    if device is None:
        p = next(encoder.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    was_training = encoder.training
    encoder.eval()
    feats, labels, seen = [], [], 0
    try:
        for batch in _batches(dataset_or_loader, batch_size, limit):
            images, y = _split(batch)
            if limit is not None:
                images, y = images[: limit - seen], y[: limit - seen]
            if images.shape[0] == 0:
                break
            out = encoder(images.to(device, non_blocking=True))
            feats.append(pool_tokens(out, pool).float().cpu())
            labels.append(y.cpu())
            seen += images.shape[0]
            if limit is not None and seen >= limit:
                break
    finally:
        encoder.train(was_training)
    if not feats:
        raise ValueError("no images to extract features from")
    return torch.cat(feats), torch.cat(labels)
