"""DMJD's disjoint masking (Ma et al., 2023, mx-mark/DMJD `random_masking`/`block_masking`): two masked views of one
image whose hidden sets overlap as little as possible, so that together they ask for predictions on more patches.

View 1 is MAE's random mask: M = L - int(L * (1 - ratio)) of the L mask units hidden. View 2 hides the same number M:
`extra` units taken at random from view 1's VISIBLE units and the other M - extra at random from view 1's hidden
ones. `extra` makes the union of the two hidden sets cover round(pred_ratio * L) units (pred_ratio = 1: the whole
image), as far as the counts allow (extra <= M and extra <= L - M). The reference computes the same count as
`int(min(pred_ratio - ratio, ratio) * L)`, which equals ours except where float rounding drops a unit (e.g. 0.3 of
35 = 10.4999...); we count from the integers so that the union is exactly the requested share.

A mask unit is `unit x unit` patches (the reference's "block" mode: 2x2 units on a 7x7 sub-grid of 14x14 patches);
the grid must be divisible by `unit` so that every view hides exactly the same number of patches per image (the
visible-only encoder needs equal counts). Unit 1 is the reference's "rand" mode.

Randomness: view 1 from `rng.uniform(seeds, L, stream=21)`, view 2's choices from stream 22 (per image; the
reference shares one permutation across the batch for view 2).
"""

from __future__ import annotations

import math

import torch

from mimkit import rng
from mimkit.masking.base import Mask


class DisjointMasking:
    streams = (21, 22)  # rng streams of view 1 and view 2 (random: 1, coarse: 2, block: 3)

    def __init__(self, ratio: float = 0.6, pred_ratio: float = 1.0, unit: int = 1):
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
        if not ratio <= pred_ratio <= 1.0:
            raise ValueError(f"pred_ratio must be in [mask ratio {ratio}, 1], got {pred_ratio}")
        if unit < 1:
            raise ValueError(f"mask unit must be >= 1 patch, got {unit}")
        self.ratio, self.pred_ratio, self.unit = ratio, pred_ratio, unit

    def counts(self, num_units: int) -> tuple[int, int, int]:
        """(kept, hidden, extra) mask units per view for L = num_units: kept = int(L * (1 - ratio)) as MAE,
        hidden = L - kept, extra = view-2 units drawn from view 1's visible set."""
        kept = int(num_units * (1 - self.ratio))
        hidden = num_units - kept
        if kept < 1:
            raise ValueError(f"mask ratio {self.ratio} leaves no visible unit out of {num_units}")
        union = min(num_units, math.floor(self.pred_ratio * num_units + 0.5))
        extra = max(0, min(union - hidden, hidden, kept))
        return kept, hidden, extra

    def unit_grid(self, grid_shape: tuple[int, int]) -> tuple[int, int]:
        gh, gw = int(grid_shape[0]), int(grid_shape[1])
        if gh % self.unit or gw % self.unit:
            raise ValueError(f"disjoint masking with {self.unit}x{self.unit} units needs a grid divisible by "
                             f"{self.unit}, got {gh}x{gw}; use unit=1")
        return gh // self.unit, gw // self.unit

    def unit_masks(self, seeds: torch.Tensor, num_units: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Both views' Bool[B, L] masks over the mask units (True = hidden)."""
        kept, hidden, extra = self.counts(num_units)
        b = seeds.shape[0]
        order1 = rng.uniform(seeds, num_units, stream=self.streams[0]).argsort(dim=1)  # [visible1 | hidden1]
        view1 = torch.ones(b, num_units, dtype=torch.bool, device=seeds.device)
        view1.scatter_(1, order1[:, :kept], False)
        # view 2: a random order within view 1's visible units and within its hidden units, from one noise row
        noise2 = torch.gather(rng.uniform(seeds, num_units, stream=self.streams[1]), 1, order1)
        vis1 = torch.gather(order1[:, :kept], 1, noise2[:, :kept].argsort(dim=1))
        hid1 = torch.gather(order1[:, kept:], 1, noise2[:, kept:].argsort(dim=1))
        view2 = torch.zeros_like(view1)
        view2.scatter_(1, vis1[:, :extra], True)             # newly hidden: view 1 saw them
        view2.scatter_(1, hid1[:, : hidden - extra], True)   # hidden again: the unavoidable overlap
        return view1, view2

    def expand(self, units: torch.Tensor, grid_shape: tuple[int, int]) -> torch.Tensor:
        """Bool[B, L] over units -> Bool[B, gh*gw] over patches (each unit covers unit x unit patches)."""
        uh, uw = self.unit_grid(grid_shape)
        if self.unit == 1:
            return units
        fine = units.view(-1, uh, uw).repeat_interleave(self.unit, 1).repeat_interleave(self.unit, 2)
        return fine.reshape(units.shape[0], -1)

    def __call__(self, seeds: torch.Tensor, grid_shape: tuple[int, int]) -> list[Mask]:
        """[view 1, view 2] masks over the `gh x gw` patch grid, each with ids_keep (visible patches in raster
        order, the same count in every image and view) and ids_restore (un-shuffles [visible; hidden])."""
        uh, uw = self.unit_grid(grid_shape)
        return [_with_ids(self.expand(m, grid_shape)) for m in self.unit_masks(seeds, uh * uw)]


def _with_ids(masked: torch.Tensor) -> Mask:
    ids_shuffle = torch.argsort(masked.to(torch.uint8), dim=1, stable=True)  # visible first, raster order
    num_keep = int((~masked[0]).sum()) if masked.shape[0] else 0
    return Mask(masked=masked, ids_keep=ids_shuffle[:, :num_keep], ids_restore=torch.argsort(ids_shuffle, dim=1))


def stack_views(masks: list[Mask]) -> Mask:
    """The views' masks concatenated on the batch axis (view-major: all images' view 1, then view 2), matching
    images repeated with `torch.cat([images] * len(masks))` as the reference batches its two views."""
    return Mask(
        masked=torch.cat([m.masked for m in masks]),
        ids_keep=torch.cat([m.ids_keep for m in masks]),
        ids_restore=torch.cat([m.ids_restore for m in masks]),
    )
