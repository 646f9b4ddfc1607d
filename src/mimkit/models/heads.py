"""Prediction heads that map encoder tokens straight to pixels (no decoder)."""

from __future__ import annotations

import torch
import torch.nn as nn

from mimkit.models.patch import to_2tuple


class PixelShuffleHead(nn.Module):
    """SimMIM's head: a 1x1 convolution from D to ph*pw*C values per token, then PixelShuffle to the image.

    Non-square patches use the equivalent linear map plus a (row, col, channel) unpatchify."""

    def __init__(self, embed_dim: int, patch_size, out_chans: int, grid_shape: tuple[int, int]):
        super().__init__()
        self.patch = to_2tuple(patch_size)
        self.out_chans, self.grid_shape = out_chans, tuple(grid_shape)
        ph, pw = self.patch
        self.proj = nn.Conv2d(embed_dim, ph * pw * out_chans, kernel_size=1)
        self.shuffle = nn.PixelShuffle(ph) if ph == pw else None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, N, D] in raster order (no class token) -> images [B, C, H, W]."""
        b, n, d = tokens.shape
        gh, gw = self.grid_shape
        if n != gh * gw:
            raise ValueError(f"expected {gh * gw} patch tokens for a {gh}x{gw} grid, got {n}")
        x = self.proj(tokens.transpose(1, 2).reshape(b, d, gh, gw))
        if self.shuffle is not None:
            return self.shuffle(x)
        ph, pw = self.patch
        x = x.reshape(b, self.out_chans, ph, pw, gh, gw).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(b, self.out_chans, gh * ph, gw * pw)
