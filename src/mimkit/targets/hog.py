"""HOG targets (MaskFeat): histograms of oriented gradients per cell, per channel, L2-normalised.

Sobel gradients with reflect padding, unsigned orientation in `nbins` bins over [0, pi), the gradient magnitude of
each pixel added to its bin, summed over `cell x cell` pixels; each channel's histogram of a cell is L2-normalised
(MaskFeat's per-channel normalisation), and channels are concatenated.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mimkit.models.patch import PatchGrid


class HOG(nn.Module):
    def __init__(self, nbins: int = 9, cell: int = 8, eps: float = 1e-6):
        super().__init__()
        if nbins < 1 or cell < 1:
            raise ValueError(f"HOG needs nbins >= 1 and cell >= 1, got nbins={nbins}, cell={cell}")
        self.nbins, self.cell, self.eps = nbins, cell, eps
        gx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
        self.register_buffer("kernel", torch.stack([gx, gx.t()])[:, None], persistent=False)  # [2, 1, 3, 3]

    def gradients(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (magnitude, bin index) maps, each [B, C, H, W]."""
        b, c, h, w = images.shape
        x = F.pad(images.float().reshape(b * c, 1, h, w), (1, 1, 1, 1), mode="reflect")
        g = F.conv2d(x, self.kernel.to(x.dtype)).reshape(b, c, 2, h, w)
        gx, gy = g[:, :, 0], g[:, :, 1]
        magnitude = torch.sqrt(gx * gx + gy * gy)
        # unsigned orientation in [0, pi): opposite gradients share a bin (MaskFeat's convention)
        phase = torch.atan2(gx, gy)
        bins = torch.floor(phase / math.pi * self.nbins).long() % self.nbins
        return magnitude, bins

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, C * nbins, H // cell, W // cell] (trailing pixels that fill no cell are dropped)."""
        b, c, h, w = images.shape
        if h < self.cell or w < self.cell:
            raise ValueError(f"images of {h}x{w} pixels hold no {self.cell}x{self.cell} HOG cell")
        magnitude, bins = self.gradients(images)
        hist = torch.zeros(b, c, self.nbins, h, w, dtype=magnitude.dtype, device=images.device)
        hist.scatter_(2, bins.unsqueeze(2), magnitude.unsqueeze(2))
        hh, ww = h // self.cell * self.cell, w // self.cell * self.cell
        hist = hist[..., :hh, :ww].reshape(b, c * self.nbins, hh, ww)
        hist = F.avg_pool2d(hist, self.cell, self.cell) * (self.cell * self.cell)  # sum over each cell
        hist = hist.reshape(b, c, self.nbins, hh // self.cell, ww // self.cell)
        hist = hist / hist.norm(dim=2, keepdim=True).clamp_min(self.eps)
        return hist.reshape(b, c * self.nbins, hh // self.cell, ww // self.cell)


class HOGTarget(nn.Module):
    """Per-patch HOG targets [B, N, dim] in patch raster order: the (ph/cell) x (pw/cell) cells of a patch, each
    with C * nbins values, flattened (cell-row, cell-col, channel, bin); dim = cells per patch * C * nbins."""

    def __init__(self, grid: PatchGrid, cell: int, nbins: int = 9):
        super().__init__()
        ph, pw = grid.patch_size
        if cell < 1 or ph % cell or pw % cell:
            raise ValueError(f"HOG cell {cell} must divide the patch size {grid.patch_size}")
        self.grid, self.cell, self.nbins = grid, cell, nbins
        self.hog = HOG(nbins, cell)
        self.cells = (ph // cell, pw // cell)
        self.dim = self.cells[0] * self.cells[1] * grid.in_chans * nbins

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        hist = self.hog(images)  # [B, C*nbins, H/cell, W/cell]
        b, d = hist.shape[:2]
        (gh, gw), (ch, cw) = self.grid.shape, self.cells
        x = hist.reshape(b, d, gh, ch, gw, cw).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, gh * gw, self.dim)
