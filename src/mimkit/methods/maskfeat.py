"""MaskFeat (Wei et al., CVPR 2022): hide blocks of patches behind a learnable mask token, encode all tokens, and
regress the HOG features of the ORIGINAL image at the hidden patches with a linear head, MSE.

Slots: BlockMasking (BEiT blocks, 40% as MaskFeat on images; coarse or random by the `mask` knob) ->
VisionTransformer.embed_masked (mask-token replacement) -> Linear head per patch token -> HOGTarget (cell = patch/2,
9 bins, per-channel L2-normalised cell histograms) -> MSE on hidden patches.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from mimkit.config import ModelConfig
from mimkit.losses import masked_mse
from mimkit.masking import Mask, MaskKind, SwappableMaskSettings, build_masking
from mimkit.methods.base import Method
from mimkit.models import VisionTransformer
from mimkit.targets import HOGTarget


class MaskFeatConfig(SwappableMaskSettings):
    name: Literal["maskfeat"] = "maskfeat"
    mask: MaskKind = Field("block", description="mask generator: BEiT blocks (MaskFeat), SimMIM coarse, MAE random")
    mask_ratio: float = Field(0.4, gt=0.0, lt=1.0, description="fraction of patches hidden (MaskFeat images: 40%)")
    hog_nbins: int = Field(9, ge=1, description="HOG orientation bins over [0, pi)")
    hog_cells: int = Field(2, ge=1, description="HOG cells per patch side: cell = patch / hog_cells "
                           "(MaskFeat: 8-px cells in 16-px patches)")


class MaskFeat(Method):
    config_class = MaskFeatConfig

    def __init__(self, encoder: VisionTransformer, mask: str = "block", mask_ratio: float = 0.4, mask_unit: int = 2,
                 block_min_area: float = 0.08, hog_nbins: int = 9, hog_cells: int = 2):
        super().__init__()
        self.encoder = encoder
        self.grid = encoder.grid
        ph, pw = self.grid.patch_size
        cell = min(ph, pw) // hog_cells  # square HOG cells; a non-square patch holds more along its long side
        if cell < 1 or ph % cell or pw % cell:
            raise ValueError(f"hog_cells={hog_cells} does not split the patch {self.grid.patch_size} into square cells")
        self.target = HOGTarget(self.grid, cell=cell, nbins=hog_nbins)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))
        self.head = nn.Linear(encoder.embed_dim, self.target.dim)
        # SlowFast's MaskFeat initialises the mask token and its linear prediction head with trunc_normal(.02)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.masking = build_masking(mask, mask_ratio, mask_unit, block_min_area)

    @classmethod
    def from_config(cls, method: MaskFeatConfig, model: ModelConfig, img_size, in_chans: int, data=None) -> "MaskFeat":
        encoder = VisionTransformer.from_config(model, img_size, in_chans)
        return cls(encoder, method.mask, method.mask_ratio, method.mask_unit, method.block_min_area,
                   method.hog_nbins, method.hog_cells)

    def make_mask(self, batch: dict) -> Mask:
        return self.masking(batch["seed"], self.grid.shape)

    def predict(self, images: torch.Tensor, mask: Mask) -> torch.Tensor:
        """HOG predictions [B, N, target.dim] for every patch from the mask-token-corrupted input."""
        tokens = self.encoder.forward_tokens(self.encoder.embed_masked(images, mask.masked, self.mask_token))
        return self.head(tokens[:, 1:])

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["image"]
        mask = self.make_mask(batch)
        pred = self.predict(images, mask)
        target = self.target(images)  # HOG of the uncorrupted image (no grad: HOGTarget runs under no_grad)
        loss, _ = masked_mse(pred, target, mask.masked)
        return {"loss": loss}
