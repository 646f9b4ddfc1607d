"""A2MIM (Li et al., ICML 2023, "Architecture-Agnostic Masked Image Modeling"): SimMIM-style pixel MIM that
works for ViTs and CNNs alike. Hidden pixels of the input are filled with the image's mean colour, a learnable
mask token is ADDED (not substituted) to the hidden positions' features at an intermediate layer, a linear
pixel-shuffle head reconstructs the image, and the loss is L1 on hidden pixels plus a focal frequency loss.

Slots: CoarseMasking (SimMIM's 32-px units = 2 cells at small scale) -> mean-colour fill of the input ->
ViT (VisionTransformer, token added at the patch embedding or before block k) or CNN (ResNetEncoder, token
added to the map entering stage k) -> PixelShuffleHead -> spatial L1 / focal L1 on hidden pixels +
FocalFrequencyLoss (mimkit.losses.frequency) on the prediction with its visible pixels replaced.

Defaults follow the reference (openmixup configs/selfsup/_base_/models/a2mim/{vit_small,r50}.py); knobs left at
None take the reference value of the encoder kind (ViT / CNN).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from mimkit.config import MethodSection, ModelConfig
from mimkit.losses.frequency import FocalFrequencyLoss, spectrum
from mimkit.masking import CoarseMasking, Mask
from mimkit.methods.base import Method, Reconstruction
from mimkit.models import PixelShuffleHead
from mimkit.models.cnn import ResNetEncoder, build_encoder

# reference values per encoder kind: (mask_layer as a fraction of depth, spatial loss, fft weight,
# fft weight of visible pixels)
_VIT = dict(mask_layer=0.0, spatial_loss="l1", fft_weight=0.1, fft_unmask_weight=0.0)
_CNN = dict(mask_layer=0.75, spatial_loss="focal_l1", fft_weight=0.5, fft_unmask_weight=1e-3)


class A2MIMConfig(MethodSection):
    name: Literal["a2mim"] = "a2mim"
    mask_ratio: float = Field(0.6, gt=0.0, lt=1.0, description="fraction of mask units hidden")
    mask_unit: int = Field(2, ge=1, description="mask unit in cells of model.patch_size px (32-px units over "
                           "16-px cells in the reference; 2p at small scale)")
    fill: Literal["mean", "zero"] = Field("mean", description="colour of hidden input pixels: the image's "
                                          "per-channel mean (A2MIM) or 0 (SimMIM)")
    mask_layer: float | None = Field(None, ge=0.0, lt=1.0, description="where the mask token is added, as a "
                                     "fraction f of depth: index round(f * depth), at most depth - 1. ViT: 0 = the "
                                     "patch embedding, i = the input of block i; CNN: the input of stage i. "
                                     "None: ViT 0, CNN 0.75 (stage 3 of 4, stride 16 at 224 px)")
    mask_gamma: float = Field(0.0, ge=0.0, description="0: pure residual x + token; > 0: initial value of a "
                              "learnable per-channel scale of the hidden features before the token is added "
                              "(the reference's ResNet '_init' recipes: 1e-6)")
    spatial_loss: Literal["auto", "l1", "focal_l1"] = Field("auto", description="auto: l1 (ViT), focal_l1 (CNN)")
    focal_alpha: float = Field(0.2, gt=0.0, description="focal L1: |e| * (2 sigmoid(alpha |e|) - 1)^gamma")
    focal_gamma: float = Field(1.0, ge=0.0)
    fft_weight: float | None = Field(None, ge=0.0, description="weight of the focal frequency loss; None: 0.1 "
                                     "(ViT), 0.5 (CNN); 0 turns it off (the FFT ablation)")
    fft_alpha: float = Field(1.0, gt=0.0, description="exponent of the spectral error in the focal weight")
    fft_unmask_weight: float | None = Field(None, ge=0.0, le=1.0, description="share of the prediction kept at "
                                            "visible pixels in the FFT input; None: 0 (ViT), 1e-3 (CNN)")
    fft_unmask_replace: Literal["mixed", "target", "prediction", "mean"] = Field(
        "mixed", description="what stands in for visible pixels in the FFT input: mixed = 0.5 sg(pred) + 0.5 x")


def focal_l1(pred: torch.Tensor, target: torch.Tensor, alpha: float = 0.2, gamma: float = 1.0) -> torch.Tensor:
    """Elementwise focal L1 (Yang et al., 2021), the reference's ResNet spatial loss: |e| (2 sigmoid(a|e|) - 1)^g."""
    e = (pred - target).abs()
    return e * (2 * torch.sigmoid(alpha * e) - 1) ** gamma


