"""Frozen-encoder feature extraction for kNN / linear evaluation.

Distributed extraction (`distributed=True`, every process of an initialised torch.distributed group calls
with the same encoder weights and the same dataset): rank r encodes images r, r + W, r + 2W, ... and the
features are all-gathered back into data order, so every rank returns the same tensors a single process
would (up to floating-point differences of batch composition) after encoding only 1/W of the images.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator

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


_PROGRESS: contextvars.ContextVar[str | None] = contextvars.ContextVar("mimkit_eval_progress", default=None)


@contextlib.contextmanager
def progress_bars(label: str | None = "features") -> Iterator[None]:
    """Within this block, every feature/token extraction shows a progress bar (images encoded, images/s) on
    stderr, named `label`, as pretraining shows its steps; None turns them off. Commands wrap a protocol in
    it; library calls stay silent."""
    token = _PROGRESS.set(label)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


def _bar(total: int | None):
    label = _PROGRESS.get()
    if label is None:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"{label}: encoding", unit="img", dynamic_ncols=True, leave=False)


def _world() -> tuple[int, int]:
    """(rank, world size) of the default torch.distributed group; (0, 1) when there is none."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_in_order(local: torch.Tensor, n: int, world: int, device: torch.device) -> torch.Tensor:
    """Rows r, r + W, ... of an n-row result from every rank r (this rank's are `local`): the n rows in order."""
    import torch.distributed as dist

    per_rank = -(-n // world)  # ranks hold per_rank or per_rank - 1 rows; pad to per_rank
    pad = local.new_zeros((per_rank - local.shape[0], *local.shape[1:]))
    # NCCL gathers only device tensors; gloo takes CPU tensors
    where = device if dist.get_backend() == "nccl" else torch.device("cpu")
    mine = torch.cat([local, pad]).to(where).contiguous()
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine)
    # row j of rank r is item r + j * W: interleave, then drop the padding (it lands after item n - 1)
    return torch.stack(parts, dim=1).flatten(0, 1)[:n].cpu()


def _split(batch) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, dict):
        images, labels = batch["image"], batch["label"]
    else:  # (images, labels) tuples, as torchvision datasets give
        images, labels = batch[0], batch[1]
    return images, torch.as_tensor(labels).long().reshape(-1)


