"""MAE's random masking: an exact number of hidden patches per image, chosen by sorting uniform noise."""

from __future__ import annotations

import math

import torch

from mimkit import rng
from mimkit.masking.base import Mask


def mask_from_noise(noise: torch.Tensor, ratio: float) -> Mask:
    """Keep the `int(N * (1 - ratio))` lowest-noise patches of each row (MAE's and HF's exact rule)."""
    b, n = noise.shape
    num_keep = int(n * (1 - ratio))
    if num_keep < 1:
        raise ValueError(f"mask ratio {ratio} leaves no visible patch out of {n}")
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :num_keep]
    masked = torch.ones(b, n, dtype=torch.bool, device=noise.device)
    masked.scatter_(1, ids_keep, False)
    return Mask(masked=masked, ids_keep=ids_keep, ids_restore=ids_restore)


class RandomMasking:
    """Hide exactly `int(N * ratio)`-ish patches (N - int(N * (1 - ratio))) uniformly at random per image."""

    def __init__(self, ratio: float = 0.75):
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
        self.ratio = ratio

    def __call__(self, seeds: torch.Tensor, grid) -> Mask:
        """`seeds` (Long[B]) fix each image's mask independently of batch composition; `grid` is the patch
        grid's shape (gh, gw), as every mask generator takes, or the number of patches."""
        num_patches = grid if isinstance(grid, int) else math.prod(grid)
        return mask_from_noise(rng.uniform(seeds, num_patches, stream=1), self.ratio)
