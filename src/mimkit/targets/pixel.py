"""Pixel targets: raw patches, or MAE's per-patch normalised pixels."""

from __future__ import annotations

import torch

from mimkit.models.patch import PatchGrid


class PixelTarget:
    """[B, N, ph*pw*C] patch pixels; with `norm=True` each patch is standardised by its own mean and variance
    over all its values (all channels together), as MAE's norm_pix_loss."""

    def __init__(self, grid: PatchGrid, norm: bool = True, eps: float = 1e-6):
        self.grid, self.norm, self.eps = grid, norm, eps

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.grid.patchify(images)
        if not self.norm:
            return patches
        mean = patches.mean(dim=-1, keepdim=True)
        var = patches.var(dim=-1, keepdim=True)  # unbiased, as the reference implementations
        return (patches - mean) / (var + self.eps) ** 0.5

    def to_pixels(self, pred: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Map predictions back to image space [B, C, H, W], using each patch's own statistics when normalised."""
        if self.norm:
            patches = self.grid.patchify(images)
            mean = patches.mean(dim=-1, keepdim=True)
            var = patches.var(dim=-1, keepdim=True)
            pred = pred * (var + self.eps) ** 0.5 + mean
        return self.grid.unpatchify(pred)
