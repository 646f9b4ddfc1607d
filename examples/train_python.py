"""Pretrain from Python with `mimkit.engine.train`, a callback of your own, and the results in hand.

    python examples/train_python.py                     # MAE ViT-Tiny/4 on Fashion-MNIST, about a minute per epoch on CPU
    python examples/train_python.py optim.max_steps=20  # any key=value override of the recipe

The callback measures how spread out the encoder's features are on a fixed held-out batch every few steps
(a collapse monitor), logs it next to the loss in metrics.csv and TensorBoard, and keeps its history in the
checkpoint, so a resumed run (`train(cfg, resume=run_dir)`) continues the same history.
"""

from __future__ import annotations

import sys

import torch

from mimkit.config import load_config
from mimkit.engine import Callback, train


class FeatureSpread(Callback):
    """Every `every` steps: the mean per-dimension std of the class token over a fixed batch of held-out images."""

    def __init__(self, every: int = 10, images: int = 64):
        self.every, self.images = every, images
        self.history: list[tuple[int, float]] = []

    def on_train_batch_end(self, run, step: int, metrics: dict) -> None:
        if step % self.every or not run.is_global_zero:
            return
        held_out = run.data.val if run.data.val is not None and len(run.data.val) else run.data.train
        n = min(self.images, len(held_out))
        batch = torch.stack([held_out[(i, 0)]["image"] for i in range(n)])  # fixed images, fixed seeds
        device = next(run.method.parameters()).device
        run.method.eval()  # the loop restores train mode and the RNG states after every hook
        with torch.no_grad():
            cls = run.method.encoder(batch.to(device))[:, 0]
        spread = float(cls.float().std(dim=0).mean())
        self.history.append((step, spread))
        run.log({"feature_spread": spread}, step)

    def state_dict(self) -> dict:
        return {"history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.history = [(int(s), float(v)) for s, v in state["history"]]


def main(overrides: list[str]) -> dict:
    cfg = load_config(None, ["optim.epochs=1", "eval.knn=false", *overrides])  # the built-in MAE recipe
    spread = FeatureSpread(every=max(1, cfg.trainer.log_every_steps))
    result = train(cfg, callbacks=[spread])
    print(f"run folder: {result.run_dir}")
    print(f"final loss {result.metrics['loss']:.4f}, val_loss {result.metrics['val_loss']}")
    for step, value in spread.history:
        print(f"step {step:5d}: feature spread {value:.4f}")
    return {"result": result, "spread": spread.history}


if __name__ == "__main__":
    main(sys.argv[1:])
