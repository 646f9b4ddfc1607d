"""The DINO / iBOT projection head: MLP -> L2 normalisation -> weight-normalised linear map to K prototypes.

One head serves every token it is given (iBOT's `shared_head`: the class token and the patch tokens go through
the same weights), so `forward` accepts any leading shape [..., D] -> [..., K]. The last layer's rows are unit
vectors times a gain (torch's weight_norm with dim 0); with `norm_last_layer` the gain is fixed at 1 (DINO's
default, steadier), otherwise it is learned (iBOT's ViT-S recipe). Reference widths: hidden 2048, bottleneck 256,
K 8192 (iBOT) / 65536 (DINO); small-scale ports shrink them (card 0.6: K 1024-4096).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class WeightNormLinear(nn.Module):
    """Bias-free linear map whose weight is g_k * v_k / ||v_k|| per output k (weight_norm, dim 0).

    `frozen` (set by the method during the first share of training, DINO's `freeze_last_layer`) routes a zero
    gradient to v and g instead of none: the output is the same, the weights do not move under Adam (zero first
    moment), and every parameter still takes part in the backward pass, which DDP without
    find_unused_parameters requires."""

    def __init__(self, in_dim: int, out_dim: int, fixed_norm: bool = True):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        # nn.Linear's default initialisation, as the reference wraps a freshly made nn.Linear in weight_norm
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))
        # 1-D gain: the optimizer's no-decay rule (ndim <= 1) leaves it alone
        self.weight_g = None if fixed_norm else nn.Parameter(torch.ones(out_dim))
        self.frozen = False

    def weight(self) -> torch.Tensor:
        v = self.weight_v
        g = self.weight_g
        if self.frozen:
            v = v.detach() + v * 0.0
            g = None if g is None else g.detach() + g * 0.0
        w = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return w if g is None else w * g.unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight())


class DINOHead(nn.Module):
    """Linear-GELU (x nlayers-1) -> Linear to the bottleneck -> L2 norm -> WeightNormLinear to `out_dim`."""

    def __init__(self, in_dim: int, out_dim: int = 1024, hidden_dim: int = 512, bottleneck_dim: int = 128,
                 nlayers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"the head needs at least one layer, got nlayers={nlayers}")
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):  # the reference's init: trunc_normal(.02), zero bias
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fixed_norm=norm_last_layer)

    @property
    def out_dim(self) -> int:
        return self.last_layer.weight_v.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens [..., D] -> prototype logits [..., K] (cosine similarities times the gain)."""
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))