class A2MIM(Method):
    config_class = A2MIMConfig

    def __init__(self, encoder: nn.Module, mask_ratio: float = 0.6, mask_unit: int = 2, fill: str = "mean",
                 mask_layer: float | None = None, mask_gamma: float = 0.0, spatial_loss: str = "auto",
                 focal_alpha: float = 0.2, focal_gamma: float = 1.0, fft_weight: float | None = None,
                 fft_alpha: float = 1.0, fft_unmask_weight: float | None = None, fft_unmask_replace: str = "mixed"):
        super().__init__()
        self.encoder = encoder
        self.grid = encoder.grid
        self.is_cnn = isinstance(encoder, ResNetEncoder)
        ref = _CNN if self.is_cnn else _VIT
        frac = ref["mask_layer"] if mask_layer is None else mask_layer
        self.mask_layer = min(encoder.depth - 1, int(round(frac * encoder.depth)))
        self.fill = fill
        self.spatial_loss = ref["spatial_loss"] if spatial_loss == "auto" else spatial_loss
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.fft_weight = ref["fft_weight"] if fft_weight is None else fft_weight
        self.fft_unmask_weight = ref["fft_unmask_weight"] if fft_unmask_weight is None else fft_unmask_weight
        self.fft_unmask_replace = fft_unmask_replace
        self.fft_loss = FocalFrequencyLoss(alpha=fft_alpha, ave_spectrum=True, log_matrix=True, batch_matrix=True)
        self.masking = CoarseMasking(mask_ratio, mask_unit)

        dim = encoder.input_dims[self.mask_layer] if self.is_cnn else encoder.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)  # reference: trunc_normal(std .02), no weight decay
        # 1-D so that the optimizer leaves it undecayed, as the reference does
        self.mask_gamma = nn.Parameter(torch.full((dim,), float(mask_gamma))) if mask_gamma > 0 else None
        if self.is_cnn:  # the neck reads the last feature map: 1x1 conv + PixelShuffle(total stride), cropped
            self.head = PixelShuffleHead(encoder.embed_dim, encoder.out_stride, self.grid.in_chans,
                                         encoder.feature_shape)
        else:
            self.head = PixelShuffleHead(encoder.embed_dim, self.grid.patch_size, self.grid.in_chans, self.grid.shape)

    @classmethod
    def from_config(cls, method: A2MIMConfig, model: ModelConfig, img_size, in_chans: int, data=None) -> "A2MIM":
        encoder = build_encoder(model, img_size, in_chans)
        kw = method.model_dump(exclude={"name"})
        return cls(encoder, **kw)

    # corruption ----------------------------------------------------------------------------------------------
    def make_mask(self, batch: dict) -> Mask:
        return self.masking(batch["seed"], self.grid.shape)

    def fill_hidden(self, images: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """The encoder's input: hidden pixels set to each image's per-channel mean over ALL its pixels (the
        reference's BlockwiseMaskGenerator mask_color='mean', in normalised space), or to 0."""
        hidden = self.grid.expand_mask(masked)
        colour = images.mean(dim=(2, 3), keepdim=True) if self.fill == "mean" else torch.zeros_like(images[:, :, :1, :1])
        return torch.where(hidden, colour.expand_as(images), images)

    def feature_mask(self, masked: torch.Tensor) -> torch.Tensor:
        """Where to add the token at the mask layer: Bool[B, N] patch tokens (ViT) or Bool[B, 1, h, w] (CNN:
        the pixel mask sampled at the top-left pixel of each cell of the map entering the stage; exact when the
        stage's stride divides the mask cell, as with patch_size = that stride)."""
        if not self.is_cnn:
            return masked
        s = self.encoder.input_strides()[self.mask_layer]
        return self.grid.expand_mask(masked)[:, :, ::s, ::s]

    def add_mask_token(self, feats: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """x + m * token (residual); with mask_gamma, hidden features are first scaled by gamma. ViT feats
        [B, N, D] with where Bool[B, N]; CNN feats [B, D, h, w] with where Bool[B, 1, h, w]."""
        if self.is_cnn:
            w, token = where.to(feats.dtype), self.mask_token.view(1, -1, 1, 1)
            gamma = None if self.mask_gamma is None else self.mask_gamma.view(1, -1, 1, 1)
        else:
            w, token = where.unsqueeze(-1).to(feats.dtype), self.mask_token.view(1, 1, -1)
            gamma = self.mask_gamma
        if gamma is not None:
            feats = feats * (1 - w) + feats * w * gamma.to(feats.dtype)
        return feats + w * token.to(feats.dtype)

    # model ---------------------------------------------------------------------------------------------------
    def encode(self, filled: torch.Tensor, masked: torch.Tensor, record: dict | None = None) -> torch.Tensor:
        """Last features of the corrupted input: patch tokens [B, N, D] (ViT, normed) or the map [B, D, h, w]
        (CNN). `record`, if given, receives the features at the mask layer "before" and "after" the token."""
        where = self.feature_mask(masked)

        def inject(feats):
            out = self.add_mask_token(feats, where)
            if record is not None:
                record["before"], record["after"] = feats, out
            return out

        if self.is_cnn:
            hook = lambda i, x: inject(x) if i == self.mask_layer else x  # noqa: E731
            return self.encoder.forward_maps(filled, hook)[-1]
        enc = self.encoder
        if self.mask_layer == 0:
            # the reference adds the token to the patch embedding before the position embedding
            tokens = inject(enc.patch_embed(filled)) + enc.pos_embed[:, 1:, :]
        else:
            tokens = enc.embed(filled)
        x = enc._with_cls(tokens)
        for i, block in enumerate(enc.blocks):
            if i == self.mask_layer and i > 0:  # the input of block i; the class token gets nothing
                x = torch.cat([x[:, :1], inject(x[:, 1:])], dim=1)
            x = block(x)
        return enc.norm(x)[:, 1:]

    def predict(self, images: torch.Tensor, mask: Mask) -> torch.Tensor:
        """Pixel predictions [B, C, H, W] everywhere, from the mean-filled image."""
        feats = self.encode(self.fill_hidden(images, mask.masked), mask.masked)
        if self.is_cnn:
            feats = feats.flatten(2).transpose(1, 2)
        h, w = self.grid.img_size
        return self.head(feats)[:, :, :h, :w]  # a CNN's ceil-sized last map can overhang the image

    # loss ----------------------------------------------------------------------------------------------------
    def fft_input(self, pred: torch.Tensor, images: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The prediction at hidden pixels; at visible ones a stand-in (detached) plus `fft_unmask_weight` of
        the prediction, as the reference's A2MIMHead."""
        replace = {
            "mixed": lambda: 0.5 * pred.detach() + 0.5 * images,
            "target": lambda: images,
            "prediction": lambda: pred.detach(),
            "mean": lambda: images.mean(dim=(2, 3), keepdim=True).expand_as(images),
        }[self.fft_unmask_replace]()
        keep = hidden + (1 - hidden) * self.fft_unmask_weight
        return pred * keep + replace * (1 - keep)

    def losses(self, pred: torch.Tensor, images: torch.Tensor, masked: torch.Tensor) -> dict[str, torch.Tensor]:
        pred, images = pred.float(), images.float()
        hidden = self.grid.expand_mask(masked).float()  # [B, 1, H, W]
        if self.spatial_loss == "focal_l1":
            err = focal_l1(pred, images, self.focal_alpha, self.focal_gamma)
        else:
            err = (pred - images).abs()
        # sum over hidden pixels / hidden pixels / channels: the mean over hidden pixel-channel values
        spatial = (err * hidden).sum() / (hidden.sum() * images.shape[1]).clamp_min(1.0)
        out = {"spatial": spatial}
        if self.fft_weight > 0:
            fft = self.fft_loss(self.fft_input(pred, images, hidden), images)
            out["fft"] = fft
            out["loss"] = spatial + self.fft_weight * fft
        else:
            out["loss"] = spatial
        with torch.no_grad():
            out["high_freq_err"] = high_frequency_share(torch.where(hidden.bool(), pred, images), images)
        return out

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["image"]
        mask = self.make_mask(batch)
        return self.losses(self.predict(images, mask), images, mask.masked)

    @torch.no_grad()
    def reconstruct(self, batch: dict) -> Reconstruction:
        images = batch["image"]
        mask = self.make_mask(batch)
        pred = self.predict(images, mask).float()
        hidden = self.grid.expand_mask(mask.masked)
        return Reconstruction.from_mask(images, pred, hidden, masked=self.fill_hidden(images, mask.masked))


def high_frequency_share(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Share of the spectral error energy of `pred` at the upper half of radial frequencies (|k| > Nyquist/2):
    A2MIM's claim is that the FFT loss moves learning towards mid/high frequencies, so this share should fall
    relative to a run without it."""
    d = spectrum(pred) - spectrum(target)
    energy = (d ** 2).sum(-1)  # [B, C, H, W]
    h, w = energy.shape[-2:]
    fy = torch.fft.fftfreq(h, device=energy.device).abs().view(-1, 1)
    fx = torch.fft.fftfreq(w, device=energy.device).abs().view(1, -1)
    high = ((fy ** 2 + fx ** 2).sqrt() > 0.25).to(energy.dtype)
    return (energy * high).sum() / energy.sum().clamp_min(1e-12)


__all__ = ["A2MIM", "A2MIMConfig", "focal_l1", "high_frequency_share"]
