"""Linear probe (MAE's protocol: BatchNorm1d without affine + Linear) on cached frozen features.

A sweep over learning rates is trained in one pass: one shared BatchNorm (it has no parameters) feeds one
linear head per learning rate (stacked in one tensor), all on the same batches. The head is chosen on a validation split carved
from the training features; the test split is only used to score the chosen head.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_LRS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


def carve_val(labels: torch.Tensor, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, val indices): a seeded random `fraction` of the training set held out (at least 1)."""
    n = labels.shape[0]
    if not 0 < fraction < 1:
        raise ValueError(f"val fraction must be in (0, 1), got {fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = max(1, int(round(n * fraction)))
    if k >= n:
        raise ValueError(f"too few training samples ({n}) to hold out a validation split")
    return perm[k:].sort().values, perm[:k].sort().values


class MultiLinearProbe(nn.Module):
    """BatchNorm1d(affine=False) shared by `heads` linear heads (dim -> classes): logits [H, B, C].

    The heads are stacked in one weight [H, C, D] and one bias [H, C], so a step is one matmul and one update
    whatever the number of learning rates (eight separate heads spent most of a step in dispatch)."""

    def __init__(self, dim: int, num_classes: int, heads: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.weight = nn.Parameter(torch.empty(heads, num_classes, dim))
        self.bias = nn.Parameter(torch.zeros(heads, num_classes))
        nn.init.trunc_normal_(self.weight, std=0.01)

    @property
    def num_heads(self) -> int:
        return self.weight.shape[0]

    def logits_per_sample(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, C], contiguous (what the training loss reads)."""
        h, c, d = self.weight.shape
        return torch.addmm(self.bias.reshape(-1), self.bn(x), self.weight.reshape(h * c, d).t()).view(-1, h, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_per_sample(x).transpose(0, 1)


@torch.no_grad()
def _accuracies(model: MultiLinearProbe, x: torch.Tensor, y: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    model.eval()
    correct = torch.zeros(model.num_heads)
    for s in range(0, x.shape[0], batch):
        correct += (model(x[s:s + batch]).argmax(-1) == y[s:s + batch]).sum(1).float()
    return correct / max(1, x.shape[0])


def train_linear_sweep(x: torch.Tensor, y: torch.Tensor, num_classes: int, lrs=DEFAULT_LRS, epochs: int = 30,
                       batch_size: int = 256, weight_decay: float = 0.0, seed: int = 0) -> MultiLinearProbe:
    """One head per lr, SGD (momentum 0.9) with a cosine schedule, all heads on the same shuffled batches.

    The update is torch.optim.SGD's (weight decay added to the gradient, the momentum buffer starting at the
    first gradient, p -= lr * buffer) with a per-head lr: written out here because the heads share one tensor,
    and checked against one torch.optim.SGD per head in tests/eval/test_linear.py."""
    torch.manual_seed(seed)
    x, y = x.float(), y.long()
    model = MultiLinearProbe(x.shape[1], num_classes, len(lrs))
    head_lr = torch.tensor([float(lr) for lr in lrs])
    params = (model.weight, model.bias)
    lr_shape = ((-1, 1, 1), (-1, 1))
    buffers: list[torch.Tensor | None] = [None, None]
    steps = epochs * math.ceil(x.shape[0] / batch_size)
    model.train()
    for t, idx in enumerate(shuffled_batches(x.shape[0], batch_size, epochs, seed)):
        logits = model.logits_per_sample(x[idx])
        # the sum over heads: each head's gradient is its own mean loss's gradient
        loss = F.cross_entropy(logits.reshape(-1, num_classes), y[idx].repeat_interleave(len(lrs))) * len(lrs)
        for p in params:
            p.grad = None
        loss.backward()
        scale = 0.5 * (1 + math.cos(math.pi * t / max(1, steps)))  # cosine, as LambdaLR at step t
        with torch.no_grad():
            for i, (p, shape) in enumerate(zip(params, lr_shape)):
                g = p.grad if weight_decay == 0 else p.grad.add(p, alpha=weight_decay)
                buffers[i] = g.clone() if buffers[i] is None else buffers[i].mul_(0.9).add_(g)
                p.sub_(buffers[i] * (head_lr * scale).view(shape))
    return model.eval()


def shuffled_batches(n: int, batch_size: int, epochs: int, seed: int):
    """Index batches over `epochs` seeded shuffles of range(n); batches of one are skipped (BatchNorm needs
    two samples)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, batch_size):
            idx = perm[s:s + batch_size]
            if idx.numel() >= 2:
                yield idx


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 lrs=DEFAULT_LRS, epochs: int = 30, batch_size: int = 256, val_fraction: float = 0.1,
                 weight_decay: float = 0.0, seed: int = 0, num_classes: int | None = None) -> dict:
    """Sweep lrs in one pass on train minus val, choose the best val accuracy, report its test accuracy.

    Returns {"test_acc", "best_lr", "val_acc", "sweep": [{"lr", "val_acc"}...], "train_size", "val_size",
    "test_size", "seconds"}. Nothing about `test_x` / `test_y` affects the choice.
    """
    c = num_classes or int(max(int(train_y.max()), int(test_y.max()))) + 1
    tr, va = carve_val(train_y, val_fraction, seed)
    return linear_probe_on(train_x[tr], train_y[tr], train_x[va], train_y[va], test_x, test_y, lrs, epochs,
                           batch_size, weight_decay, seed, c)


def linear_probe_on(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                    test_x: torch.Tensor, test_y: torch.Tensor, lrs=DEFAULT_LRS, epochs: int = 30,
                    batch_size: int = 256, weight_decay: float = 0.0, seed: int = 0,
                    num_classes: int | None = None) -> dict:
    """`linear_probe` with the validation split given: heads trained on train, chosen on val, scored on test."""
    start = time.perf_counter()
    c = num_classes or int(max(int(train_y.max()), int(val_y.max()), int(test_y.max()))) + 1
    model = train_linear_sweep(train_x, train_y, c, lrs, epochs, batch_size, weight_decay, seed)
    val_acc = _accuracies(model, val_x.float(), val_y.long())
    best = int(val_acc.argmax())  # ties -> the smallest lr (first in the list)
    with torch.no_grad():
        pred = model(test_x.float())[best].argmax(-1)
    test_acc = float((pred == test_y.long()).float().mean())
    return {
        "test_acc": test_acc, "best_lr": float(lrs[best]), "val_acc": float(val_acc[best]),
        "sweep": [{"lr": float(lr), "val_acc": float(a)} for lr, a in zip(lrs, val_acc)],
        "train_size": int(train_y.numel()), "val_size": int(val_y.numel()), "test_size": int(test_y.numel()),
        "epochs": epochs, "seconds": time.perf_counter() - start,
    }
