"""What every mask generator returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Mask:
    """A patch mask over a batch. True = hidden from the encoder (and, by default, where the loss applies)."""

    masked: torch.Tensor                     # Bool[B, N]
    ids_keep: torch.Tensor | None = None     # Long[B, V]: visible patches, when V is the same for every image
    ids_restore: torch.Tensor | None = None  # Long[B, N]: un-shuffles [visible; hidden] back to raster order

    @property
    def num_visible(self) -> int:
        return int(self.ids_keep.shape[1]) if self.ids_keep is not None else int((~self.masked[0]).sum())
