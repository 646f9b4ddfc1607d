"""SimMIM's coarse masking: hide whole `unit x unit` groups of patches (SimMIM's 32-px mask patches over 4- or
16-px model patches), a ceil(ratio * groups) count of groups per image, chosen uniformly at random."""

from __future__ import annotations

import math

import torch

from mimkit import rng
from mimkit.masking.base import Mask


class CoarseMasking:
    def __init__(self, ratio: float = 0.6, unit: int = 2):
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
        if unit < 1:
            raise ValueError(f"mask unit must be >= 1 patch, got {unit}")
        self.ratio, self.unit = ratio, unit

    def __call__(self, seeds: torch.Tensor, grid_shape: tuple[int, int]) -> Mask:
        """Bool[B, gh*gw] masks. A grid not divisible by `unit` is covered by ceil(g / unit) groups per side and
        the overhang cropped, so edge groups are smaller and the hidden count varies a little between images."""
        gh, gw = grid_shape
        ch, cw = math.ceil(gh / self.unit), math.ceil(gw / self.unit)
        groups = ch * cw
        count = math.ceil(groups * self.ratio)
        if count >= groups:
            raise ValueError(f"mask ratio {self.ratio} hides all {groups} mask units of a {gh}x{gw} grid")
        noise = rng.uniform(seeds, groups, stream=2)
        order = noise.argsort(dim=1)
        coarse = torch.zeros_like(noise, dtype=torch.bool)
        coarse.scatter_(1, order[:, :count], True)
        fine = coarse.view(-1, ch, cw).repeat_interleave(self.unit, 1).repeat_interleave(self.unit, 2)
        return Mask(masked=fine[:, :gh, :gw].reshape(-1, gh * gw))
