"""MAE (He et al., 2022): encode the visible 25% of patches, decode all, regress pixels of the hidden ones.

Slots: RandomMasking -> VisionTransformer (visible tokens only) -> MAEDecoder -> PixelTarget -> masked MSE.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from mimkit.config import MethodSection, ModelConfig
from mimkit.losses import masked_mse
from mimkit.masking import Mask, RandomMasking, mask_from_noise
from mimkit.methods.base import Method, Reconstruction
from mimkit.models import MAEDecoder, VisionTransformer
from mimkit.targets import PixelTarget


class MAEConfig(MethodSection):
    name: Literal["mae"] = "mae"
    mask_ratio: float = Field(0.75, gt=0.0, lt=1.0)
    norm_pix: bool = True


class MAE(Method):
    config_class = MAEConfig

    def __init__(self, encoder: VisionTransformer, decoder: MAEDecoder, mask_ratio: float = 0.75, norm_pix: bool = True):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.grid = encoder.grid
        self.masking = RandomMasking(mask_ratio)
        self.target = PixelTarget(self.grid, norm=norm_pix)

    @classmethod
    def from_config(cls, method: MAEConfig, model: ModelConfig, img_size, in_chans: int, data=None) -> "MAE":
        encoder = VisionTransformer.from_config(model, img_size, in_chans)
        return cls(encoder, MAEDecoder.from_config(model, encoder), method.mask_ratio, method.norm_pix)

    def make_mask(self, batch: dict) -> Mask:
        if "mask_noise" in batch:  # explicit noise: used to compare with other implementations
            return mask_from_noise(batch["mask_noise"], self.masking.ratio)
        return self.masking(batch["seed"], self.grid.num_patches)

    def predict(self, images: torch.Tensor, mask: Mask) -> torch.Tensor:
        latent = self.encoder(images, ids_keep=mask.ids_keep)
        return self.decoder(latent, mask.ids_restore)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["image"]
        mask = self.make_mask(batch)
        pred = self.predict(images, mask)
        with torch.no_grad():
            target = self.target(images)
        loss, _ = masked_mse(pred, target, mask.masked)
        return {"loss": loss}

    @torch.no_grad()
    def reconstruct(self, batch: dict) -> Reconstruction:
        images = batch["image"]
        mask = self.make_mask(batch)
        pred = self.target.to_pixels(self.predict(images, mask).float(), images.float())
        hidden = self.grid.expand_mask(mask.masked)
        return Reconstruction.from_mask(images, pred, hidden)
