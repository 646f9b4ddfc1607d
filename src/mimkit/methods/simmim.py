"""SimMIM (Xie et al., CVPR 2022): replace hidden patch embeddings by a learnable mask token, encode all tokens,
and regress the raw pixels of the hidden patches with a single linear layer (1x1 conv + PixelShuffle), L1 loss.

Slots: CoarseMasking (SimMIM's 32-px mask patches = 2 model patches at small scale; block or random by the `mask`
knob) -> VisionTransformer.embed_masked (mask-token replacement, every token encoded) -> PixelShuffleHead on the
patch tokens -> raw pixels of the (normalised) input -> L1 on hidden pixels.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

from mimkit.config import ModelConfig
from mimkit.losses import masked_l1
from mimkit.masking import Mask, SwappableMaskSettings, build_masking
from mimkit.methods.base import Method, Reconstruction
from mimkit.models import PixelShuffleHead, VisionTransformer


class SimMIMConfig(SwappableMaskSettings):
    name: Literal["simmim"] = "simmim"


class SimMIM(Method):
    config_class = SimMIMConfig

    def __init__(self, encoder: VisionTransformer, mask: str = "coarse", mask_ratio: float = 0.6,
                 mask_unit: int = 2, block_min_area: float = 0.08):
        super().__init__()
        self.encoder = encoder
        self.grid = encoder.grid
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)  # SimMIM's init (trunc_normal, std .02)
        self.head = PixelShuffleHead(encoder.embed_dim, self.grid.patch_size, self.grid.in_chans, self.grid.shape)
        self.masking = build_masking(mask, mask_ratio, mask_unit, block_min_area)

    @classmethod
    def from_config(cls, method: SimMIMConfig, model: ModelConfig, img_size, in_chans: int, data=None) -> "SimMIM":
        encoder = VisionTransformer.from_config(model, img_size, in_chans)
        return cls(encoder, method.mask, method.mask_ratio, method.mask_unit, method.block_min_area)

    def make_mask(self, batch: dict) -> Mask:
        return self.masking(batch["seed"], self.grid.shape)

    def embed(self, images: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """All N patch tokens [B, N, D] + position embedding, hidden ones replaced by the mask token."""
        return self.encoder.embed_masked(images, masked, self.mask_token)

    def predict(self, images: torch.Tensor, mask: Mask) -> torch.Tensor:
        """Pixel predictions [B, C, H, W] for every patch (the loss keeps only the hidden ones)."""
        tokens = self.encoder.forward_tokens(self.embed(images, mask.masked))
        return self.head(tokens[:, 1:])  # the class token carries no pixels (SimMIM drops it too)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["image"]
        mask = self.make_mask(batch)
        pred = self.predict(images, mask)
        # SimMIM: sum |x - x_rec| over hidden pixels / (hidden pixels) / channels = the mean over hidden
        # pixel-channel values; every patch has as many values, so the per-patch mean over hidden patches is equal
        loss, _ = masked_l1(self.grid.patchify(pred), self.grid.patchify(images), mask.masked)
        return {"loss": loss}

    @torch.no_grad()
    def reconstruct(self, batch: dict) -> Reconstruction:
        images = batch["image"]
        mask = self.make_mask(batch)
        pred = self.predict(images, mask).float()
        hidden = self.grid.expand_mask(mask.masked)
        return Reconstruction.from_mask(images, pred, hidden)
