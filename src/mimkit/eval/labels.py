"""Label-fraction protocol: kNN, linear probe and fine-tuning with 1%, 10% and 100% of the training labels.

Splits (mimkit.eval.splits, a function of the training labels and eval.seed only, so identical for every
encoder compared): a class-balanced validation split (eval.val_fraction of every class) is carved from the
training images first; the labelled subsets are class-balanced, nested (1% inside 10% inside 100%) draws
from the rest, each fraction of every class's images there (100% = every training image outside the
validation split). Learning rates (linear probe and fine-tuning) are chosen on that validation split, which lies outside
every labelled subset; the test split only scores the chosen model.

A table is a list of cells "protocol@fraction" (eval.label_cells, e.g. "linear@0.01") evaluated for each of
several encoders (rows), e.g. a pretrained encoder, the same architecture at random init and raw pixels
(mimkit.eval.baselines).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn as nn
from torch.utils.data import Subset

from mimkit.eval.baselines import is_trainable
from mimkit.eval.features import extract_features
from mimkit.eval.finetune import finetune_sweep, recipe_settings
from mimkit.eval.knn import knn_accuracy
from mimkit.eval.linear import linear_probe_on
from mimkit.eval.splits import carve_balanced_val, class_counts, dataset_labels, label_subsets

CELL_PROTOCOLS = ("knn", "linear", "finetune")


def parse_cells(cells) -> list[tuple[str, float]]:
    """[(protocol, fraction)] of "protocol@fraction" strings; raises naming the bad cell."""
    out = []
    for cell in cells:
        protocol, _, fraction = str(cell).strip().partition("@")
        try:
            f = float(fraction)
        except ValueError:
            f = float("nan")
        if protocol not in CELL_PROTOCOLS or not 0 < f <= 1:
            raise ValueError(f"eval.label_cells: {cell!r} is not protocol@fraction with protocol knn, linear or "
                             "finetune and a fraction in (0, 1], e.g. linear@0.01")
        out.append((protocol, f))
    return out


def cell_name(protocol: str, fraction: float) -> str:
    return f"{protocol}@{fraction:g}"


def fraction_splits(train, cfg) -> dict:
    """The index sets every row uses: {"labels", "pool", "val", "subsets": {fraction: indices}}."""
    labels = dataset_labels(train)
    pool, val = carve_balanced_val(labels, cfg.val_fraction, cfg.seed)
    fractions = sorted({f for _, f in parse_cells(cfg.label_cells)})
    return {"labels": labels, "pool": pool, "val": val,
            "subsets": label_subsets(labels, fractions, cfg.seed, pool=pool)}


def _num_classes(train, labels: torch.Tensor) -> int:
    names = getattr(getattr(train, "dataset", train), "classes", None)
    return len(names) if names else int(labels.max()) + 1


def evaluate_row(encoder: nn.Module, train, test, cfg, splits: dict, device="cpu") -> dict:
    """{cell name: {"value", ...details} or None where the protocol does not apply} for one encoder."""
    cells = parse_cells(cfg.label_cells)
    labels, val, subsets = splits["labels"], splits["val"], splits["subsets"]
    classes = _num_classes(train, labels)
    out: dict = {}
    if any(p in ("knn", "linear") for p, _ in cells):
        kw = dict(pool=cfg.pool, batch_size=cfg.batch_size, device=device, layers=cfg.layers)
        xtr, ytr = extract_features(encoder, train, **kw)
        xte, yte = extract_features(encoder, test, **kw)
    recipe = recipe_settings(cfg)
    blrs = recipe.pop("blrs")
    for protocol, f in cells:
        idx, start = subsets[f], time.perf_counter()
        if protocol == "knn":
            acc = knn_accuracy(xtr[idx], ytr[idx], xte, yte, k=cfg.knn_k, temperature=cfg.knn_temperature)
            res = {"value": acc, "k": cfg.knn_k, "temperature": cfg.knn_temperature}
        elif protocol == "linear":
            r = linear_probe_on(xtr[idx], ytr[idx], xtr[val], ytr[val], xte, yte, cfg.linear_lrs, cfg.linear_epochs,
                                cfg.batch_size, cfg.linear_weight_decay, cfg.seed, classes)
            res = {"value": r["test_acc"], **r}
        elif not is_trainable(encoder):
            out[cell_name(protocol, f)] = None  # raw pixels: nothing to fine-tune
            continue
        else:
            r = finetune_sweep(encoder, Subset(train, idx.tolist()), Subset(train, val.tolist()), test, classes,
                               blrs, device=device, seed=cfg.seed, **recipe)
            res = {"value": r["test_acc"], **r}
        res.update(train_size=int(idx.numel()), seconds=time.perf_counter() - start)
        out[cell_name(protocol, f)] = res
    return out


def label_table(encoders: dict[str, nn.Module], train, test, cfg, device="cpu") -> dict:
    """Every cell of eval.label_cells for every encoder (rows, in order), on the same splits.

    Returns {"rows": {name: {cell: result or None}}, "cells": [...], "splits": {...sizes and class counts},
    "seconds"}."""
    start = time.perf_counter()
    splits = fraction_splits(train, cfg)
    rows = {name: evaluate_row(enc.to(device).eval(), train, test, cfg, splits, device)
            for name, enc in encoders.items()}
    labels = splits["labels"]
    return {
        "rows": rows, "cells": [cell_name(p, f) for p, f in parse_cells(cfg.label_cells)],
        "splits": {"seed": cfg.seed, "val_fraction": cfg.val_fraction, "val_size": int(splits["val"].numel()),
                   "pool_size": int(splits["pool"].numel()), "test_size": len(test),
                   "subsets": {f"{f:g}": {"size": int(i.numel()), "per_class": class_counts(labels, i)}
                               for f, i in splits["subsets"].items()}},
        "finetune_recipe": {"name": cfg.finetune_recipe, **recipe_settings(cfg)},
        "seconds": time.perf_counter() - start,
    }


def table_lines(table: dict) -> list[str]:
    """A markdown table: one row per encoder, one column per cell, top-1 in %."""
    cells = table["cells"]
    lines = ["| encoder | " + " | ".join(cells) + " |", "|---" * (len(cells) + 1) + "|"]
    for name, row in table["rows"].items():
        vals = ["n/a" if row.get(c) is None else f"{100 * row[c]['value']:.2f}" for c in cells]
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    return lines


def aggregate_tables(tables: list[dict]) -> dict:
    """{row: {cell: {"mean", "std", "n", "values"}}} over several tables (e.g. one per pretraining seed); std is
    the sample standard deviation (0 for one table)."""
    out: dict = {}
    for t in tables:
        for name, row in t["rows"].items():
            for cell, r in row.items():
                if r is not None:
                    out.setdefault(name, {}).setdefault(cell, []).append(float(r["value"]))
    return {name: {cell: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                          "n": len(v), "values": v} for cell, v in row.items()} for name, row in out.items()}
