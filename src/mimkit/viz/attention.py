"""Attention maps drawn over images: a PNG grid, one row per image, one column per map.

Maps (e.g. class-token attention of a layer, [B, h, w] over the patch grid) are stretched per image to
[0, 1] (min to max), upsampled to the image size (nearest neighbour, so patches stay visible), coloured with a
dark-blue -> yellow ramp and blended over a grayscale copy of the image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

# a perceptually ordered ramp (dark blue -> teal -> green -> yellow), interpolated linearly
_RAMP = np.array([
    [0.07, 0.04, 0.30],
    [0.23, 0.20, 0.55],
    [0.13, 0.45, 0.56],
    [0.15, 0.68, 0.50],
    [0.55, 0.83, 0.25],
    [0.99, 0.91, 0.14],
], dtype=np.float64)


def colorize(values: np.ndarray) -> np.ndarray:
    """float array in [0, 1] (any shape) -> float RGB in [0, 1] with one more trailing axis of 3."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0) * (len(_RAMP) - 1)
    i = np.clip(np.floor(v).astype(int), 0, len(_RAMP) - 2)
    f = (v - i)[..., None]
    return _RAMP[i] * (1 - f) + _RAMP[i + 1] * f


def _gray(images: torch.Tensor, mean, std) -> np.ndarray:
    """Normalised [B, C, H, W] -> grayscale float [B, H, W] in [0, 1] (first three channels averaged)."""
    x = images.detach().float().cpu()
    c = x.shape[1]
    m = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
    s = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
    m = m.expand(c) if m.numel() == 1 else m
    s = s.expand(c) if s.numel() == 1 else s
    x = (x * s.view(1, c, 1, 1) + m.view(1, c, 1, 1)).clamp(0, 1)
    return x[:, : min(c, 3)].mean(dim=1).numpy()


def render_attention_grid(
    images: torch.Tensor,
    maps: Sequence[torch.Tensor],
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
    alpha: float = 0.65,
    min_cell: int = 96,
    gap: int = 4,
    background: int = 255,
    titles: Sequence[str] | None = None,
) -> Image.Image:
    """RGB grid: column 0 the images, then one column per map. images: normalised [B, C, H, W];
    maps: each [B, h, w], stretched per image from its minimum (0) to its maximum (1). `titles`: one per
    column (images first), drawn in a band on top."""
    b, _, h, w = images.shape
    gray = _gray(images, mean, std)
    scale = max(1, math.ceil(min_cell / max(h, w)))
    ch, cw = h * scale, w * scale
    cols = len(maps) + 1
    canvas = np.full((b * ch + (b + 1) * gap, cols * cw + (cols + 1) * gap, 3), background, dtype=np.uint8)
    for i in range(b):
        base = np.repeat(np.repeat(gray[i], scale, 0), scale, 1)
        cells = [np.stack([base] * 3, axis=-1)]
        for m in maps:
            a = m[i].detach().float().cpu().numpy()
            lo, hi = float(a.min()), float(a.max())
            a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
            up = np.asarray(Image.fromarray(a.astype(np.float32), mode="F").resize((cw, ch), Image.NEAREST))
            cells.append((1 - alpha) * base[..., None] + alpha * colorize(up))
        y0 = gap + i * (ch + gap)
        for j, cell in enumerate(cells):
            x0 = gap + j * (cw + gap)
            canvas[y0:y0 + ch, x0:x0 + cw] = np.clip(np.round(cell * 255), 0, 255).astype(np.uint8)
    if titles is not None:
        if len(titles) != cols:
            raise ValueError(f"need {cols} titles (images, then one per map), got {len(titles)}")
        from mimkit.viz.titles import add_column_titles

        canvas = add_column_titles(canvas, titles, cw, gap, background)
    return Image.fromarray(canvas)


def colorbar(width: int = 256, height: int = 12) -> Image.Image:
    """The ramp as a horizontal strip (low on the left)."""
    row = colorize(np.linspace(0, 1, width))
    return Image.fromarray(np.clip(np.round(np.repeat(row[None], height, 0) * 255), 0, 255).astype(np.uint8))
