"""The contract between a method and the engine, evaluation and visualisation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from mimkit.models.vit import VisionTransformer


@dataclass
class Reconstruction:
    """Images for the visualisation grid, all [B, C, H, W] in the input's (normalised) space."""

    original: torch.Tensor
    masked: torch.Tensor         # hidden patches blanked
    prediction: torch.Tensor     # the model's output everywhere
    pasted: torch.Tensor         # prediction on hidden patches, original visible patches


class Method(nn.Module):
    """A MIM method: an `encoder` (what evaluation and export use) plus whatever it trains beside it.

    `forward(batch)` takes {"image": Float[B,C,H,W], "seed": Long[B], ...} and returns a dict with a scalar
    "loss" and any other scalar metrics to log. Randomness that concerns an image must derive from its seed.
    """

    encoder: VisionTransformer

    def reconstruct(self, batch: dict) -> Reconstruction | None:
        """Pixel reconstructions for the picture; None where the method predicts no pixels."""
        return None