def _device_of(encoder: nn.Module, device) -> torch.device:
    if device is None:
        p = next(encoder.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    return torch.device(device)


@torch.no_grad()
def encode_dataset(encoder: nn.Module, dataset_or_loader, fn, batch_size: int = 256,
                   device: str | torch.device | None = None, limit: int | None = None,
                   distributed: bool = False) -> tuple[list, torch.Tensor]:
    """`fn(encoder, images)` (a tensor, or a list of tensors) for every batch, moved to the CPU and concatenated
    in data order, plus the labels. The encoder runs in eval mode; its mode is restored afterwards.

    distributed: share the images among the processes of the torch.distributed group and all-gather the
    results (see the module docstring); every rank must call. Needs a map-style dataset; without an
    initialised group of more than one process it is the plain single-process extraction."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    rank, world = _world() if distributed else (0, 1)
    if world > 1:
        if not _is_dataset(dataset_or_loader):
            raise ValueError("distributed feature extraction needs a map-style dataset of samples, not a loader "
                             "or a list of batches (each rank must be able to pick its own images)")
        n = len(dataset_or_loader) if limit is None else min(limit, len(dataset_or_loader))
        if n >= world:  # else every rank encodes the few images itself: same result, nothing to share
            # n >= world: every rank has at least one image, so every rank knows the output shapes
            mine = Subset(dataset_or_loader, range(rank, n, world))
            outs, labels = encode_dataset(encoder, mine, fn, batch_size, device)
            dev = _device_of(encoder, device)
            return ([_gather_in_order(o, n, world, dev) for o in outs],
                    _gather_in_order(labels, n, world, dev))
    device = _device_of(encoder, device)
    was_training = encoder.training
    encoder.eval()
    outs, labels, seen = [], [], 0
    total = len(dataset_or_loader) if _is_dataset(dataset_or_loader) else None
    bar = _bar(min(total, limit) if total is not None and limit is not None else total)
    try:
        for batch in _batches(dataset_or_loader, batch_size, limit):
            images, y = _split(batch)
            if limit is not None:
                images, y = images[: limit - seen], y[: limit - seen]
            if images.shape[0] == 0:
                break
            out = fn(encoder, images.to(device, non_blocking=True))
            outs.append([o.cpu() for o in out] if isinstance(out, (list, tuple)) else [out.cpu()])
            labels.append(y.cpu())
            seen += images.shape[0]
            if bar is not None:
                bar.update(images.shape[0])
            if limit is not None and seen >= limit:
                break
    finally:
        encoder.train(was_training)
        if bar is not None:
            bar.close()
    if not outs:
        raise ValueError("no images to extract features from")
    return [torch.cat(parts) for parts in zip(*outs)], torch.cat(labels)


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    dataset_or_loader,
    pool: str = "cls",
    batch_size: int = 256,
    device: str | torch.device | None = None,
    limit: int | None = None,
    layers: list[int] | None = None,
    distributed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled encoder features of every image: (Float32[N, D], Long[N]), both on the CPU, in data order.

    `dataset_or_loader` is a map-style dataset of dicts {"image": Float[C,H,W], "label": int, ...} (batched
    here with `batch_size`, in order) or any iterable of batches (dicts with "image"/"label", or
    (images, labels) tuples). `encoder(images)` must return [B, 1 + N, D]; `pool` is "cls" or "mean"
    (see `mimkit.models.pool`). `limit` keeps only the first `limit` images. The encoder runs in eval mode
    on `device` (default: where its parameters are) and its train/eval mode is restored afterwards.
    `layers` (block indices, negative from the end) pools the tokens after those blocks instead of the final
    output, concatenated in the order given: [N, len(layers) * D]; the encoder needs `forward_layers`.
    `distributed=True`: every process of the torch.distributed group calls this with the same encoder and
    dataset; each encodes a 1/W share and all get every feature, in data order (see `encode_dataset`).
    """
    if pool not in ("cls", "mean"):
        raise ValueError(f"unknown pooling {pool!r}; choose 'cls' or 'mean'")

    def fn(enc, x):
        if layers:
            return torch.cat([pool_tokens(t, pool).float() for t in enc.forward_layers(x, list(layers))], 1)
        return pool_tokens(enc(x), pool).float()

    (feats,), labels = encode_dataset(encoder, dataset_or_loader, fn, batch_size, device, limit, distributed)
    return feats, labels


def extract_layer_features(encoder: nn.Module, dataset_or_loader, layers: list[int], pool: str = "cls",
                           batch_size: int = 256, device=None, limit: int | None = None, distributed: bool = False):
    """Pooled features after each chosen block, in one pass: ([Float32[N, D] per layer], Long[N])."""
    if pool not in ("cls", "mean"):
        raise ValueError(f"unknown pooling {pool!r}; choose 'cls' or 'mean'")
    fn = lambda enc, x: [pool_tokens(t, pool).float() for t in enc.forward_layers(x, list(layers))]  # noqa: E731
    return encode_dataset(encoder, dataset_or_loader, fn, batch_size, device, limit, distributed)


def extract_tokens(encoder: nn.Module, dataset_or_loader, batch_size: int = 256, device=None,
                   limit: int | None = None, dtype: torch.dtype = torch.float16, distributed: bool = False):
    """All output tokens [N, 1 + T, D] (class token first), cached in `dtype` to halve memory, and labels."""
    (tokens,), labels = encode_dataset(encoder, dataset_or_loader, lambda enc, x: enc(x).to(dtype),
                                       batch_size, device, limit, distributed)
    return tokens, labels
