"""Hi-End-MAE (Tang et al., MedIA 2025), 2-D port: MAE whose decoder also cross-attends to intermediate encoder layers.

Encoder-driven hierarchical dense decoding: the decoder starts from MAE's sequence (projected final visible tokens +
mask tokens + sin-cos positions), runs self-attention blocks, then one cross-attention block per tapped encoder
layer, deepest first (the reference reads layers 9, 6, 3 of 12 in that order), each with its own Linear projection of
that layer's visible tokens. Loss: norm-pix MSE on masked patches.

Slots: MAE's (RandomMasking -> VisionTransformer (visible tokens, run_blocks taps) -> PixelTarget -> masked MSE)
with CrossDecoder(memories = taps) as the decoder.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from mimkit.config import DepthFraction, MethodSection, ModelConfig
from mimkit.masking import Mask
from mimkit.methods.mae import MAE
from mimkit.models import DECODER_PRESETS, VisionTransformer
from mimkit.models.cross_decoder import CrossDecoder
from mimkit.models.vit import block_at, init_mae_weights


class HiEndMAEConfig(MethodSection):
    name: Literal["hi_end_mae"] = "hi_end_mae"
    mask_ratio: float = Field(0.75, gt=0.0, lt=1.0, description="share of patches hidden from the encoder")
    norm_pix: bool = Field(True, description="per-patch normalised pixel targets (MAE's norm_pix_loss)")
    cross_layers: list[DepthFraction] = Field(
        [0.75, 0.5, 0.25], min_length=1,
        description="encoder layers the cross-attention blocks read, in decoding order, as fractions of depth: "
                    "f means 1-based block round(f * depth), clamped to [1, depth] (ViT-12: 9, 6, 3)",
    )


tap_index = block_at  # the paper's layers 9, 6, 3 of 12 are fractions 0.75, 0.5, 0.25


class HiEndMAE(MAE):
    """MAE's masking, target, loss and pictures; only the decoder and what it reads differ (`predict`)."""

    config_class = HiEndMAEConfig

    def __init__(self, encoder: VisionTransformer, decoder: CrossDecoder, cross_layers=(0.75, 0.5, 0.25),
                 mask_ratio: float = 0.75, norm_pix: bool = True):
        super().__init__(encoder, decoder, mask_ratio, norm_pix)
        self.taps = [tap_index(f, encoder.depth) for f in cross_layers]
        if len(self.taps) != len(decoder.cross_blocks):
            raise ValueError(f"{len(self.taps)} tapped layers but {len(decoder.cross_blocks)} cross-attention blocks")
        # one projection per decoder input, as the reference (4 Linear layers: final output + 3 taps)
        self.proj_final = nn.Linear(encoder.embed_dim, decoder.dim)
        self.proj_layers = nn.ModuleList([nn.Linear(encoder.embed_dim, decoder.dim) for _ in self.taps])
        init_mae_weights(self.proj_final)
        init_mae_weights(self.proj_layers)

    @classmethod
    def from_config(cls, method: HiEndMAEConfig, model: ModelConfig, img_size, in_chans: int, data=None) -> "HiEndMAE":
        encoder = VisionTransformer.from_config(model, img_size, in_chans)
        spec = DECODER_PRESETS[model.decoder]
        dim = model.decoder_dim or spec.dim
        # the preset's depth is the number of self-attention blocks (reference: 2 self + 3 cross); each cross block
        # also self-attends first, as the reference builds them with self_attn=True
        decoder = CrossDecoder(
            encoder.grid.shape, [dim] * len(method.cross_layers), encoder.grid.patch_dim, dim=dim,
            num_heads=model.decoder_heads or spec.num_heads, self_depth=model.decoder_depth or spec.depth,
            cross_self_attn=True,
        )
        return cls(encoder, decoder, method.cross_layers, method.mask_ratio, method.norm_pix)

    def encode(self, images: torch.Tensor, mask: Mask) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """(normed output [B, 1 + V, D], {block index: pre-norm tokens [B, 1 + V, D]}) on the visible patches."""
        tokens = self.encoder.embed(images)
        tokens = torch.gather(tokens, 1, mask.ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        return self.encoder.run_blocks(tokens, taps=sorted(set(self.taps)))

    def memories(self, layers: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        """What cross-attention block i reads: proj_i(block taps[i]'s visible tokens, class token included).
        The reference projects raw hidden states (no LayerNorm, no added positions: they already carry them)."""
        return [proj(layers[t]) for proj, t in zip(self.proj_layers, self.taps)]

    def predict(self, images: torch.Tensor, mask: Mask) -> torch.Tensor:
        latent, layers = self.encode(images, mask)
        x = self.decoder.fill(self.proj_final(latent), mask.ids_restore)
        return self.decoder(x, self.memories(layers))[:, 1:, :]
