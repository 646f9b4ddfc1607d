"""Collapse diagnostics for methods whose targets are features or distributions (teachers, latent targets).

A target space has collapsed when every patch/image maps to (nearly) the same vector - the mean pairwise cosine
similarity goes to 1 - or when a teacher's distribution over prototypes is uniform (entropy log K, nothing
learned) or one-hot on one prototype for every input (entropy 0 and the batch mean distribution one-hot too).
Methods log these as metrics (`target_sim`, `teacher_entropy`, `teacher_batch_entropy`) and tests bound them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def mean_pairwise_cosine(x: torch.Tensor, max_items: int = 1024) -> torch.Tensor:
    """Mean cosine similarity over distinct pairs of rows of x [..., D] (flattened to [M, D]); at most
    `max_items` evenly spaced rows are used, so the cost stays bounded on large batches."""
    x = x.detach().float().reshape(-1, x.shape[-1])
    if x.shape[0] > max_items:
        x = x[torch.linspace(0, x.shape[0] - 1, max_items, device=x.device).long()]
    m = x.shape[0]
    if m < 2:
        return torch.zeros((), device=x.device)
    z = F.normalize(x, dim=-1)
    total = (z.sum(0) ** 2).sum() - (z * z).sum()  # sum over i != j of z_i . z_j
    return total / (m * (m - 1))


@torch.no_grad()
def mean_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy (nats) of the distributions along the last dim of `probs`."""
    p = probs.detach().float().clamp_min(1e-12)
    return -(p * p.log()).sum(-1).mean()


@torch.no_grad()
def batch_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy of the mean distribution over all rows: near 0 when every input picks the same prototype."""
    p = probs.detach().float().reshape(-1, probs.shape[-1]).mean(0)
    return mean_entropy(p)
