"""BEiT's block-wise masking (Bao et al., 2022; BEiT v2's `MaskingGenerator`, also CAE, iBOT "block", MaskFeat).

Rectangles of random area and aspect ratio are hidden one after another until the target count M is reached;
BEiT v2 then forces exactly M hidden patches per image (`exact=True`) by hiding or revealing random single
patches. iBOT keeps the count the blocks happened to reach (`exact=False`; never more than M).
"""

from __future__ import annotations

import math

import torch

from mimkit import rng
from mimkit.masking.base import Mask

Block = tuple[int, int, int, int]  # (top, left, height, width) in patches


class BlockMasking:
    """Block-wise masks over a `gh x gw` patch grid, one torch.Generator per image seeded from its seed.

    ratio: M = round(ratio * N) patches to hide (BEiT v2: 75 of 196 ~= 0.38).
    min_area: smallest block area; a value below 1 is a fraction of N (the small-scale port of BEiT v2's 16 of
        196 ~= 0.08N, and never under 2 patches), a value of 1 or more is a patch count (BEiT v2: 16, BEiT: 4).
    max_area: largest block area, same convention; None = M (BEiT's default).
    aspect: (min, max) of the block's height/width ratio, drawn log-uniformly (BEiT: 0.3 to 1/0.3).
    exact: fix the count to exactly M per image (BEiT v2); False keeps the blocks' count (iBOT, BEiT v1).
    """

    stream = 3  # rng stream of the per-image generator (random: 1, coarse: 2)

    def __init__(self, ratio: float = 0.4, min_area: float = 0.08, max_area: float | None = None,
                 aspect: tuple[float, float] = (0.3, 1 / 0.3), exact: bool = True, attempts: int = 10):
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
        if min_area <= 0 or (max_area is not None and max_area <= 0):
            raise ValueError(f"block areas must be positive, got min_area={min_area}, max_area={max_area}")
        lo, hi = aspect
        if not 0 < lo <= hi:
            raise ValueError(f"aspect must be (min, max) with 0 < min <= max, got {aspect}")
        self.ratio, self.min_area, self.max_area, self.exact, self.attempts = ratio, min_area, max_area, exact, attempts
        self.log_aspect = (math.log(lo), math.log(hi))

    def num_masked(self, num_patches: int) -> int:
        """M = round(ratio * N) (half up), kept within [1, N - 1]."""
        return min(max(1, math.floor(self.ratio * num_patches + 0.5)), num_patches - 1)

    @staticmethod
    def _area(value: float, num_patches: int, floor: int) -> int:
        return max(floor, round(value * num_patches)) if value < 1 else int(value)

    def area_bounds(self, num_patches: int) -> tuple[int, int]:
        m = self.num_masked(num_patches)
        hi = m if self.max_area is None else self._area(self.max_area, num_patches, 1)
        return self._area(self.min_area, num_patches, 2), hi

    def blocks(self, g: torch.Generator, grid_shape: tuple[int, int]) -> tuple[torch.Tensor, list[Block]]:
        """The blocks phase alone: (Bool[gh, gw] union of the blocks, the accepted blocks in order).

        Each round draws up to `attempts` blocks (area ~ U(min_area, remaining), log-uniform aspect, uniform
        corner) and accepts the first that hides between 1 and `remaining` new patches; rounds stop at M or when
        a round accepts nothing. As in BEiT, a block must be strictly smaller than the grid on each side."""
        gh, gw = grid_shape
        n = gh * gw
        target = self.num_masked(n)
        min_area, max_area = self.area_bounds(n)
        grid = torch.zeros(gh, gw, dtype=torch.bool)
        accepted: list[Block] = []
        count = 0
        while count < target:
            remaining = min(target - count, max_area)
            added = 0
            for _ in range(self.attempts):
                u_area, u_aspect, u_top, u_left = torch.rand(4, generator=g, dtype=torch.float64).tolist()
                # random.uniform(min, remaining) as in BEiT: also valid (and shrinking) when remaining < min
                area = min_area + (remaining - min_area) * u_area
                aspect = math.exp(self.log_aspect[0] + (self.log_aspect[1] - self.log_aspect[0]) * u_aspect)
                h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
                if not (0 < h < gh and 0 < w < gw):
                    continue
                top, left = int(u_top * (gh - h + 1)), int(u_left * (gw - w + 1))
                window = grid[top: top + h, left: left + w]
                new = h * w - int(window.sum())
                if 0 < new <= remaining:
                    window.fill_(True)
                    accepted.append((top, left, h, w))
                    added = new
                    break
            if added == 0:
                break
            count += added
        return grid, accepted

    def sample(self, g: torch.Generator, grid_shape: tuple[int, int]) -> torch.Tensor:
        """One image's Bool[gh, gw] mask: the blocks, then (when exact) random single patches hidden or revealed
        until exactly M are hidden."""
        grid, _ = self.blocks(g, grid_shape)
        if not self.exact:
            return grid
        flat = grid.view(-1)
        delta = int(flat.sum()) - self.num_masked(flat.numel())
        if delta != 0:
            # BEiT v2's fix-up. Surplus cannot arise from the blocks (each adds <= remaining) but is handled anyway.
            pool = flat.nonzero().view(-1) if delta > 0 else (~flat).nonzero().view(-1)
            pick = pool[torch.randperm(pool.numel(), generator=g)[: abs(delta)]]
            flat[pick] = delta < 0
        return grid

    def __call__(self, seeds: torch.Tensor, grid_shape: tuple[int, int]) -> Mask:
        """Bool[B, gh*gw] masks in raster order, image b's from `rng.generator(seeds[b], stream=3)`. With `exact`,
        also ids_keep (visible patches in raster order) and ids_restore (un-shuffles [visible; hidden])."""
        gh, gw = int(grid_shape[0]), int(grid_shape[1])
        rows = [self.sample(rng.generator(int(s), self.stream), (gh, gw)).view(-1) for s in seeds.tolist()]
        masked = torch.stack(rows).to(seeds.device) if rows else torch.zeros(0, gh * gw, dtype=torch.bool,
                                                                             device=seeds.device)
        if not self.exact:
            return Mask(masked=masked)
        ids_shuffle = torch.argsort(masked.to(torch.uint8), dim=1, stable=True)  # visible first, raster order
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        num_keep = gh * gw - self.num_masked(gh * gw)
        return Mask(masked=masked, ids_keep=ids_shuffle[:, :num_keep], ids_restore=ids_restore)
