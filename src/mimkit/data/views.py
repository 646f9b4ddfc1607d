"""Several augmented views of one image, for methods that compare views (iBOT's two global crops, LUT's two
augmentations): a DINO/BYOL-style photometric pipeline for any channel count, every draw from the sample seed.

A method asks for views with the classmethod `Method.view_specs(method_cfg) -> list[ViewSpec]`; the trainer then
gives the training set a `MultiViewTransform` and every batch carries `batch["views"]`: a list of
Float[B, C, H, W], one per spec, at the spec's `size` (default: the training size; DINO/iBOT's local crops are
smaller). View 0 uses the sample seed itself for its crop, so it
is the crop the plain pipeline would take (photometric changes aside) and `batch["image"]` is view 0. Validation
and picture batches have no "views": methods use `batch["image"]` for every view there.

Photometric steps act on [0, 1] values before normalisation. Brightness, contrast, blur and solarisation apply
to any channel count; saturation, hue and grayscale mix channels and apply only to 3-channel (RGB) images,
where the luma weights mean something (for other counts they are skipped, never silently faked).
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from mimkit import rng
from mimkit.data.transforms import Normalize, TrainTransform


def _crop_scale_ok(v: tuple[float, float]) -> tuple[float, float]:
    if not 0.0 < v[0] <= v[1] <= 1.0:
        raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {v}")
    return v


# a RandomResizedCrop area range as a config field type (methods that request views expose one)
CropScale = Annotated[tuple[float, float], AfterValidator(_crop_scale_ok)]

VIEW_STREAM = 0x56494557  # "VIEW": photometric draws; crops use the transform's own stream
_LUMA = (0.299, 0.587, 0.114)


class ViewSpec(BaseModel):
    """One view: RandomResizedCrop scale, flip, and the probabilities/strengths of the photometric steps."""

    model_config = ConfigDict(extra="forbid")

    crop_scale: CropScale = Field((0.2, 1.0), description="RandomResizedCrop area range")
    size: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] | None = Field(
        None, description="(height, width) of the view in pixels; None: the training size")
    hflip: bool = True
    jitter_p: float = Field(0.0, ge=0, le=1, description="probability of colour jitter")
    brightness: float = Field(0.4, ge=0)
    contrast: float = Field(0.4, ge=0)
    saturation: float = Field(0.2, ge=0)
    hue: float = Field(0.1, ge=0, le=0.5)
    grayscale_p: float = Field(0.0, ge=0, le=1)
    blur_p: float = Field(0.0, ge=0, le=1)
    blur_sigma: tuple[float, float] = Field((0.1, 2.0), description="Gaussian sigma range at 224 px; scaled "
                                                                     "with the image size")
    solarize_p: float = Field(0.0, ge=0, le=1)


def byol_views() -> list[ViewSpec]:
    """BYOL/DINO's asymmetric pair: view 0 always blurred, view 1 rarely blurred and sometimes solarised."""
    common = dict(jitter_p=0.8, grayscale_p=0.2)
    return [ViewSpec(**common, blur_p=1.0), ViewSpec(**common, blur_p=0.1, solarize_p=0.2)]


def adjust(img: torch.Tensor, spec: ViewSpec, g: torch.Generator, blur_side: int | None = None) -> torch.Tensor:
    """The photometric steps of `spec` on a float [C, H, W] image in [0, 1]; draws from `g` in a fixed order
    (every draw is made whether or not its step applies, so one step's outcome never shifts another's).
    `blur_side`: the side the blur sigma is scaled by (/ 224), default the image's own; views smaller than the
    training size pass the training size, so, as in DINO, a local crop is blurred with the global crops' sigma."""
    u = torch.rand(12, generator=g, dtype=torch.float64).tolist()
    c = img.shape[0]
    x = img
    if u[0] < spec.jitter_p:
        b = 1 + spec.brightness * (2 * u[1] - 1)
        k = 1 + spec.contrast * (2 * u[2] - 1)
        s = 1 + spec.saturation * (2 * u[3] - 1)
        h = spec.hue * (2 * u[4] - 1)
        # torchvision applies the four in a random order; a fixed order keeps it simple and seeded
        x = (x * b).clamp(0, 1)
        x = ((x - x.mean()) * k + x.mean()).clamp(0, 1)
        if c == 3:
            gray = _luma(x)
            x = ((x - gray) * s + gray).clamp(0, 1)
            x = _rotate_hue(x, h)
    if c == 3 and u[5] < spec.grayscale_p:
        x = _luma(x).expand_as(x).clone()
    if u[6] < spec.blur_p:
        lo, hi = spec.blur_sigma
        scale = (blur_side or max(x.shape[-2:])) / 224
        x = _blur(x, (lo + (hi - lo) * u[7]) * scale)
    if u[8] < spec.solarize_p:
        x = torch.where(x >= 0.5, 1 - x, x)
    return x


def _luma(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(_LUMA, dtype=x.dtype).view(3, 1, 1)
    return (x * w).sum(0, keepdim=True)


def _rotate_hue(x: torch.Tensor, h: float) -> torch.Tensor:
    """Hue shift by h turns (in [-0.5, 0.5]) as a rotation about the gray axis in YIQ space."""
    if h == 0:
        return x
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=x.dtype)
    a = 2 * math.pi * h
    rot = torch.tensor([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]], dtype=x.dtype)
    m = torch.linalg.inv(to_yiq) @ rot @ to_yiq
    return torch.einsum("ij,jhw->ihw", m, x).clamp(0, 1)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = int(math.ceil(3 * sigma))
    if sigma <= 0 or radius < 1:
        return x
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[0]
    y = F.pad(x.unsqueeze(0), (radius, radius, radius, radius), mode="reflect" if radius < min(x.shape[-2:])
              else "replicate")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    y = F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return y.squeeze(0)


class MultiViewTransform:
    """One image -> {"image": view 0, "views": [view 0, view 1, ...]}, all normalised to (mean, std); each view
    at its spec's size, else `size`."""

    def __init__(self, size: tuple[int, int], specs: list[ViewSpec], crop_ratio=(3 / 4, 4 / 3), mean=None, std=None):
        if not specs:
            raise ValueError("MultiViewTransform needs at least one ViewSpec")
        self.specs = list(specs)
        # crops without normalisation: photometric steps work on [0, 1] values
        self.crops = [TrainTransform(s.size or size, s.crop_scale, crop_ratio, s.hflip) for s in self.specs]
        self.normalize = Normalize(mean, std) if mean is not None else None
        self.blur_side = max(int(size[0]), int(size[1]))

    @staticmethod
    def view_seed(seed: int, k: int) -> int:
        return int(seed) if k == 0 else rng.combine(seed, k, VIEW_STREAM)

    def __call__(self, img: torch.Tensor, seed: int) -> dict:
        views = []
        for k, (spec, crop) in enumerate(zip(self.specs, self.crops)):
            s = self.view_seed(seed, k)
            x = adjust(crop(img, s), spec, rng.generator(s, VIEW_STREAM), self.blur_side)
            views.append(self.normalize(x) if self.normalize is not None else x)
        return {"image": views[0], "views": views}


def views_of(batch: dict, count: int) -> list[torch.Tensor]:
    """The batch's augmented views, or `count` references to batch["image"] where there are none (validation,
    picture batches)."""
    views = batch.get("views")
    if views is None:
        return [batch["image"]] * count
    if len(views) < count:
        raise ValueError(f"the batch has {len(views)} views, the method needs {count}")
    return list(views[:count])
