"""The JEPA predictor (I-JEPA's `VisionTransformerPredictor`) with a pluggable query construction.

Context tokens (context-encoder outputs, width D) are mapped by `predictor_embed` (Linear D -> Dp) and given the
predictor's fixed 2-D sin-cos position embedding. For every target block, one query token per target patch is
built from that patch's position embedding by a `QueryNoise` piece; the predictor runs context + queries of one
block per sequence through its blocks, a LayerNorm and Linear Dp -> D, and returns the outputs at the queries.

Query pieces (all noise-free in eval mode, and all noise is drawn from the images' seeds):
  MaskTokenQueries  I-JEPA: query = pos + mask_token (learnable).
  StoPQueries       StoP / FlexPredict (Bar et al., ICML 2024; amirbar/StoP `src/deit.py`): query =
                    pos + predictor_embed(n), n ~ N(0, sigma^2 I) in the ENCODER width. The noise goes through the
                    same matrix A that embeds the context, so the model cannot shrink the noise without shrinking
                    its context too (the paper's argument); no mask token is added, as in the reference (the bias
                    of predictor_embed plays its part: at sigma 0 StoP is I-JEPA with mask_token = that bias).
  DiffusionQueries  N-JEPA ("Improving JEPA with Diffusion Noise", Qiu et al. 2024/25; no code released). The
                    abstract says only that diffusion noise enters through the position embedding of the masked
                    tokens, with a multi-level noise schedule. Our reading: each target block of each image draws a
                    level t uniformly from 1..L, and its queries are the variance-preserving diffusion forward step
                    applied to their position embeddings,
                        query = mask_token + sqrt(1 - sigma_t^2) * pos + sigma_t * s * eps,  eps ~ N(0, I) (width Dp)
                    with sigma_t = sigma_max * t / L (a linear schedule over L levels) and s the RMS of the
                    position-embedding entries (so sigma_t is relative to the signal it corrupts). Level 0 (eval)
                    is the I-JEPA query. The level is not embedded (the predictor is not told t).
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from mimkit import rng
from mimkit.models.pos_embed import sincos_2d

# rng streams of the query noise (masking.multiblock uses 41)
STOP_STREAM = 42
LEVEL_STREAM = 43
DIFFUSION_STREAM = 44


def seeded_normal(seeds: torch.Tensor, n: int, stream: int) -> torch.Tensor:
    """Float32 N(0, 1) noise [B, n]: row b depends only on (seeds[b], stream) (Box-Muller on mimkit.rng's
    counter-based uniforms, so it is the same whichever batch or device the image is in)."""
    u = rng.uniform(seeds, 2 * n, stream=stream)
    radius = torch.sqrt(-2.0 * torch.log1p(-u[:, :n]))  # 1 - u in (0, 1]: finite
    return radius * torch.cos(2.0 * math.pi * u[:, n:])


def _need_seeds(seeds: torch.Tensor | None, what: str) -> torch.Tensor:
    if seeds is None:
        raise ValueError(f"{what} draws its noise from the images' seeds: pass seeds in training mode")
    return seeds


class MaskTokenQueries(nn.Module):
    """I-JEPA: every query is the learnable mask token plus its position embedding."""

    def __init__(self, dim: int):
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, pos: torch.Tensor, embed: nn.Linear, seeds: torch.Tensor | None) -> torch.Tensor:
        return pos + self.mask_token.to(pos.dtype)


class StoPQueries(nn.Module):
    """StoP: pos + predictor_embed(n), n ~ N(0, sigma^2) in the encoder width, shared A = predictor_embed."""

    def __init__(self, sigma: float = 0.25):
        super().__init__()
        if sigma < 0:
            raise ValueError(f"StoP sigma must be >= 0, got {sigma}")
        self.sigma = float(sigma)

    def noise(self, seeds: torch.Tensor | None, shape: tuple[int, ...], device, dtype) -> torch.Tensor:
        """n for queries of `shape` [B, K, T, D]: sigma * N(0, 1) from each image's seed; zeros in eval mode."""
        if not self.training or self.sigma == 0.0:
            return torch.zeros(shape, device=device, dtype=dtype)
        seeds = _need_seeds(seeds, "StoP")
        n = seeded_normal(seeds, math.prod(shape[1:]), STOP_STREAM).view(shape)
        return (self.sigma * n).to(device=device, dtype=dtype)

    def forward(self, pos: torch.Tensor, embed: nn.Linear, seeds: torch.Tensor | None) -> torch.Tensor:
        n = self.noise(seeds, (*pos.shape[:-1], embed.in_features), pos.device, pos.dtype)
        return pos + embed(n)


