"""Column titles above a grid picture (reconstructions, masks and attention), so a PNG explains itself."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LINE_HEIGHT = 12  # Pillow's built-in bitmap font is 11 px high


def _wrap(text: str, width: int, font, draw: ImageDraw.ImageDraw) -> list[str]:
    """Words of `text` in lines no wider than `width` pixels (a single long word stays whole)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(lines[-1] + " " + word, font=font) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines or [""]


def add_column_titles(canvas: np.ndarray, titles: Sequence[str], cell_width: int, gap: int,
                      background: int = 255, ink: int = 40) -> np.ndarray:
    """`canvas` (uint8 [H, W] or [H, W, C], cells of `cell_width` starting at gap + j * (cell_width + gap))
    with a band of centred titles on top, wrapped to the cell width; the band is as high as the longest one."""
    if canvas.ndim == 3 and canvas.shape[2] == 1:  # one-channel [H, W, 1]: titled as [H, W], shape kept
        return add_column_titles(canvas[:, :, 0], titles, cell_width, gap, background, ink)[:, :, None]
    font = ImageFont.load_default(size=11) if hasattr(ImageFont, "FreeTypeFont") else ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    wrapped = [_wrap(t, cell_width, font, probe) for t in titles]
    band_h = gap + LINE_HEIGHT * max(len(w) for w in wrapped)
    band_shape = (band_h, *canvas.shape[1:])
    band = Image.fromarray(np.full(band_shape, background, dtype=np.uint8))
    draw = ImageDraw.Draw(band)
    fill = ink if band.mode == "L" else (ink,) * len(band.getbands())
    for j, lines in enumerate(wrapped):
        x0 = gap + j * (cell_width + gap)
        for k, line in enumerate(lines):
            tw = draw.textlength(line, font=font)
            draw.text((x0 + max(0.0, (cell_width - tw) / 2), gap + k * LINE_HEIGHT), line, fill=fill, font=font)
    return np.concatenate([np.asarray(band), canvas], axis=0)
