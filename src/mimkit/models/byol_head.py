"""BYOL-style MLP heads: the projector and predictor of BYOL, SimSiam and LUT's broader-context objective.

Linear (no bias) -> BatchNorm1d -> ReLU, repeated depth - 1 times, then a last Linear (no bias) with no norm, as
LUT's `_build_mlp` (naver-ai/lut) and BYOL's projector. Batch statistics are what keeps such heads from
collapsing, so the norm is a plain nn.BatchNorm1d: the engine may convert it to SyncBatchNorm under DDP.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mimkit.models.vit import init_mae_weights


class MLPHead(nn.Module):
    """[B, in_dim] -> [B, out_dim] through `depth` Linear layers of width `hidden_dim` (BN + ReLU between)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, depth: int = 2):
        super().__init__()
        if depth < 1:
            raise ValueError(f"an MLP head needs at least one layer, got depth={depth}")
        layers: list[nn.Module] = []
        for i in range(depth):
            a = in_dim if i == 0 else hidden_dim
            b = out_dim if i == depth - 1 else hidden_dim
            layers.append(nn.Linear(a, b, bias=False))
            if i < depth - 1:
                layers += [nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
        self.layers = nn.Sequential(*layers)
        init_mae_weights(self)  # xavier-uniform Linear weights, as the reference initialises its whole model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and x.shape[0] == 1):
            return self.layers(x)
        # one sample has no batch statistics (nn.BatchNorm1d raises); normalise it with the running ones instead.
        # Only plain BatchNorm1d: a SyncBatchNorm (DDP) takes the statistics of the global batch and must be
        # called on every process alike.
        for layer in self.layers:
            if type(layer) is nn.BatchNorm1d:
                x = F.batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias,
                                 training=False, eps=layer.eps)
            else:
                x = layer(x)
        return x