class DiffusionQueries(nn.Module):
    """N-JEPA (our reading, see the module docstring): per (image, target block) a level t in 1..L, queries
    mask_token + sqrt(1 - sigma_t^2) pos + sigma_t * pos_scale * eps. Eval mode: level 0, the I-JEPA query."""

    def __init__(self, dim: int, levels: int = 4, sigma_max: float = 0.5, pos_scale: float = 1.0):
        super().__init__()
        if levels < 1 or not 0.0 <= sigma_max <= 1.0:
            raise ValueError(f"N-JEPA needs levels >= 1 and sigma_max in [0, 1], got {levels}, {sigma_max}")
        self.levels, self.sigma_max, self.pos_scale = int(levels), float(sigma_max), float(pos_scale)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def schedule(self) -> torch.Tensor:
        """sigma_t for t = 0..L (float64): 0 (no noise, eval) then sigma_max * t / L."""
        return self.sigma_max * torch.arange(self.levels + 1, dtype=torch.float64) / self.levels

    def draw_levels(self, seeds: torch.Tensor, num_blocks: int) -> torch.Tensor:
        """Long[B, K]: each target block's level, uniform over 1..L from the image's seed."""
        u = rng.uniform(seeds, num_blocks, stream=LEVEL_STREAM)
        return (u * self.levels).long().clamp_max(self.levels - 1) + 1

    def forward(self, pos: torch.Tensor, embed: nn.Linear, seeds: torch.Tensor | None) -> torch.Tensor:
        token = self.mask_token.to(pos.dtype)
        if not self.training or self.sigma_max == 0.0:
            return pos + token
        seeds = _need_seeds(seeds, "N-JEPA")
        b, k, t, d = pos.shape
        sigma = self.schedule()[self.draw_levels(seeds, k)].to(device=pos.device, dtype=pos.dtype)  # [B, K]
        sigma = sigma.view(b, k, 1, 1)
        eps = seeded_normal(seeds, k * t * d, DIFFUSION_STREAM).view(b, k, t, d).to(device=pos.device, dtype=pos.dtype)
        return token + torch.sqrt(1.0 - sigma**2) * pos + sigma * self.pos_scale * eps


def position_rms(dim: int, grid_shape: tuple[int, int]) -> float:
    """RMS of the entries of the predictor's sin-cos position table (about 1/sqrt(2)): the scale N-JEPA's
    noise is measured against."""
    return float(sincos_2d(dim, tuple(grid_shape)).pow(2).mean().sqrt())


class JEPAPredictor(nn.Module):
    """context [B, C, D] at patches context_ids [B, C] -> predictions [B, K, T, D] at target_ids [B, K, T]."""

    def __init__(self, grid_shape: tuple[int, int], encoder_dim: int, dim: int = 384, depth: int = 6,
                 num_heads: int = 12, mlp_ratio: float = 4.0, queries: nn.Module | None = None):
        super().__init__()
        self.grid_shape = tuple(grid_shape)
        self.predictor_embed = nn.Linear(encoder_dim, dim)
        pos = sincos_2d(dim, self.grid_shape)  # [N, Dp], raster order
        self.register_buffer("pos_embed", pos, persistent=False)
        self.pos_scale = position_rms(dim, self.grid_shape)
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.Sequential(
            *[Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)]
        )
        self.norm = norm_layer(dim)
        self.proj = nn.Linear(dim, encoder_dim)
        self._init_weights()
        # made after the init so a piece's own init (the mask token's) is kept
        self.queries = queries if queries is not None else MaskTokenQueries(dim)

    def _init_weights(self) -> None:
        """I-JEPA's predictor init: trunc-normal(0.02) Linear weights, zero biases, and each block's residual
        output projections divided by sqrt(2 * layer) so deeper predictors start near the identity."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            for i, block in enumerate(self.blocks, start=1):
                block.attn.proj.weight.div_(math.sqrt(2.0 * i))
                block.mlp.fc2.weight.div_(math.sqrt(2.0 * i))

    @property
    def dim(self) -> int:
        return self.predictor_embed.out_features

    def forward(self, context: torch.Tensor, context_ids: torch.Tensor, target_ids: torch.Tensor,
                seeds: torch.Tensor | None = None) -> torch.Tensor:
        b, c, _ = context.shape
        _, k, t = target_ids.shape
        pos = self.pos_embed.to(context.dtype)
        x = self.predictor_embed(context) + pos[context_ids]                      # [B, C, Dp]
        q = self.queries(pos[target_ids], self.predictor_embed, seeds)             # [B, K, T, Dp]
        # one sequence per (image, target block): the image's context, then that block's queries
        tokens = torch.cat([x.unsqueeze(1).expand(b, k, c, x.shape[-1]), q], dim=2).reshape(b * k, c + t, -1)
        out = self.norm(self.blocks(tokens))[:, c:]
        return self.proj(out).view(b, k, t, -1)
