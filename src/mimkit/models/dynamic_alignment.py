"""MaskAlign's Dynamic Alignment (Xue et al., CVPR'23; OpenDriveLab/maskalign `get_student`, fusion "linear").

A student of depth L records every block output S_1..S_L. The aligned output for layer i mixes them,
S'_i = sum_j W_ij S_j, with W a learnable [L, L] matrix initialised to I + 0.01 (each output starts as its own
layer plus a little of every other), so which student depth answers which teacher layer is learned rather than
fixed. A per-layer Linear head then maps D_s -> D_t. Only the rows of W for the aligned layers are used (the
reference computes all L and zero-weights the rest of the loss; the other rows never get a gradient either way).

`mixing=False` is the fixed identity (UTA, MaskAlign's "simple" fusion): no W at all, layer i is S_i.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class DynamicAlignment(nn.Module):
    """forward([S_0..S_{L-1}] each [B, T, D_s]) -> [head_k(S'_{aligned[k]})] each [B, T, D_t]."""

    def __init__(self, num_layers: int, student_dim: int, teacher_dim: int, aligned: list[int],
                 mixing: bool = True):
        super().__init__()
        if any(not 0 <= i < num_layers for i in aligned) or len(set(aligned)) != len(aligned):
            raise ValueError(f"aligned layers {aligned} must be distinct 0-based indices below {num_layers}")
        self.num_layers, self.aligned = num_layers, list(aligned)
        self.mixing = nn.Parameter(torch.eye(num_layers) + 0.01) if mixing else None
        self.heads = nn.ModuleList(nn.Linear(student_dim, teacher_dim) for _ in aligned)
        for head in self.heads:  # MAE-style Linear init, as the reference's initialize_weights
            nn.init.xavier_uniform_(head.weight)
            nn.init.zeros_(head.bias)

    def mix(self, layers: list[torch.Tensor]) -> list[torch.Tensor]:
        """The aligned layers' S'_i (before the heads)."""
        if len(layers) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} student layers, got {len(layers)}")
        if self.mixing is None:
            return [layers[i] for i in self.aligned]
        stacked = torch.stack(layers)                                   # [L, B, T, D]
        w = self.mixing[self.aligned].to(stacked.dtype)                 # [k, L]
        mixed = torch.einsum("kl,lbtd->kbtd", w, stacked)
        return list(mixed.unbind(0))

    def forward(self, layers: list[torch.Tensor]) -> list[torch.Tensor]:
        return [head(s) for head, s in zip(self.heads, self.mix(layers))]
