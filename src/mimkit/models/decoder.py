"""MAE's transformer decoder: mask tokens fill the hidden positions, then a narrow ViT predicts patches."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from mimkit.models.pos_embed import sincos_2d
from mimkit.models.vit import init_mae_weights


@dataclass(frozen=True)
class DecoderSpec:
    depth: int
    dim: int
    num_heads: int


DECODER_PRESETS: dict[str, DecoderSpec] = {
    "tiny": DecoderSpec(2, 128, 4),
    "small": DecoderSpec(4, 256, 8),
    "base": DecoderSpec(8, 512, 16),
    "mae": DecoderSpec(8, 512, 16),
}


class MAEDecoder(nn.Module):
    def __init__(self, grid_shape: tuple[int, int], encoder_dim: int, out_dim: int,
                 dim: int = 512, depth: int = 8, num_heads: int = 16, mlp_ratio: float = 4.0):
        super().__init__()
        self.grid_shape = tuple(grid_shape)
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        pos = sincos_2d(dim, self.grid_shape, cls_token=True)[None]
        self.pos_embed = nn.Parameter(pos, requires_grad=False)
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.Sequential(
            *[Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)]
        )
        self.norm = norm_layer(dim)
        self.pred = nn.Linear(dim, out_dim)
        init_mae_weights(self)
        nn.init.normal_(self.mask_token, std=0.02)

    @classmethod
    def from_config(cls, model, encoder, out_dim: int | None = None) -> "MAEDecoder":
        """The decoder a `model` section (ModelConfig) describes, for this encoder; predicts `out_dim` values
        per patch (default: the encoder's patch pixels)."""
        spec = DECODER_PRESETS[model.decoder]
        return cls(
            encoder.grid.shape, encoder.embed_dim, out_dim or encoder.grid.patch_dim,
            dim=model.decoder_dim or spec.dim, depth=model.decoder_depth or spec.depth,
            num_heads=model.decoder_heads or spec.num_heads,
        )

    def tokens(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """The decoder's input [B, 1 + N, Dd]: embedded visible tokens and mask tokens back in raster order, plus
        position embeddings. latent [B, 1 + V, De]: class token first, visible tokens in keep order."""
        x = self.embed(latent)
        b, n = ids_restore.shape
        visible = x[:, 1:, :]
        fill = self.mask_token.to(x.dtype).expand(b, n - visible.shape[1], -1)
        x_ = torch.cat([visible, fill], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # back to raster order
        return torch.cat([x[:, :1, :], x_], dim=1) + self.pos_embed

    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Blocks, norm and the linear prediction for decoder tokens [B, 1 + N, Dd] -> [B, N, out]."""
        return self.pred(self.norm(self.blocks(tokens))[:, 1:, :])

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [B, 1 + V, De] (class token first, visible tokens in keep order) -> predictions [B, N, out]."""
        return self.head(self.tokens(latent, ids_restore))
