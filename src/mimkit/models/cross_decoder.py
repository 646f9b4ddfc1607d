"""A decoder whose blocks cross-attend to encoder tokens ("memories"), one memory per cross-attention block.

CrossMAE/SelectiveMAE: the queries are mask tokens + position embeddings at just the patches to predict, and every
block reads the same memory (the encoder output), so each query's prediction does not depend on which other
patches are queried. Hi-End-MAE: the queries are MAE's full decoder sequence (visible tokens and mask tokens),
self-attention blocks run first, then each cross-attention block reads a different encoder layer.

LatentMIM: the queries are a mask token + a position-weighted average of the visible tokens
(`position_weighted_queries`) + position embeddings, every block has self-attention among the queries and
cross-attends to the same memory (the embedded visible tokens + position embeddings), normalised in the block.

Block layout (all reference repos): x += SelfAttn(LN(x)) [optional]; x += CrossAttn(LN(x), memory); x += MLP(LN(x)).
By default the memory is not normalised inside the block: SelectiveMAE feeds the encoder's normed output,
Hi-End-MAE a linear projection of raw (pre-norm) block outputs. LatentMIM's block normalises it
(`memory_norm=True`: CrossAttn(LN(x), LN_m(memory))), as its reference CrossBlock does.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Attention, Block

from mimkit.models.pos_embed import sincos_2d
from mimkit.models.vit import init_mae_weights


class CrossAttention(nn.Module):
    """Queries from the decoder stream [B, T, dim]; keys and values from a memory [B, S, memory_dim]."""

    def __init__(self, dim: int, memory_dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(memory_dim, 2 * dim, bias=qkv_bias)  # memory may be wider/narrower than the decoder
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.num_heads
        q = self.q(x).reshape(b, t, h, d // h).transpose(1, 2)
        k, v = self.kv(memory).reshape(b, memory.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


def position_attention(pos_q: torch.Tensor, pos_k: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """LatentMIM's CrossPositionAttentionStem, parameter-free: each query position's average of `values`
    [B, K, dim] weighted by softmax_k(pos_q . pos_k / sqrt(dim)) (pos_q [B, Q, dim], pos_k [B, K, dim]), i.e.
    the visible tokens near the query's position dominate: [B, Q, dim]."""
    logits = pos_q.float() @ pos_k.float().transpose(1, 2) * pos_q.shape[-1] ** -0.5
    return logits.softmax(dim=-1).to(values.dtype) @ values


class CrossAttentionBlock(nn.Module):
    def __init__(self, dim: int, memory_dim: int, num_heads: int, mlp_ratio: float = 4.0, self_attn: bool = False,
                 memory_norm: bool = False):
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.self_attn = Attention(dim, num_heads, qkv_bias=True) if self_attn else None
        self.norm0 = norm_layer(dim) if self_attn else None
        self.norm1 = norm_layer(dim)
        # created only when asked, so the other decoders' parameters (and checkpoints) are unchanged
        self.norm_memory = norm_layer(memory_dim) if memory_norm else None
        self.cross_attn = CrossAttention(dim, memory_dim, num_heads)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        if self.self_attn is not None:
            x = x + self.self_attn(self.norm0(x))
        if self.norm_memory is not None:
            memory = self.norm_memory(memory)
        x = x + self.cross_attn(self.norm1(x), memory)
        return x + self.mlp(self.norm2(x))


class CrossDecoder(nn.Module):
    """`self_depth` plain self-attention blocks, then one cross-attention block per entry of `memory_dims`
    (block i reads memory i), a final LayerNorm and a linear head to `out_dim` values per token.
    `memory_norm` gives every cross-attention block a LayerNorm on its memory (LatentMIM)."""

    def __init__(self, grid_shape: tuple[int, int], memory_dims: Sequence[int], out_dim: int, dim: int = 512,
                 num_heads: int = 16, self_depth: int = 0, cross_self_attn: bool = False, mlp_ratio: float = 4.0,
                 memory_norm: bool = False):
        super().__init__()
        if not memory_dims:
            raise ValueError("a cross decoder needs at least one cross-attention block")
        self.grid_shape = tuple(grid_shape)
        self.dim = dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        pos = sincos_2d(dim, self.grid_shape, cls_token=True)[None]
        self.pos_embed = nn.Parameter(pos, requires_grad=False)  # [1, 1 + N, dim], class-token row zero
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(
            [Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(self_depth)]
        )
        self.cross_blocks = nn.ModuleList(
            [CrossAttentionBlock(dim, m, num_heads, mlp_ratio, self_attn=cross_self_attn, memory_norm=memory_norm)
             for m in memory_dims]
        )
        self.norm = norm_layer(dim)
        self.pred = nn.Linear(dim, out_dim)
        init_mae_weights(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def queries(self, ids: torch.Tensor) -> torch.Tensor:
        """Mask tokens with the position embeddings of patches `ids` (Long[B, Q]): [B, Q, dim] (CrossMAE queries)."""
        pos = self.pos_embed[0, 1:, :][ids]
        return self.mask_token.to(pos.dtype) + pos

    def position_weighted_queries(self, ids: torch.Tensor, visible_ids: torch.Tensor,
                                  visible: torch.Tensor) -> torch.Tensor:
        """LatentMIM's queries at patches `ids` (Long[B, Q]): mask token + the position-weighted average of the
        `visible` tokens [B, V, dim] (at patches `visible_ids`, Long[B, V]; see `position_attention`) + position
        embedding: [B, Q, dim]. Each query starts from what is visible near it instead of one shared token."""
        table = self.pos_embed[0, 1:, :]
        pos_q, pos_k = table[ids], table[visible_ids]
        context = position_attention(pos_q, pos_k, visible)
        return self.mask_token.to(visible.dtype) + context + pos_q.to(visible.dtype)

    def fill(self, visible: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """MAE's decoder input: `visible` [B, 1 + V, dim] (class token first, keep order) plus mask tokens,
        un-shuffled to raster order with `ids_restore` (Long[B, N]), position embeddings added: [B, 1 + N, dim]."""
        b, n = ids_restore.shape
        fill = self.mask_token.to(visible.dtype).expand(b, n + 1 - visible.shape[1], -1)
        x = torch.cat([visible[:, 1:, :], fill], dim=1)
        x = torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, self.dim))
        return torch.cat([visible[:, :1, :], x], dim=1) + self.pos_embed.to(visible.dtype)

    def forward(self, x: torch.Tensor, memories: Sequence[torch.Tensor]) -> torch.Tensor:
        """x [B, T, dim] (queries or a full sequence) -> predictions [B, T, out_dim]; memories[i] [B, S_i, m_i]."""
        if len(memories) != len(self.cross_blocks):
            raise ValueError(
                f"{len(self.cross_blocks)} cross-attention blocks need as many memories, got {len(memories)}")
        for block in self.blocks:
            x = block(x)
        for block, memory in zip(self.cross_blocks, memories):
            x = block(x, memory)
        return self.pred(self.norm(x))
