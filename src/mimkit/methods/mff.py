"""MFF (Liu et al., ICCV 2023, "Improving Pixel-based MIM by Reducing Wasted Modeling Capability"): MAE whose decoder
reads a softmax-weighted fusion of several encoder layers instead of the last one alone, so shallow layers can supply
the low-level detail pixel targets ask for and the deep layers need not spend capacity on it.

Slots: RandomMasking -> VisionTransformer (visible tokens only, `run_blocks` taps) -> fusion neck
(Linear per tapped layer except the deepest, softmax(w) weighted sum over all 1 + V tokens, encoder's final norm)
-> MAEDecoder -> PixelTarget (norm-pix) -> masked MSE, exactly as MAE after the neck.

The fusion lives in the method, not in the encoder: at evaluation only the plain ViT is kept (as the reference keeps
only the backbone for fine-tuning). The weights are logged as fuse_w<i> (i = 0-based block) and fuse_shallow (the
total weight on layers other than the deepest); the card's claim is that fuse_shallow grows during training.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from mimkit.config import DepthFraction, MethodSection, ModelConfig
from mimkit.masking import Mask
from mimkit.methods.mae import MAE
from mimkit.models import MAEDecoder, VisionTransformer
from mimkit.models.vit import block_at, init_mae_weights


class MFFConfig(MethodSection):
    name: Literal["mff"] = "mff"
    mask_ratio: float = Field(0.75, gt=0.0, lt=1.0)
    norm_pix: bool = Field(True, description="MAE's per-patch normalised pixel targets")
    layers: list[DepthFraction] = Field(
        [1 / 12, 3 / 12, 5 / 12, 7 / 12, 9 / 12, 1.0], min_length=1,
        description="fused layers as fractions of depth: block round(f * depth) (at least 1), duplicates merged; "
                    "the reference's out_indices 0, 2, 4, 6, 8, 11 of 12",
    )


def fused_blocks(fractions, depth: int) -> list[int]:
    """Sorted distinct 0-based block indices: after block round(f * depth) (half up), at least the first."""
    return sorted({block_at(f, depth) for f in fractions})


class MFF(MAE):
    config_class = MFFConfig

    def __init__(self, encoder: VisionTransformer, decoder: MAEDecoder, layers=(1 / 12, 3 / 12, 5 / 12, 7 / 12, 9 / 12, 1.0),
                 mask_ratio: float = 0.75, norm_pix: bool = True):
        super().__init__(encoder, decoder, mask_ratio, norm_pix)
        self.layers = fused_blocks(layers, encoder.depth)
        d = encoder.embed_dim
        # the deepest fused layer enters as it is; every other one through its own Linear(D, D)
        self.proj = nn.ModuleList(nn.Linear(d, d) for _ in self.layers[:-1])
        init_mae_weights(self.proj)  # the reference's backbone init (xavier Linear) covers these layers too
        # one logit per layer, ones at init (uniform weights); frozen when there is nothing to weigh
        self.fuse_logits = nn.Parameter(torch.ones(len(self.layers)), requires_grad=len(self.layers) > 1)

    @classmethod
    def from_config(cls, method: MFFConfig, model: ModelConfig, img_size, in_chans: int, data=None) -> "MFF":
        encoder = VisionTransformer.from_config(model, img_size, in_chans)
        return cls(encoder, MAEDecoder.from_config(model, encoder), method.layers, method.mask_ratio, method.norm_pix)

    def fusion_weights(self) -> torch.Tensor:
        return torch.softmax(self.fuse_logits, dim=0)

    def fuse(self, images: torch.Tensor, mask: Mask) -> torch.Tensor:
        """Decoder input [B, 1 + V, D]: final norm of the weighted sum of the (projected) fused layers' tokens."""
        tokens = self.encoder.embed(images)
        tokens = torch.gather(tokens, 1, mask.ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        _, taps = self.encoder.run_blocks(tokens, self.layers)
        feats = [proj(taps[i]) for proj, i in zip(self.proj, self.layers[:-1])] + [taps[self.layers[-1]]]
        w = self.fusion_weights().to(feats[0].dtype)
        fused = (torch.stack(feats) * w.view(-1, 1, 1, 1)).sum(dim=0)
        return self.encoder.norm(fused)

    def predict(self, images: torch.Tensor, mask: Mask) -> torch.Tensor:
        return self.decoder(self.fuse(images, mask), mask.ids_restore)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        out = super().forward(batch)  # MAE's masking, target and masked loss around our predict
        w = self.fusion_weights().detach()
        out.update({f"fuse_w{i}": w[k] for k, i in enumerate(self.layers)})
        out["fuse_shallow"] = w[:-1].sum()
        return out

