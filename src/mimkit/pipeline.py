"""What the CLI does around training: evaluate a run's encoder and draw its reconstructions.

Plain functions over (method, config, data statistics), so notebooks can call them as the CLI does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mimkit.config import PretrainConfig
from mimkit.data.run_images import has_labels, reconstruction_batch, with_stats  # noqa: F401 - re-exported


def knn_evaluation(method, cfg: PretrainConfig, mean, std, *, device: str | torch.device = "cpu") -> dict:
    """Weighted kNN accuracy of the method's encoder (eval.* settings): train split as the bank, test split
    as queries; the same protocol as `mimkit eval --protocol knn`, flattened into results.json's keys."""
    from mimkit.data import build_labelled
    from mimkit.eval.protocols import run_protocol

    if not has_labels(cfg.data):
        raise ValueError(
            f"kNN needs labelled images, and data.source={cfg.data.source!r} has none; evaluate on a labelled "
            f"source, e.g. data.source=imagefolder data.path=DIR"
        )
    data = with_stats(cfg.data, mean, std)
    train, test = build_labelled(data, "train", mean, std), build_labelled(data, "test", mean, std)
    res = run_protocol("knn", method.encoder, train, test, cfg.eval, device)
    d = res["details"]
    return {
        "knn_top1": res["value"], "knn_k": d["k"], "knn_temperature": d["temperature"], "pool": d["pool"],
        "bank_size": d["bank_size"], "queries": d["queries"], "seconds": res["seconds"],
    }


def save_reconstructions(method, cfg: PretrainConfig, mean, std, path: str | Path, num_images: int = 8) -> Path | None:
    """Draw the fixed batch's reconstructions to `path`; None (no file) when the method predicts no pixels."""
    from mimkit.viz import save_reconstruction_grid

    batch = reconstruction_batch(cfg, mean, std, num_images)
    return save_reconstruction_grid(method.cpu().eval(), batch, path, mean, std)


@torch.no_grad()
def save_mask_attention(method, cfg: PretrainConfig, mean, std, path: str | Path, num_images: int = 8) -> Path:
    """For methods that predict no pixels (HOG, features): the fixed batch with the hidden patches the method
    chooses (when it has `make_mask`) and the last block's class-token attention (mean over heads)."""
    from mimkit.eval.analysis import cls_attention
    from mimkit.viz.attention import render_attention_grid

    method = method.cpu().eval()
    batch = reconstruction_batch(cfg, mean, std, num_images)
    images = batch["image"]
    maps = []
    mask = method.make_mask(batch) if hasattr(method, "make_mask") else None
    if mask is not None and getattr(mask, "masked", None) is not None and hasattr(method.encoder, "grid"):
        maps.append(mask.masked.float().view(-1, *method.encoder.grid.shape))
    if hasattr(method.encoder, "blocks"):
        maps.append(cls_attention(method.encoder, images, layers=[-1])[0].mean(dim=1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    render_attention_grid(images, maps, mean, std).save(path, format="PNG")
    return path


def write_json(path: str | Path, payload: dict) -> None:
    Path(path).write_text(json.dumps(payload, indent=2, default=float) + "\n")
