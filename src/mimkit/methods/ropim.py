"""ROPIM (Haghighat et al., ICLR 2024, "Random Orthogonal Projection Image Modeling"; csiro-robotics/ROPIM): instead
of hiding patches, project the patch embeddings along the token axis onto a random subspace (a count sketch keeps
about rho * N directions), and learn to restore what the projection removed: the L1 loss is taken on the
complement (I - P) of the reconstruction error, i.e. only on the information the encoder did not get.

Slots: count-sketch projection P [B, N, N] per image (the soft "mask") -> VisionTransformer on P @ patch embeddings
(+ position embedding, every token encoded, no mask token) -> PixelShuffleHead (SimMIM's 1x1 conv + PixelShuffle) ->
raw pixels -> mean |(I - P) (x - x_rec)| over patches and pixel values.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from mimkit.config import MethodSection, ModelConfig
from mimkit.masking.ortho_sketch import CountSketchProjection
from mimkit.methods.base import Method, Reconstruction
from mimkit.models import PixelShuffleHead, VisionTransformer


class ROPIMConfig(MethodSection):
    name: Literal["ropim"] = "ropim"
    rho: float = Field(1 / 7, gt=0.0, lt=1.0, description="sketching ratio: the projection keeps ceil(rho * N) "
                       "token directions (ROPIM: 0.14 ~ 1/7, 28 of 196)")


def complement_l1(pred: torch.Tensor, target: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """mean |(I - P) (target - pred)| for patch tensors [B, N, d] and P [B, N, N]: the error left after removing
    its component in P's range (the reference: residual [B, C p^2, N] @ (I - P), abs, mean)."""
    r = (target.float() - pred.float())
    return (r - proj.float() @ r).abs().mean()


class ROPIM(Method):
    config_class = ROPIMConfig

    def __init__(self, encoder: VisionTransformer, rho: float = 1 / 7):
        super().__init__()
        self.encoder = encoder
        self.grid = encoder.grid
        self.projection = CountSketchProjection(rho)
        self.head = PixelShuffleHead(encoder.embed_dim, self.grid.patch_size, self.grid.in_chans, self.grid.shape)

    @classmethod
    def from_config(cls, method: ROPIMConfig, model: ModelConfig, img_size, in_chans: int, data=None) -> "ROPIM":
        return cls(VisionTransformer.from_config(model, img_size, in_chans), method.rho)

    def make_projection(self, batch: dict) -> torch.Tensor:
        """Each image's P [B, N, N] from its seed (the reference draws one per sample in the data loader)."""
        return self.projection(batch["seed"], self.grid.num_patches).to(batch["image"].device)

    def embed(self, images: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
        """P @ patch embeddings, then the position embedding: [B, N, D]. The reference projects the raw patch
        embeddings (its ViT uses relative position bias only); adding positions after the projection keeps every
        token's own position intact, as there."""
        tokens = self.encoder.patch_embed(images)
        tokens = proj.to(tokens.dtype) @ tokens
        return tokens + self.encoder.pos_embed[:, 1:, :]

    def predict(self, images: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
        """Pixel reconstruction [B, C, H, W] from the projected tokens."""
        tokens = self.encoder.forward_tokens(self.embed(images, proj))
        return self.head(tokens[:, 1:])

    def loss(self, pred: torch.Tensor, images: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
        return complement_l1(self.grid.patchify(pred), self.grid.patchify(images), proj)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["image"]
        proj = self.make_projection(batch)
        pred = self.predict(images, proj)
        loss = self.loss(pred, images, proj)
        with torch.no_grad():  # error inside P's range, which the loss ignores (diagnostic)
            r = self.grid.patchify(images).float() - self.grid.patchify(pred).float()
            kept = (proj.float() @ r).abs().mean()
        return {"loss": loss, "loss_kept": kept}

    @torch.no_grad()
    def reconstruct(self, batch: dict) -> Reconstruction:
        """masked: the image as the encoder gets it (P applied to the pixel patches; the patch embedding is
        linear, so this is what P does to the tokens up to the embedding's bias); pasted: the original's P-part
        plus the prediction's (I - P)-part."""
        images = batch["image"]
        proj = self.make_projection(batch).float()
        pred = self.predict(images, proj).float()
        x, y = self.grid.patchify(images.float()), self.grid.patchify(pred)
        px = proj @ x
        return Reconstruction(
            original=images, masked=self.grid.unpatchify(px), prediction=pred,
            pasted=self.grid.unpatchify(px + y - proj @ y),
        )
