"""CAE's latent regressor and masked-only decoder (Chen et al., "Context Autoencoder", IJCV 2023; Atten4Vis/CAE).

Regressor: cross-attention only, no self-attention among the visible tokens. The queries are the masked patches'
current estimates (mask tokens at the start) plus their position embeddings. Keys and values are
concat(visible latents, queries). Position embeddings go into the keys, never into the values: a value carries
only the content of its token, and the position decides only where attention goes. q, k and v each get their
own LayerNorm. A block is
    x = x + gamma_1 * CrossAttn(LN_q(x + pos_q), LN_k(kv + pos_kv), LN_v(kv))
    x = LN(x)
    x = x + gamma_2 * MLP(x)
with layer-scale gamma initialised to 0.1. Note the post-norm in the middle (the reference's norm2_cross
replaces the residual stream before the MLP). The output gets a final LN. The key projection has no bias, as
in the reference: a bias on k would add the same term to every logit of a query and cancel in the softmax.

Decoder: plain pre-norm ViT blocks with layer-scale over the predicted latents of the masked patches plus
their position embeddings. It gets nothing else, so it never attends to the visible tokens. Then LN and a
linear head.

mimkit.models.cross_decoder.CrossAttention does not fit here: it computes k and v from one memory with one
projection, so it cannot give the keys position embeddings while keeping them out of the values.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Block

from mimkit.models.pos_embed import sincos_2d
from mimkit.models.vit import init_mae_weights


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x [B, N, D] (or [1, N, D], broadcast) at positions ids Long[B, T] -> [B, T, D]."""
    x = x.expand(ids.shape[0], -1, -1)
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class CAECrossAttention(nn.Module):
    """Multi-head attention whose queries, keys and values come from three separate inputs, each with its own
    projection (q and v biased, k not)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"regressor width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, t, d = q.shape
        h = self.num_heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(b, x.shape[1], h, d // h).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q(q)), heads(self.k(k)), heads(self.v(v)))
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class RegressorBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, layer_scale: float = 0.1):
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.norm_q, self.norm_k, self.norm_v = norm_layer(dim), norm_layer(dim), norm_layer(dim)
        self.cross_attn = CAECrossAttention(dim, num_heads)
        self.norm_mid = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.gamma_1 = nn.Parameter(torch.full((dim,), float(layer_scale)))
        self.gamma_2 = nn.Parameter(torch.full((dim,), float(layer_scale)))

    def forward(self, queries: torch.Tensor, context: torch.Tensor, pos_queries: torch.Tensor,
                pos_context: torch.Tensor) -> torch.Tensor:
        """queries [B, M, D] (masked estimates), context [B, V, D] (visible latents), with their position
        embeddings -> updated queries [B, M, D]."""
        kv = torch.cat([context, queries], dim=1)
        pos_kv = torch.cat([pos_context, pos_queries], dim=1)
        attended = self.cross_attn(self.norm_q(queries + pos_queries), self.norm_k(kv + pos_kv), self.norm_v(kv))
        x = self.norm_mid(queries + self.gamma_1 * attended)
        return x + self.gamma_2 * self.mlp(x)


class LayerScaleBlock(Block):
    """timm's pre-norm Block with layer-scale (CAE's decoder block, init 0.1)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, layer_scale: float = 0.1):
        super().__init__(dim, num_heads, mlp_ratio, qkv_bias=True, init_values=layer_scale,
                         norm_layer=partial(nn.LayerNorm, eps=1e-6))


def _reset_layer_scale(module: nn.Module, value: float) -> None:
    # init_mae_weights leaves parameters that are not Linear/LayerNorm alone, but set the scales explicitly so
    # the initial value does not depend on which initialiser ran last
    for m in module.modules():
        if isinstance(m, RegressorBlock):
            nn.init.constant_(m.gamma_1, value)
            nn.init.constant_(m.gamma_2, value)
        elif isinstance(m, LayerScaleBlock):
            nn.init.constant_(m.ls1.gamma, value)
            nn.init.constant_(m.ls2.gamma, value)


class CAERegressor(nn.Module):
    """Predicts the latents of masked patches from the visible ones. Owns the mask token and the fixed sin-cos
    position embeddings that the regressor and the decoder share (CAE's `rd_pos_embed`)."""

    def __init__(self, grid_shape: tuple[int, int], dim: int, depth: int = 4, num_heads: int = 12,
                 mlp_ratio: float = 4.0, layer_scale: float = 0.1):
        super().__init__()
        self.grid_shape = tuple(grid_shape)
        self.dim = dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        pos = sincos_2d(dim, self.grid_shape)[None]
        self.pos_embed = nn.Parameter(pos, requires_grad=False)  # [1, N, dim], patches only
        self.blocks = nn.ModuleList([RegressorBlock(dim, num_heads, mlp_ratio, layer_scale) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        init_mae_weights(self)
        _reset_layer_scale(self, layer_scale)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def positions(self, ids: torch.Tensor) -> torch.Tensor:
        """Position embeddings of patches ids Long[B, T] -> [B, T, dim]."""
        return gather_tokens(self.pos_embed, ids)

    def forward(self, visible: torch.Tensor, ids_visible: torch.Tensor, ids_masked: torch.Tensor) -> torch.Tensor:
        """visible [B, V, dim]: the encoder's patch latents (no class token) at patches ids_visible Long[B, V];
        -> predicted latents [B, M, dim] of patches ids_masked Long[B, M]."""
        pos_v, pos_m = self.positions(ids_visible), self.positions(ids_masked)
        x = self.mask_token.to(visible.dtype).expand(ids_masked.shape[0], ids_masked.shape[1], -1)
        for block in self.blocks:
            x = block(x, visible, pos_m, pos_v)
        return self.norm(x)


class MaskedOnlyDecoder(nn.Module):
    """Self-attention over the masked patches' predicted latents plus position embeddings, then LN and a
    linear head to `out_dim` target values per patch."""

    def __init__(self, dim: int, out_dim: int, depth: int = 4, num_heads: int = 12, mlp_ratio: float = 4.0,
                 layer_scale: float = 0.1):
        super().__init__()
        self.blocks = nn.Sequential(*[LayerScaleBlock(dim, num_heads, mlp_ratio, layer_scale) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, out_dim)
        init_mae_weights(self)
        _reset_layer_scale(self, layer_scale)

    def forward(self, latents: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """latents [B, M, dim] and their position embeddings [B, M, dim] -> predictions [B, M, out_dim]."""
        return self.head(self.norm(self.blocks(latents + pos)))
