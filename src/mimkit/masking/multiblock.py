"""I-JEPA's multi-block masking (Assran et al., CVPR 2023; facebookresearch/ijepa `src/masks/multiblock.py`).

Per batch: one target block size (scale U(0.15, 0.2) of the grid, aspect h/w U(0.75, 1.5)) and one context
block size (scale U(0.85, 1), aspect 1), as the reference's collator draws them. Per image: `num_targets` target
rectangles of that size placed independently (they may overlap each other), and one context rectangle with every
target removed from it. The encoder sees the context; the predictor predicts the teacher's features of each
target block. If after `attempts` placements the context keeps no more than `min_keep` patches, the last target's
exclusion is dropped and the search goes on (the reference's relaxation), so a context always exists.

Block sizes: max_keep = int(N * scale), h = round(sqrt(max_keep * aspect)), w = round(sqrt(max_keep / aspect)),
each side then cut to at most grid side - 1 (the reference's rule: a block is strictly smaller than the grid).

Every target block of a batch has the same size, so the targets tensor [B, num_targets, h * w] holds whole
rectangles. Context counts still vary from image to image (targets are cut out of it), so, as the reference's
collator does, every image keeps only the first (raster order) `c_min` context patches, the smallest count in
the batch.

Where the randomness comes from: the batch's two sizes from `rng.generator(size_key, 45)`, where `size_key` is
the training step when the method passes it (I-JEPA does: every rank and every micro-batch of one optimizer
step then draws the same sizes, as the reference's shared iteration counter gives), else a hash of the batch's
sorted seeds; each image's placements from `rng.generator(seed, 41)`.

Differences from the reference, all deliberate:
  - the size key is the optimizer step (the reference counts collator calls, from 0 in every run);
  - scale and aspect are independent draws (the reference reuses one uniform for both, so big blocks are always
    the tall ones);
  - the top-left corner is uniform over every position where the block fits (the reference's
    randint(0, H - h) never puts a block against the bottom or right edge);
  - `min_keep` bounds only the context (target blocks are whole rectangles, their count is their area); below
    1 it is a fraction of N, from 1 a count. The default stays the reference's count of 10 rather than its
    share of 196 patches: 5% of a 7x7 grid is 2 patches, and since the batch is trimmed to its smallest
    context, that would leave the predictor almost nothing to work from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mimkit import rng
from mimkit.masking.base import Mask

Rect = tuple[int, int, int, int]  # (top, left, height, width) in patches


@dataclass
class MultiBlockMask:
    """Patch indices (raster order within each block) of a batch's context and target blocks."""

    context: torch.Tensor   # Long[B, C]: patches the encoder sees
    targets: torch.Tensor   # Long[B, K, T]: patches of each target block, K blocks per image
    num_patches: int

    def target_union(self) -> torch.Tensor:
        """Bool[B, N]: patches in any target block."""
        b = self.targets.shape[0]
        out = torch.zeros(b, self.num_patches, dtype=torch.bool, device=self.targets.device)
        return out.scatter(1, self.targets.reshape(b, -1), True)

    def as_mask(self) -> Mask:
        """A Mask for pictures: `masked` marks the predicted patches (the union of the target blocks) and
        `ids_keep` the context. Note that patches in neither are hidden from the encoder but not predicted."""
        return Mask(masked=self.target_union(), ids_keep=self.context)


def block_size(num_patches: int, grid_shape: tuple[int, int], scale: float, aspect: float) -> tuple[int, int]:
    """(h, w) of a block of `scale` of the grid's patches with height/width ratio `aspect` (reference rule)."""
    gh, gw = grid_shape
    max_keep = int(num_patches * scale)
    h = int(round(math.sqrt(max_keep * aspect)))
    w = int(round(math.sqrt(max_keep / aspect)))
    return max(1, min(h, gh - 1)), max(1, min(w, gw - 1))


