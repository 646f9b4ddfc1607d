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


def baseline_table(encoder, cfg: PretrainConfig, mean, std, *, device: str | torch.device = "cpu") -> dict:
    """A run's encoder (a mimkit ViT, e.g. `method.encoder`) next to the same architecture at random init and
    raw pixels, on every eval.label_cells cell (mimkit.eval.labels: seeded class-balanced label subsets; each lr
    chosen on a validation split of the training images; the test split only scores). What `mimkit pretrain`
    prints at the end when eval.baseline_table is set, and what benchmarks/small_compute.py evidence stores."""
    from mimkit.data import build_labelled
    from mimkit.eval.baselines import baseline_encoders
    from mimkit.backends.mimkit import wrap_mimkit
    from mimkit.eval.labels import label_table

    if not has_labels(cfg.data):
        raise ValueError(f"eval.baseline_table needs labelled images, and data.source={cfg.data.source!r} has none")
    data = with_stats(cfg.data, mean, std)
    train, test = build_labelled(data, "train", mean, std), build_labelled(data, "test", mean, std)
    meta = {"channels": len(mean), "img_size": cfg.data.img_size, "mean": list(mean), "std": list(std)}
    wrapped = wrap_mimkit(encoder, meta).encoder  # the adapter evaluation and random_init expect
    return label_table(baseline_encoders(wrapped, train, seed=cfg.trainer.seed), train, test, cfg.eval, device)


def save_reconstructions(method, cfg: PretrainConfig, mean, std, path: str | Path, num_images: int = 8,
                         notes: list[str] | None = None) -> Path | None:
    """Draw the fixed batch's reconstructions to `path`; None (no file) when the method predicts no pixels.
    `notes` collects what differs from what was asked (see :func:`reconstruction_batch`)."""
    from mimkit.viz import save_reconstruction_grid

    batch = reconstruction_batch(cfg, mean, std, num_images, notes=notes)
    return save_reconstruction_grid(method.cpu().eval(), batch, path, mean, std, max_images=None)


@torch.no_grad()
def save_mask_attention(method, cfg: PretrainConfig, mean, std, path: str | Path, num_images: int = 8,
                        notes: list[str] | None = None) -> Path:
    """For methods that predict no pixels (HOG, features): the fixed batch with the hidden patches the method
    chooses (when it has `make_mask`) and the last block's class-token attention (mean over heads)."""
    from mimkit.eval.analysis import cls_attention
    from mimkit.viz.attention import render_attention_grid

    method = method.cpu().eval()
    batch = reconstruction_batch(cfg, mean, std, num_images, notes=notes)
    images = batch["image"]
    maps, titles = [], ["image"]
    mask = method.make_mask(batch) if hasattr(method, "make_mask") else None
    if mask is not None and getattr(mask, "masked", None) is not None and hasattr(method.encoder, "grid"):
        maps.append(mask.masked.float().view(-1, *method.encoder.grid.shape))
        titles.append("hidden patches")
    if hasattr(method.encoder, "blocks"):
        maps.append(cls_attention(method.encoder, images, layers=[-1])[0].mean(dim=1))
        titles.append("class-token attention (last block)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    render_attention_grid(images, maps, mean, std, titles=titles).save(path, format="PNG")
    return path


def write_json(path: str | Path, payload: dict) -> None:
    Path(path).write_text(json.dumps(payload, indent=2, default=float) + "\n")
