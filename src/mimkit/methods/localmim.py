"""LocalMIM (Wang et al., CVPR 2023, "Masked Image Modeling with Local Multi-Scale Reconstruction"): small decoders
tapped at several encoder layers each regress HOG features at their own scale, fine scales from shallow layers and
coarse scales from deep ones, so every part of the encoder gets a local reconstruction signal.

Slots: RandomMasking -> VisionTransformer (visible tokens only, `run_blocks` taps, one LayerNorm per tap) -> one
MAEDecoder body per tap (1 block) + a resampling head (ConvT x2 / ConvT / identity / AvgPool for scales 4/2/1/0.5)
-> HOG targets with cell = patch / scale -> masked MSE per scale with the patch mask resampled to that scale, summed.

Small-scale geometry (card 0.6: cells [p/4, p/2, p, 2p]):
- A scale whose HOG cell would be smaller than `min_cell` pixels (p/4 = 1 px at patch 4) is dropped together with
  its tap: a one-pixel "histogram" is only the one-hot orientation of one pixel, not a HOG feature. Set
  min_cell=1 to keep it. Dropping removes a shallow tap, so the deep taps (and the top block) stay supervised.
- A coarse scale 1/k on a grid not divisible by k (FMNIST 28 px / patch 4 = 7x7 at scale 0.5) uses the largest
  divisible top-left sub-grid: the HOG target, the pooled prediction and the pooled mask all floor the same way,
  so the trailing patch row/column is supervised by the other scales only.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from timm.layers import LayerNorm2d

from mimkit.config import DepthFraction, MethodSection, ModelConfig
from mimkit.masking import Mask, RandomMasking, mask_from_noise
from mimkit.methods.base import Method
from mimkit.models import DECODER_PRESETS, MAEDecoder, VisionTransformer
from mimkit.models.vit import block_at
from mimkit.targets import HOG

SCALES = (4.0, 2.0, 1.0, 0.5)  # the resampling heads the reference defines


class LocalMIMConfig(MethodSection):
    name: Literal["localmim"] = "localmim"
    mask_ratio: float = Field(0.75, gt=0.0, lt=1.0)
    taps: list[DepthFraction] = Field(
        [2 / 12, 4 / 12, 10 / 12, 1.0], min_length=1,
        description="tapped layers as fractions of depth: the tap follows block round(f * depth) (at least 1); "
                    "the reference's blocks 2, 4, 10, 12 of 12",
    )
    scales: list[float] = Field(
        [4.0, 2.0, 1.0, 0.5], min_length=1,
        description="output scale of each tap relative to the patch grid (4, 2, 1 or 0.5); HOG cell = patch / scale",
    )
    hog_nbins: int = Field(9, ge=1, description="HOG orientation bins over [0, pi)")
    min_cell: int = Field(2, ge=1, description="drop scales (and their taps) whose HOG cell is below this many px")
    decoder_depth: int = Field(1, ge=1, description="transformer blocks per tap decoder (reference: 1); width and "
                               "heads come from the model's decoder preset")

    @field_validator("scales")
    @classmethod
    def _known_scales(cls, v: list[float]) -> list[float]:
        bad = [s for s in v if s not in SCALES]
        if bad:
            raise ValueError(f"scales must be among {list(SCALES)}, got {bad}")
        return v

    @model_validator(mode="after")
    def _paired(self) -> "LocalMIMConfig":
        if len(self.taps) != len(self.scales):
            raise ValueError(f"one scale per tap: {len(self.taps)} taps but {len(self.scales)} scales")
        return self


def tap_blocks(fractions, depth: int) -> list[int]:
    """0-based block indices of the taps: after block round(f * depth) (half up), at least the first block."""
    return [block_at(f, depth) for f in fractions]


def resample_mask(masked: torch.Tensor, grid_shape: tuple[int, int], scale: float) -> torch.Tensor:
    """Patch mask Bool[B, gh*gw] -> Float[B, L] weights at `scale` (raster order of the scale's map).

    scale >= 1: each patch's value repeated over its scale x scale sub-cells (a finer cell inherits its patch);
    scale 1/k: the mean over each k x k group of patches (a coarse cell is weighted by its hidden fraction, as the
    reference), on the largest top-left sub-grid divisible by k."""
    gh, gw = grid_shape
    m = masked.float().reshape(-1, 1, gh, gw)
    if scale >= 1:
        s = int(scale)
        m = m.repeat_interleave(s, dim=2).repeat_interleave(s, dim=3)
    else:
        k = int(round(1 / scale))
        m = F.avg_pool2d(m, k, k)  # floors: drops a trailing row/column that fills no k x k group
    return m.flatten(1)


class ScaleHead(nn.Module):
    """Decoder tokens on the patch grid -> [B, out, gh*s, gw*s]: the reference's per-scale resampling + 1x1 conv."""

    def __init__(self, dim: int, out_dim: int, scale: float):
        super().__init__()
        if scale == 4:
            if dim % 4:
                raise ValueError(f"scale 4 halves the decoder width twice: width {dim} is not divisible by 4")
            layers = [nn.ConvTranspose2d(dim, dim // 2, 2, 2), LayerNorm2d(dim // 2), nn.GELU(),
                      nn.ConvTranspose2d(dim // 2, dim // 4, 2, 2)]
            hidden = dim // 4
        elif scale == 2:
            if dim % 2:
                raise ValueError(f"scale 2 halves the decoder width: width {dim} is odd")
            layers, hidden = [nn.ConvTranspose2d(dim, dim // 2, 2, 2)], dim // 2
        elif scale == 1:
            layers, hidden = [], dim
        elif scale == 0.5:
            layers, hidden = [nn.AvgPool2d(2, 2)], dim
        else:
            raise ValueError(f"unsupported scale {scale}; choose among {list(SCALES)}")
        self.net = nn.Sequential(*layers, nn.Conv2d(hidden, out_dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LocalMIM(Method):
    config_class = LocalMIMConfig

    def __init__(self, encoder: VisionTransformer, taps=(2 / 12, 4 / 12, 10 / 12, 1.0), scales=SCALES,
                 mask_ratio: float = 0.75, hog_nbins: int = 9, min_cell: int = 2, decoder_dim: int = 128,
                 decoder_depth: int = 1, decoder_heads: int = 4):
        super().__init__()
        self.encoder = encoder
        self.grid = encoder.grid
        ph, pw = self.grid.patch_size
        if ph != pw:
            raise ValueError(f"LocalMIM's square HOG cells need a square patch, got {self.grid.patch_size}")
        gh, gw = self.grid.shape
        blocks = tap_blocks(taps, encoder.depth)
        kept = []
        for block, s in zip(blocks, scales):
            if (s >= 1 and ph % int(s)) or ph / s < min_cell:
                continue  # no whole HOG cell of at least min_cell px at this scale: drop the scale and its tap
            if s < 1 and (gh < 2 or gw < 2):
                raise ValueError(f"scale {s} pools 2x2 patches but the grid is {gh}x{gw}; drop it from method.scales")
            kept.append((block, float(s)))
        if not kept:
            raise ValueError(f"no LocalMIM scale in {list(scales)} has HOG cells of >= {min_cell} px "
                             f"with patch {ph}; lower method.min_cell or add coarser scales")
        self.tap_layers = [b for b, _ in kept]
        self.scales = [s for _, s in kept]
        self.masking = RandomMasking(mask_ratio)
        out_dim = self.grid.in_chans * hog_nbins
        # the reference gives each tap its own LayerNorm; a tap on the last block uses the encoder's final norm,
        # which is what that tap's norm is in the reference (it has no other), so evaluation features see it trained
        last = encoder.depth - 1
        self.tap_norms = nn.ModuleList(
            nn.Identity() if b == last else nn.LayerNorm(encoder.embed_dim, eps=1e-6) for b in self.tap_layers
        )
        self.decoders = nn.ModuleList()
        for _ in self.scales:
            body = MAEDecoder(self.grid.shape, encoder.embed_dim, out_dim=decoder_dim, dim=decoder_dim,
                              depth=decoder_depth, num_heads=decoder_heads)
            body.pred = nn.Identity()  # the tokens go to the resampling head as a map, not to a per-patch Linear
            self.decoders.append(body)
        self.heads = nn.ModuleList(ScaleHead(decoder_dim, out_dim, s) for s in self.scales)
        self.hogs = nn.ModuleList(HOG(hog_nbins, int(ph / s)) for s in self.scales)  # cell = patch / scale
        names = [f"loss_s{s:g}" for s in self.scales]
        self.metric_names = [n if names.count(n) == 1 else f"{n}_{k}" for k, n in enumerate(names)]

    @classmethod
    def from_config(cls, method: LocalMIMConfig, model: ModelConfig, img_size, in_chans: int, data=None) -> "LocalMIM":
        encoder = VisionTransformer.from_config(model, img_size, in_chans)
        spec = DECODER_PRESETS[model.decoder]
        return cls(encoder, method.taps, method.scales, method.mask_ratio, method.hog_nbins, method.min_cell,
                   decoder_dim=model.decoder_dim or spec.dim, decoder_depth=method.decoder_depth,
                   decoder_heads=model.decoder_heads or spec.num_heads)

    def make_mask(self, batch: dict) -> Mask:
        if "mask_noise" in batch:  # explicit noise: tests and comparisons with other implementations
            return mask_from_noise(batch["mask_noise"], self.masking.ratio)
        return self.masking(batch["seed"], self.grid.num_patches)

    def encode(self, images: torch.Tensor, mask: Mask) -> list[torch.Tensor]:
        """Visible-only encoding; the normalised tokens [B, 1 + V, D] at each tap, in tap order."""
        tokens = self.encoder.embed(images)
        tokens = torch.gather(tokens, 1, mask.ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        _, taps = self.encoder.run_blocks(tokens, sorted(set(self.tap_layers)))
        last = self.encoder.depth - 1
        return [(self.encoder.norm if b == last else norm)(taps[b]) for b, norm in zip(self.tap_layers, self.tap_norms)]

    def predict(self, images: torch.Tensor, mask: Mask) -> list[torch.Tensor]:
        """HOG predictions per tap: [B, L_k, C * nbins] on each scale's map in raster order."""
        gh, gw = self.grid.shape
        preds = []
        for latent, decoder, head in zip(self.encode(images, mask), self.decoders, self.heads):
            x = decoder(latent, mask.ids_restore)  # [B, N, dim]
            x = head(x.transpose(1, 2).reshape(x.shape[0], -1, gh, gw))
            preds.append(x.flatten(2).transpose(1, 2))
        return preds

    @torch.no_grad()
    def targets(self, images: torch.Tensor) -> list[torch.Tensor]:
        """HOG of the whole image at each scale's cell: [B, L_k, C * nbins], raster order."""
        return [hog(images).flatten(2).transpose(1, 2) for hog in self.hogs]

    def scale_weights(self, mask: Mask) -> list[torch.Tensor]:
        """The patch mask resampled to each scale: Float[B, L_k]."""
        return [resample_mask(mask.masked, self.grid.shape, s) for s in self.scales]

    def scale_losses(self, images: torch.Tensor, mask: Mask) -> list[torch.Tensor]:
        """Per scale: sum over positions of weight * mean-over-channels squared error, over the sum of weights."""
        losses = []
        for pred, target, w in zip(self.predict(images, mask), self.targets(images), self.scale_weights(mask)):
            per_pos = (pred.float() - target.float()).pow(2).mean(dim=-1)
            losses.append((per_pos * w).sum() / w.sum().clamp_min(1e-6))
        return losses

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        losses = self.scale_losses(batch["image"], self.make_mask(batch))
        out = {"loss": torch.stack(losses).sum()}  # the reference sums the scales with equal weights
        out.update({name: loss.detach() for name, loss in zip(self.metric_names, losses)})
        return out