class MultiBlockMasking:
    """Context and target blocks over a `gh x gw` grid, one torch.Generator per image from its seed.

    num_targets: target blocks per image (I-JEPA: 4).
    target_scale / target_aspect: (min, max) of a target block's share of the grid and of its h/w ratio.
    context_scale / context_aspect: the same for the context block (I-JEPA: (0.85, 1.0) and (1, 1)).
    min_keep: the context must keep more than this many patches (fraction of N if < 1, else a count).
    allow_overlap: keep the targets inside the context (the reference's option; off in I-JEPA).
    attempts: context placements tried before one target's exclusion is dropped (reference: 20).
    """

    stream = 41  # rng stream of the per-image generator (random: 1, coarse: 2, block: 3)
    size_stream = 45  # rng stream of the per-batch size generator (models.predictor uses 42-44)

    def __init__(self, num_targets: int = 4, target_scale: tuple[float, float] = (0.15, 0.2),
                 target_aspect: tuple[float, float] = (0.75, 1.5), context_scale: tuple[float, float] = (0.85, 1.0),
                 context_aspect: tuple[float, float] = (1.0, 1.0), min_keep: float = 10,
                 allow_overlap: bool = False, attempts: int = 20):
        if num_targets < 1:
            raise ValueError(f"num_targets must be at least 1, got {num_targets}")
        for name, (lo, hi) in (("target_scale", target_scale), ("context_scale", context_scale)):
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"{name} must be (min, max) with 0 < min <= max <= 1, got {(lo, hi)}")
        for name, (lo, hi) in (("target_aspect", target_aspect), ("context_aspect", context_aspect)):
            if not 0.0 < lo <= hi:
                raise ValueError(f"{name} must be (min, max) with 0 < min <= max, got {(lo, hi)}")
        if min_keep < 0 or attempts < 1:
            raise ValueError(f"min_keep must be >= 0 and attempts >= 1, got {min_keep}, {attempts}")
        self.num_targets = num_targets
        self.target_scale, self.target_aspect = tuple(target_scale), tuple(target_aspect)
        self.context_scale, self.context_aspect = tuple(context_scale), tuple(context_aspect)
        self.min_keep, self.allow_overlap, self.attempts = min_keep, allow_overlap, attempts

    def min_keep_count(self, num_patches: int) -> int:
        return int(round(self.min_keep * num_patches)) if self.min_keep < 1 else int(self.min_keep)

    @staticmethod
    def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
        return lo + (hi - lo) * torch.rand(1, generator=g, dtype=torch.float64).item()

    def _size(self, g, grid_shape, scale, aspect) -> tuple[int, int]:
        s = self._uniform(g, *scale)
        a = self._uniform(g, *aspect)
        return block_size(grid_shape[0] * grid_shape[1], grid_shape, s, a)

    @staticmethod
    def _place(g: torch.Generator, grid_shape, h: int, w: int) -> tuple[int, int]:
        gh, gw = grid_shape
        top = int(torch.randint(0, gh - h + 1, (1,), generator=g))
        left = int(torch.randint(0, gw - w + 1, (1,), generator=g))
        return top, left

    def sizes(self, g: torch.Generator, grid_shape: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        """((h, w) of the target blocks, (h, w) of the context block) for one batch."""
        target = self._size(g, grid_shape, self.target_scale, self.target_aspect)
        context = self._size(g, grid_shape, self.context_scale, self.context_aspect)
        return target, context

    def batch_sizes(self, seeds: torch.Tensor, grid_shape: tuple[int, int], size_key: int | None = None):
        """The batch's sizes from `size_key` (the training step), or from a hash of its sorted seeds."""
        key = int(size_key) if size_key is not None else rng.combine(*sorted(seeds.tolist()))
        return self.sizes(rng.generator(key, self.size_stream), grid_shape)

    def sample(self, g: torch.Generator, grid_shape: tuple[int, int],
               sizes: tuple[tuple[int, int], tuple[int, int]]) -> tuple[torch.Tensor, list[Rect], Rect, int]:
        """One image with the batch's `sizes` (from `sizes()`): (context Bool[gh, gw], target rectangles, the
        context rectangle before the cut, how many targets' exclusions had to be dropped (the last ones) to
        leave the context more than min_keep patches)."""
        gh, gw = grid_shape
        (th, tw), (h, w) = sizes
        targets: list[Rect] = []
        for _ in range(self.num_targets):
            top, left = self._place(g, grid_shape, th, tw)
            targets.append((top, left, th, tw))
        allowed = []  # per target: True outside it
        for top, left, bh, bw in targets:
            region = torch.ones(gh, gw, dtype=torch.bool)
            region[top: top + bh, left: left + bw] = False
            allowed.append(region)
        need = self.min_keep_count(gh * gw)
        dropped, left_tries = 0, self.attempts
        while True:
            top, left = self._place(g, grid_shape, h, w)
            context = torch.zeros(gh, gw, dtype=torch.bool)
            context[top: top + h, left: left + w] = True
            kept = 0 if self.allow_overlap else max(len(allowed) - dropped, 0)
            for region in allowed[:kept]:
                context &= region
            # with no exclusion left the whole block is the context, whatever min_keep says (no endless loop)
            if int(context.sum()) > need or kept == 0:
                return context, targets, (top, left, h, w), min(dropped, len(allowed))
            left_tries -= 1
            if left_tries == 0:
                dropped, left_tries = dropped + 1, self.attempts

    def __call__(self, seeds: torch.Tensor, grid_shape: tuple[int, int],
                 size_key: int | None = None) -> MultiBlockMask:
        """Context [B, c_min] (raster order, trimmed to the batch's smallest count) and whole target blocks
        [B, K, h * w]; the sizes come from `size_key` (see `batch_sizes`), image b's placements from
        `rng.generator(seeds[b], stream=41)`."""
        gh, gw = int(grid_shape[0]), int(grid_shape[1])
        sizes = self.batch_sizes(seeds, (gh, gw), size_key)
        contexts, targets = [], []
        for s in seeds.tolist():
            context, rects, _, _ = self.sample(rng.generator(int(s), self.stream), (gh, gw), sizes)
            contexts.append(context.view(-1).nonzero().view(-1))
            targets.append(torch.stack([_rect_indices(r, gw) for r in rects]))
        c_min = min(len(c) for c in contexts)
        device = seeds.device
        context = torch.stack([c[:c_min] for c in contexts]).to(device)
        return MultiBlockMask(context=context, targets=torch.stack(targets).to(device), num_patches=gh * gw)


def _rect_indices(rect: Rect, gw: int) -> torch.Tensor:
    """Raster indices of a rectangle's patches, in raster order."""
    top, left, h, w = rect
    rows = torch.arange(top, top + h).view(-1, 1)
    cols = torch.arange(left, left + w).view(1, -1)
    return (rows * gw + cols).view(-1)
