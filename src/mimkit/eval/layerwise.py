"""Layer-wise probing: a linear probe (lr sweep, chosen on validation) on the features after every block."""

from __future__ import annotations

import time

from mimkit.eval.features import extract_layer_features
from mimkit.eval.linear import DEFAULT_LRS, linear_probe


def layerwise_probe(encoder, train_data, test_data, layers=None, pool: str = "cls", lrs=DEFAULT_LRS,
                    epochs: int = 10, val_fraction: float = 0.1, batch_size: int = 256, device=None,
                    train_limit: int | None = None, test_limit: int | None = None, seed: int = 0) -> dict:
    """{"layers": [{"layer", "test_acc", "best_lr", "val_acc"}...], "best_layer", ...}; one row per block
    (or per index in `layers`). Features of all blocks come from one pass over each split."""
    start = time.perf_counter()
    layers = list(range(encoder.depth)) if layers is None else [int(i) for i in layers]
    tr_feats, tr_y = extract_layer_features(encoder, train_data, layers, pool, batch_size, device, train_limit)
    te_feats, te_y = extract_layer_features(encoder, test_data, layers, pool, batch_size, device, test_limit)
    c = int(max(int(tr_y.max()), int(te_y.max()))) + 1
    rows = []
    for layer, xtr, xte in zip(layers, tr_feats, te_feats):
        r = linear_probe(xtr, tr_y, xte, te_y, lrs, epochs, batch_size, val_fraction, seed=seed, num_classes=c)
        rows.append({"layer": layer, "test_acc": r["test_acc"], "best_lr": r["best_lr"], "val_acc": r["val_acc"]})
    best = max(rows, key=lambda r: r["val_acc"])  # chosen on validation, like every choice here
    return {"layers": rows, "best_layer": best["layer"], "pool": pool, "epochs": epochs,
            "seconds": time.perf_counter() - start}
