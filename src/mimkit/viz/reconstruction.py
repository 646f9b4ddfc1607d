"""A PNG of MIM reconstructions: one row per image, columns original | masked | reconstruction | pasted.

Channels: 1 -> grayscale PNG; 3 -> RGB; 2 -> the first channel as grayscale; more than 3 -> the first three
channels as RGB. Hidden patches in the "masked" column are drawn in a flat dark gray (`mask_fill`), so
they stand out from both the image and a black background.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mimkit.methods.base import Reconstruction
from mimkit.viz.titles import add_column_titles

COLUMNS = ("original", "masked", "reconstruction", "reconstruction + visible")


def _per_channel(v, c: int) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=torch.float32).reshape(-1)
    if t.numel() == 1:
        t = t.expand(c)
    if t.numel() != c:
        raise ValueError(f"need 1 or {c} per-channel values, got {t.numel()}")
    return t.view(1, c, 1, 1)


def _hidden_pixels(rec: Reconstruction) -> torch.Tensor:
    """Bool[B, 1, H, W]: where the mask hid the image. Recovered from the Reconstruction's contract:
    hidden pixels are 0 in `masked` and equal `prediction` in `pasted`."""
    zero = (rec.masked == 0).all(dim=1, keepdim=True)
    from_pred = (rec.pasted == rec.prediction).all(dim=1, keepdim=True)
    return zero & from_pred


def _to_display(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Normalised [B, C, H, W] -> displayable [B, C', H, W] in [0, 1] (C' = 1 or 3)."""
    x = (x.float().cpu() * std + mean).clamp(0.0, 1.0)
    c = x.shape[1]
    if c == 1 or c == 3:
        return x
    if c == 2:
        return x[:, :1]
    return x[:, :3]


@torch.no_grad()
def render_reconstruction_grid(
    rec: Reconstruction,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
    min_cell: int = 96,
    gap: int = 4,
    mask_fill: float = 0.15,
    background: int = 255,
    titles: bool = True,
) -> Image.Image:
    """The grid as a PIL image (mode "L" or "RGB"). Cells are upscaled by an integer factor (nearest
    neighbour) so that each is at least `min_cell` pixels on its longer side; `gap` pixels of `background`
    separate cells and surround the grid. `titles`: a band on top names the columns (:data:`COLUMNS`)."""
    b, c, h, w = rec.original.shape
    m, s = _per_channel(mean, c), _per_channel(std, c)
    hidden = _hidden_pixels(rec).cpu()
    masked = _to_display(rec.masked, m, s).masked_fill(hidden, mask_fill)
    cols = [_to_display(rec.original, m, s), masked, _to_display(rec.prediction, m, s), _to_display(rec.pasted, m, s)]
    scale = max(1, math.ceil(min_cell / max(h, w)))
    ch, cw = h * scale, w * scale
    out_c = cols[0].shape[1]
    height, width = b * ch + (b + 1) * gap, len(cols) * cw + (len(cols) + 1) * gap
    canvas = np.full((height, width, out_c), background, dtype=np.uint8)
    for j, col in enumerate(cols):
        cells = (col * 255.0).round().to(torch.uint8)
        cells = cells.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3).permute(0, 2, 3, 1).numpy()
        x0 = gap + j * (cw + gap)
        for i in range(b):
            y0 = gap + i * (ch + gap)
            canvas[y0:y0 + ch, x0:x0 + cw] = cells[i]
    if titles:
        canvas = add_column_titles(canvas, COLUMNS, cw, gap, background)
    if out_c == 1:
        return Image.fromarray(canvas[:, :, 0])  # uint8 [H, W] -> mode "L"
    return Image.fromarray(canvas)  # uint8 [H, W, 3] -> mode "RGB"


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def save_reconstruction_grid(
    method,
    batch: dict,
    path: str | Path,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
    max_images: int | None = 16,
    min_cell: int = 96,
    gap: int = 4,
) -> Path | None:
    """Write `method.reconstruct(batch)` as a PNG at `path` and return the path (None, and no file, when
    the method predicts no pixels). `mean`/`std` are the per-channel normalisation of `batch["image"]`
    (1 or C values). At most `max_images` rows (None: all). The method runs in eval mode on its own
    device; its mode is restored afterwards."""
    if max_images is not None:
        batch = {k: v[:max_images] if isinstance(v, torch.Tensor) and v.ndim > 0 else v for k, v in batch.items()}
    p = next(method.parameters(), None)
    if p is not None:
        batch = _to_device(batch, p.device)
    was_training = method.training
    method.eval()
    try:
        rec = method.reconstruct(batch)
    finally:
        method.train(was_training)
    if rec is None:
        return None
    image = render_reconstruction_grid(rec, mean, std, min_cell=min_cell, gap=gap)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path
