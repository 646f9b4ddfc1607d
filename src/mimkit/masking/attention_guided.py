"""AttMask (Kakogeorgiou et al., ECCV 2022; gkakogeorgiou/attmask `attmask.py`): hide patches by a score, the
teacher's class-token attention to each patch.

  high  hide the int(ratio * N) highest-scored patches (the most attended: the hardest to predict)
  low   hide the int(ratio * N) lowest-scored ones (the paper's control: the easiest, background)
  hint  as high, then reveal int(show_max * ratio * N) of the hidden patches, drawn uniformly without
        replacement from the int(show_max * N) highest-scored (a few hints of the salient region stay visible)

The ratio is per image (0 leaves the image unmasked: how AttMask's masking_prob and iBOT's pred_ratio list
[0, 0.3] skip images), so the hidden count varies and the Mask carries `masked` only. The mask is a pure function
of (scores, ratios, seeds): the hint draws come from each image's seed. Ties in the scores go to the lower patch
index (a stable sort), so equal scores give a reproducible mask too.
"""

from __future__ import annotations

from typing import Literal

import torch

from mimkit import rng
from mimkit.masking.base import Mask

AttMaskVariant = Literal["high", "hint", "low"]

HINT_STREAM = 0x41544D  # "ATM": the hint draws; callers offset it per view


def _ranks(scores: torch.Tensor, descending: bool) -> torch.Tensor:
    """rank[b, n] = position of patch n when image b's patches are sorted by score (0 = first), stable."""
    order = torch.argsort(scores, dim=1, descending=descending, stable=True)
    return torch.argsort(order, dim=1)


class AttentionGuidedMasking:
    """`masking(scores [B, N], ratios [B] or float, seeds Long[B], stream=HINT_STREAM) -> Mask`."""

    def __init__(self, variant: AttMaskVariant = "high", show_max: float = 0.1):
        if variant not in ("high", "hint", "low"):
            raise ValueError(f"unknown AttMask variant {variant!r}; choose high, hint or low")
        if not 0.0 <= show_max <= 1.0:
            raise ValueError(f"show_max must be in [0, 1], got {show_max}")
        self.variant, self.show_max = variant, show_max

    @staticmethod
    def counts(ratios: torch.Tensor, num_patches: int) -> torch.Tensor:
        """Hidden patches per image before hints: int(ratio * N), as the reference."""
        return (ratios.double() * num_patches).floor().long()

    def reveal_counts(self, ratios: torch.Tensor, num_patches: int) -> torch.Tensor:
        """Hints per image: int(show_max * ratio * N) (the reference's show_ratio = show_max * ratio)."""
        return (ratios.double() * self.show_max * num_patches).floor().long()

    def top_count(self, num_patches: int) -> int:
        """Size of the set the hints are drawn from: int(show_max * N)."""
        return int(self.show_max * num_patches)

    @torch.no_grad()
    def __call__(self, scores: torch.Tensor, ratios, seeds: torch.Tensor, stream: int = HINT_STREAM) -> Mask:
        scores = scores.detach().float()
        b, n = scores.shape
        if not torch.is_tensor(ratios):
            ratios = torch.full((b,), float(ratios))
        ratios = ratios.to(scores.device)
        if ((ratios < 0) | (ratios >= 1)).any():
            raise ValueError("mask ratios must be in [0, 1)")
        ranks = _ranks(scores, descending=self.variant != "low")
        masked = ranks < self.counts(ratios, n).unsqueeze(1)
        if self.variant == "hint":
            top = ranks < self.top_count(n)
            # uniform draws restricted to the top set: the highest-noise top patches are the revealed hints
            noise = rng.uniform(seeds, n, stream=stream).to(scores.device).masked_fill(~top, -1.0)
            reveal = _ranks(noise, descending=True) < self.reveal_counts(ratios, n).unsqueeze(1)
            masked = masked & ~(reveal & top)
        return Mask(masked=masked)
