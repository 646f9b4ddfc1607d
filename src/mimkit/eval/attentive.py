"""Attentive probing on cached (frozen) patch tokens: a cross-attention pooler and Efficient Probing (EP).

* `CrossAttentionPooler`: one learned query attends over the tokens with full q/k/v/o projections
  (multi-head), then BatchNorm1d(affine=False) + Linear.
* `EfficientProbe` (EP, "Attention, Please! Revisiting Attentive Probing for MIM"): M learned queries,
  keys are the raw tokens (no Q/K projections), one V projection C -> C/d_out without bias, query m pools only
  its own channel slice of V; the slices are concatenated, then BatchNorm1d(affine=False) + Linear.

Both are trained with AdamW and a cosine schedule on train minus a validation split; test is only scored.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from mimkit.eval.budget import still_learning
from mimkit.eval.linear import carve_val, shuffled_batches


def _head(dim: int, num_classes: int) -> nn.Sequential:
    lin = nn.Linear(dim, num_classes)
    nn.init.trunc_normal_(lin.weight, std=0.01)
    nn.init.zeros_(lin.bias)
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), lin)


class CrossAttentionPooler(nn.Module):
    def __init__(self, dim: int, num_classes: int, num_heads: int = 8):
        super().__init__()
        if dim % num_heads:
            num_heads = math.gcd(dim, num_heads)
        self.num_heads = num_heads
        self.query = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.head = _head(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, d = tokens.shape
        x = self.norm(tokens)
        h = self.num_heads
        q = self.q(self.query.expand(b, -1, -1)).view(b, 1, h, d // h).transpose(1, 2)
        k = self.k(x).view(b, n, h, d // h).transpose(1, 2)
        v = self.v(x).view(b, n, h, d // h).transpose(1, 2)
        z = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, d)
        return self.head(self.o(z))


class EfficientProbe(nn.Module):
    def __init__(self, dim: int, num_classes: int, num_queries: int = 32, d_out: int = 1):
        super().__init__()
        out = dim // d_out
        if out % num_queries:
            raise ValueError(f"EP needs dim/d_out ({out}) divisible by the number of queries ({num_queries})")
        self.num_queries = num_queries
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.v = nn.Linear(dim, out, bias=False)
        self.head = _head(out, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, c = tokens.shape
        attn = torch.einsum("md,bnd->bmn", self.queries, tokens) / math.sqrt(c)
        attn = attn.softmax(dim=-1)  # [B, M, N]
        v = self.v(tokens).view(b, n, self.num_queries, -1)  # [B, N, M, C/(d_out M)]
        z = torch.einsum("bmn,bnmk->bmk", attn, v).reshape(b, -1)
        return self.head(z)


def trainable_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@torch.no_grad()
def _accuracy(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor, batch: int = 512) -> float:
    model.eval()
    correct = 0
    for s in range(0, tokens.shape[0], batch):
        correct += int((model(tokens[s:s + batch].float()).argmax(-1) == labels[s:s + batch]).sum())
    return correct / max(1, tokens.shape[0])


def train_probe(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor, epochs: int = 10, lr: float = 1e-3,
                weight_decay: float = 0.05, batch_size: int = 256, seed: int = 0,
                losses: list[float] | None = None) -> nn.Module:
    """Train `model` on the cached tokens (AdamW, warmup + cosine); `losses` receives each step's loss."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(tokens.shape[0] / batch_size)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min(1.0, (t + 1) / warm) * 0.5 * (1 + math.cos(math.pi * t / max(1, steps))))
    model.train()
    for idx in shuffled_batches(tokens.shape[0], batch_size, epochs, seed):
        loss = F.cross_entropy(model(tokens[idx].float()), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if losses is not None:
            losses.append(float(loss.detach()))
    return model.eval()


def attentive_probe(train_tokens: torch.Tensor, train_y: torch.Tensor, test_tokens: torch.Tensor,
                    test_y: torch.Tensor, kinds=("cross_attention", "efficient_probe"), epochs: int = 10,
                    lr: float = 1e-3, num_heads: int = 8, num_queries: int = 32, val_fraction: float = 0.1,
                    batch_size: int = 256, weight_decay: float = 0.05, use_cls: bool = False, seed: int = 0,
                    num_classes: int | None = None) -> dict:
    """Train each pooler on patch tokens ([N, 1 + T, D] given; the class token is dropped unless `use_cls`).

    Returns {"rows": [{"probe", "test_acc", "val_acc", "trainable_params", "seconds"}...], "warnings": [...],
    ...}; a warning per probe whose loss was still falling steeply when its epochs ran out (eval.budget).
    """
    c = num_classes or int(max(int(train_y.max()), int(test_y.max()))) + 1
    sl = slice(0, None) if use_cls else slice(1, None)
    train_tokens, test_tokens = train_tokens[:, sl], test_tokens[:, sl]
    train_y, test_y = train_y.long(), test_y.long()
    tr, va = carve_val(train_y, val_fraction, seed)
    dim = train_tokens.shape[-1]
    rows, warnings = [], []
    for kind in kinds:
        torch.manual_seed(seed)
        if kind == "cross_attention":
            model = CrossAttentionPooler(dim, c, num_heads)
        elif kind == "efficient_probe":
            model = EfficientProbe(dim, c, num_queries)
        else:
            raise ValueError(f"unknown attentive probe {kind!r}; choose cross_attention or efficient_probe")
        start = time.perf_counter()
        losses: list[float] = []
        train_probe(model, train_tokens[tr], train_y[tr], epochs, lr, weight_decay, batch_size, seed, losses)
        seconds = time.perf_counter() - start
        rows.append({"probe": kind, "test_acc": _accuracy(model, test_tokens, test_y),
                     "val_acc": _accuracy(model, train_tokens[va], train_y[va]),
                     "trainable_params": trainable_parameters(model), "seconds": seconds})
        warning = still_learning(losses, math.ceil(int(tr.numel()) / batch_size), f"attentive probe {kind} "
                                 f"({epochs} epoch(s))", "eval.attentive_epochs")
        if warning:
            warnings.append(warning)
    return {"rows": rows, "warnings": warnings, "epochs": epochs, "lr": lr, "batch_size": batch_size, "train_size": int(tr.numel()),
            "val_size": int(va.numel()), "test_size": int(test_y.numel()), "tokens": int(train_tokens.shape[1])}
