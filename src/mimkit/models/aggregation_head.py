"""BEiT v2's patch-aggregation branch ("CLS pretraining"), also CCViT's pixel branch.

A few extra transformer blocks run on [class token after the LAST block ; patch tokens after an EARLY block]
and their patch outputs predict the same targets as the last layer. The only route from the deep layers to
these predictions is the class token, so the loss pushes global information into it (BEiT v2 reports +LP).
The branch is training-only: it is not part of the encoder and is dropped at export.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from mimkit.models.vit import init_mae_weights


class PatchAggregationHead(nn.Module):
    """`depth` ViT blocks of the encoder's width. forward(last_cls [B, 1, D], early_patches [B, N, D]) ->
    [B, 1 + N, D] before any final norm (BEiT v2 shares the encoder's norm and LM head with this branch)."""

    def __init__(self, dim: int, num_heads: int, depth: int = 2, mlp_ratio: float = 4.0):
        super().__init__()
        if depth < 1:
            raise ValueError(f"the aggregation head needs at least one block, got depth={depth}")
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.Sequential(
            *[Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)])
        init_mae_weights(self)

    @classmethod
    def for_encoder(cls, encoder, depth: int = 2) -> "PatchAggregationHead":
        return cls(encoder.embed_dim, encoder.num_heads, depth, getattr(encoder, "mlp_ratio", 4.0))

    def forward(self, last_cls: torch.Tensor, early_patches: torch.Tensor) -> torch.Tensor:
        return self.blocks(torch.cat([last_cls, early_patches], dim=1))


def early_layer_index(early_layers: int | None, depth: int) -> int:
    """0-based block whose patch tokens feed the branch. `early_layers` counts blocks as BEiT v2 does (9 of 12
    for ViT-B: after the 9th block); None = three quarters of the depth, at least 1 and below the last."""
    n = min(max(1, round(0.75 * depth)), depth - 1) if early_layers is None else int(early_layers)
    if not 1 <= n < depth:
        raise ValueError(f"early_layers={early_layers} must be in [1, {depth - 1}] for a {depth}-block encoder")
    return n - 1
