"""The masking slot by name, for methods that let users swap it (`method.mask=coarse|block|random`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mimkit.config import MethodSection
from mimkit.masking.block import BlockMasking
from mimkit.masking.coarse import CoarseMasking
from mimkit.masking.random import RandomMasking

MaskKind = Literal["coarse", "block", "random"]


def build_masking(kind: str, ratio: float, unit: int = 2, block_min_area: float = 0.08):
    """A generator called as `masking(seeds, grid_shape) -> Mask`: SimMIM's coarse units of `unit` x `unit`
    patches, BEiT's blocks (smallest block `block_min_area`: a fraction of N if < 1, else a count), or MAE's
    uniform random patches."""
    if kind == "coarse":
        return CoarseMasking(ratio, unit)
    if kind == "block":
        return BlockMasking(ratio, min_area=block_min_area)
    if kind == "random":
        return RandomMasking(ratio)
    raise ValueError(f"unknown mask {kind!r}; choose coarse, block or random")


class SwappableMaskSettings(MethodSection):
    """Settings of a method whose masking slot is chosen by name; subclasses set their own defaults."""

    mask: MaskKind = Field("coarse", description="mask generator: SimMIM's coarse units, BEiT blocks, or MAE random")
    mask_ratio: float = Field(0.6, gt=0.0, lt=1.0, description="fraction of patches (coarse: of mask units) hidden")
    mask_unit: int = Field(2, ge=1, description="coarse mask unit in patches (SimMIM: 32-px units over 16-px patches)")
    block_min_area: float = Field(0.08, gt=0.0, description="block masking's smallest block: fraction of N if < 1, "
                                  "else a patch count (BEiT v2: 16 of 196)")
