"""MoCo v3's heads and loss (Chen, Xie & He, ICCV 2021; facebookresearch/moco-v3 `moco/builder.py`).

The projector (3 layers for a ViT) and the predictor (2 layers) are MLPs of bias-free Linear layers with
BatchNorm + ReLU between them and a BatchNorm without affine parameters after the last layer (SimCLR's design,
which MoCo v3 keeps for both heads of a ViT). The contrastive loss is InfoNCE between the student's predictions q
and the momentum encoder's keys k of the other view: the positive of q[i] is k[i], every other key of the
(global) batch is a negative, and the cross-entropy is scaled by 2 * tau as the reference does.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from mimkit.models.byol_head import MLPHead


class MoCoMLP(nn.Module):
    """[B, in_dim] -> [B, out_dim]: MLPHead (Linear-BN-ReLU ... Linear, no biases) + BatchNorm1d(affine=False)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, depth: int):
        super().__init__()
        self.mlp = MLPHead(in_dim, hidden_dim, out_dim, depth)
        self.out_norm = nn.BatchNorm1d(out_dim, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        if self.training and x.shape[0] == 1 and type(self.out_norm) is nn.BatchNorm1d:
            # one sample has no batch statistics: use the running ones (as MLPHead does for its hidden norms)
            n = self.out_norm
            return F.batch_norm(x, n.running_mean, n.running_var, training=False, eps=n.eps)
        return self.out_norm(x)


@contextmanager
def batch_statistics(module: nn.Module):
    """Within the block, every BatchNorm of `module` normalises with the batch's own statistics (train mode).

    MoCo v3's momentum encoder runs in train mode, so its projector's BatchNorms use the statistics of the batch
    they see; an EMATeacher copy is kept in eval mode (running statistics). The running buffers the block
    updates are overwritten by the student's at the teacher's next EMA update (EMATeacher copies buffers)."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    modes = [m.training for m in norms]
    for m in norms:
        m.train()
    try:
        yield module
    finally:
        for m, mode in zip(norms, modes):
            m.train(mode)


@torch.no_grad()
def gather_keys(k: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(keys of every process concatenated in rank order, this process's offset in them); (k, 0) alone."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return k, 0
    parts = [torch.empty_like(k) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, k.contiguous())
    return torch.cat(parts), k.shape[0] * dist.get_rank()


def info_nce(q: torch.Tensor, k: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """MoCo v3's contrastive loss: 2 * tau * CE(cos(q, k_all) / tau, positives on the diagonal).

    q [B, D] (gets gradients), k [B, D] (detached; under torch.distributed the keys of all processes are the
    negatives, and q[i]'s positive is this process's k[i]). Cosine logits; mean over the B queries."""
    keys, offset = gather_keys(F.normalize(k.detach().float(), dim=-1))
    logits = F.normalize(q.float(), dim=-1) @ keys.T / temperature
    labels = torch.arange(q.shape[0], device=q.device) + offset
    return F.cross_entropy(logits, labels) * (2 * temperature)


@torch.no_grad()
def positive_is_nearest(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Share of queries whose most similar key (in the local batch) is their own positive: InfoNCE's top-1."""
    sim = F.normalize(q.detach().float(), dim=-1) @ F.normalize(k.detach().float(), dim=-1).T
    return (sim.argmax(1) == torch.arange(q.shape[0], device=q.device)).float().mean()
