"""MaskAlign's attention-sampled visible set (Xue et al., CVPR'23; OpenDriveLab/maskalign `attention_masking`).

The teacher's class-token attention to each patch is a distribution over patches; the V = int(N * (1 - ratio))
VISIBLE patches are drawn from it by multinomial sampling without replacement: the most attended patches are
the most likely to be seen (the opposite of AttMask, which hides them). The reference calls
`torch.multinomial(a, N, replacement=False)` on the global RNG; here the draw is the Gumbel-top-k form of the
same distribution (Gumbel-max applied k times = sequential draws without replacement, proportional to the
scores among the patches left): order the patches by log a_n + G_n, G_n = -log(-log u_n), and keep the first V.
The uniforms u come from `rng.uniform(seeds, N, stream)`, so image b's visible set is a pure function of
(scores[b], seeds[b]), whatever the batch.

Without scores (no teacher attention: `mask=random`) every patch weighs the same, and
the same draw is a uniform random subset: the random-visible fallback.
"""

from __future__ import annotations

import math

import torch

from mimkit import rng
from mimkit.masking.base import Mask

SAMPLE_STREAM = 0x4D414C  # "MAL": the Gumbel draws of the visible set


def gumbel_order(scores: torch.Tensor, seeds: torch.Tensor, stream: int = SAMPLE_STREAM) -> torch.Tensor:
    """Long[B, N]: each row's patches in the order sequential multinomial draws without replacement, with
    probability proportional to `scores` (non-negative [B, N]), would pick them. Zero-score patches come last."""
    b, n = scores.shape
    # half a step off 0: u in (0, 1), so the Gumbel noise stays finite
    u = rng.uniform(seeds, n, stream=stream).to(scores.device) + 0.5 / (1 << 24)
    gumbel = -torch.log(-torch.log(u))
    # log of a tiny floor rather than -inf: zero-score patches are still drawn (last, in random order) when V
    # exceeds the patches that have any attention, as multinomial would refuse to
    keys = scores.detach().double().clamp_min(1e-300).log() + gumbel.double()
    return torch.argsort(keys, dim=1, descending=True, stable=True)


class AttentionSampledMasking:
    """`masking(seeds Long[B], grid, scores [B, N] or None, stream) -> Mask` with V = int(N * (1 - ratio))
    visible patches per image; ids_keep lists them in raster order, ids_restore un-shuffles [visible; hidden]."""

    def __init__(self, ratio: float = 0.7):
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
        self.ratio = ratio

    def num_visible(self, num_patches: int) -> int:
        v = int(num_patches * (1 - self.ratio))
        if v < 1:
            raise ValueError(f"mask ratio {self.ratio} leaves no visible patch out of {num_patches}")
        return v

    @torch.no_grad()
    def __call__(self, seeds: torch.Tensor, grid, scores: torch.Tensor | None = None,
                 stream: int = SAMPLE_STREAM) -> Mask:
        n = grid if isinstance(grid, int) else math.prod(grid)
        if scores is None:
            scores = torch.ones(len(seeds), n, device=seeds.device)
        if scores.shape != (len(seeds), n):
            raise ValueError(f"scores of shape {tuple(scores.shape)} for {len(seeds)} images of {n} patches")
        if (scores < 0).any() or not torch.isfinite(scores).all():
            raise ValueError("attention scores must be finite and non-negative")
        v = self.num_visible(n)
        order = gumbel_order(scores, seeds, stream)
        visible, hidden = order[:, :v].sort(dim=1).values, order[:, v:].sort(dim=1).values
        ids_shuffle = torch.cat([visible, hidden], dim=1)
        masked = torch.ones(len(seeds), n, dtype=torch.bool, device=scores.device)
        masked.scatter_(1, visible, False)
        return Mask(masked=masked, ids_keep=visible, ids_restore=torch.argsort(ids_shuffle, dim=1))
