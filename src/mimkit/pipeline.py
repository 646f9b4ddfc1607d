"""What the CLI does around training: evaluate a run's encoder and draw its reconstructions.

Plain functions over (method, config, data statistics), so notebooks can call them as the CLI does.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from mimkit.config import DataConfig, PretrainConfig


def _with_stats(data: DataConfig, mean, std) -> DataConfig:
    """The run's data section with the normalisation it trained with (so nothing is recomputed)."""
    return data.model_copy(update={"mean": list(mean), "std": list(std)})


def has_labels(data: DataConfig) -> bool:
    return data.source in ("fashion_mnist", "imagefolder", "torchvision")


def knn_evaluation(method, cfg: PretrainConfig, mean, std, *, device: str | torch.device = "cpu",
                   limit: int | None = None, pool: str = "cls") -> dict:
    """Weighted kNN accuracy of the method's encoder: train split as the bank, test split as queries."""
    from mimkit.data import build_labelled
    from mimkit.eval import extract_features, knn_accuracy

    if not has_labels(cfg.data):
        raise ValueError(
            f"kNN needs labelled images, and data.source={cfg.data.source!r} has none; evaluate on a labelled "
            f"source, e.g. data.source=imagefolder data.path=DIR"
        )
    data = _with_stats(cfg.data, mean, std)
    start = time.perf_counter()
    train = build_labelled(data, "train", mean, std)
    test = build_labelled(data, "test", mean, std)
    encoder = method.encoder.to(device).eval()
    bank, bank_labels = extract_features(encoder, train, pool=pool, batch_size=256, device=device, limit=limit)
    queries, query_labels = extract_features(encoder, test, pool=pool, batch_size=256, device=device, limit=limit)
    acc = knn_accuracy(bank, bank_labels, queries, query_labels, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature)
    return {
        "knn_top1": acc, "knn_k": cfg.eval.knn_k, "knn_temperature": cfg.eval.knn_temperature, "pool": pool,
        "bank_size": int(bank.shape[0]), "queries": int(queries.shape[0]), "seconds": time.perf_counter() - start,
    }


def reconstruction_batch(cfg: PretrainConfig, mean, std, num_images: int, seed: int = 0) -> dict:
    """A fixed batch of un-augmented images with fixed per-image seeds, for comparable pictures."""
    from mimkit import rng
    from mimkit.data import build_labelled, build_pretrain_data

    data = _with_stats(cfg.data, mean, std)
    if has_labels(data):
        dataset = build_labelled(data, "test", mean, std)
    else:
        bundle = build_pretrain_data(data)
        dataset = bundle.val if len(bundle.val) else bundle.train
    n = min(num_images, len(dataset))
    indices = torch.arange(n)
    seeds = rng.sample_seeds(seed, 0, indices)
    items = [dataset[(int(i), int(s))] for i, s in zip(indices, seeds)]
    return {"image": torch.stack([it["image"] for it in items]), "seed": seeds}


def save_reconstructions(method, cfg: PretrainConfig, mean, std, path: str | Path, num_images: int = 8) -> Path | None:
    from mimkit.viz import save_reconstruction_grid

    batch = reconstruction_batch(cfg, mean, std, num_images)
    method = method.cpu().eval()
    if method.reconstruct(batch) is None:
        return None
    save_reconstruction_grid(method, batch, path, mean, std)
    return Path(path)


def write_json(path: str | Path, payload: dict) -> None:
    Path(path).write_text(json.dumps(payload, indent=2, default=float) + "\n")
