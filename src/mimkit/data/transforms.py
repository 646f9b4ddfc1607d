"""Tensor transforms for any channel count, with all randomness drawn from the per-sample seed.

Images enter as ``uint8`` or float tensors ``[C, H, W]`` (float values in [0, 1]) and leave as normalized
float32 ``[C, H_out, W_out]``.

* :class:`TrainTransform` - MAE augmentation: RandomResizedCrop (bicubic, antialiased, clamped to [0, 1])
  followed by a horizontal flip with probability 1/2. The crop parameters follow torchvision's algorithm
  (10 tries, then a centre crop with clamped aspect) but every draw comes from
  ``mimkit.rng.generator(seed)``, never the global RNG, so a sample's crop depends only on its seed. For a
  non-square output the aspect-ratio range is taken relative to the output aspect (W_out / H_out), so the
  default (3/4, 4/3) range stretches a crop by the same amount whatever the output shape.
* :class:`EvalTransform` - no randomness: resize so the *shorter* side (relative to the output) matches,
  preserving the aspect ratio, then centre-crop to the exact output size. An image already at the output
  size is left untouched.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mimkit import rng

CROP_STREAM = 0x43524F50  # "CROP": separates crop draws from other uses of the sample seed
_TRIES = 10


def to_float(img: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1]; float input is copied as float32 (callers may then work in place)."""
    if img.dtype == torch.uint8:
        return img.to(torch.float32).div_(255.0)
    return img.to(torch.float32, copy=True)


def resize(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic antialiased resize of a float [C, H, W] tensor, clamped to [0, 1]."""
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    out = F.interpolate(img.unsqueeze(0), size=size, mode="bicubic", align_corners=False, antialias=True)
    return out.squeeze(0).clamp_(0.0, 1.0)


def crop_params(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                u: torch.Tensor) -> tuple[int, int, int, int]:
    """RandomResizedCrop box (top, left, h, w) from pre-drawn uniforms u (4 per try)."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    vals = u.tolist()
    for t in range(_TRIES):
        u0, u1, u2, u3 = vals[4 * t : 4 * t + 4]
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u0)
        aspect = math.exp(log_lo + (log_hi - log_lo) * u1)
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u2 * (height - h + 1)), height - h)
            left = min(int(u3 * (width - w + 1)), width - w)
            return top, left, h, w
    # fallback: centre crop with the aspect clamped into the range
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    h, w = max(1, min(h, height)), max(1, min(w, width))
    return (height - h) // 2, (width - w) // 2, h, w


class Normalize:
    def __init__(self, mean, std):
        self.mean = torch.as_tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(list(std), dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return img.sub_(self.mean).div_(self.std)


class TrainTransform:
    """RandomResizedCrop + optional hflip, seeded per sample; then normalization (if mean/std given)."""

    def __init__(self, size: tuple[int, int], scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), hflip: bool = True,
                 mean=None, std=None):
        self.size = (int(size[0]), int(size[1]))
        self.scale = (float(scale[0]), float(scale[1]))
        out_aspect = self.size[1] / self.size[0]
        self.ratio = (float(ratio[0]) * out_aspect, float(ratio[1]) * out_aspect)
        self.hflip = hflip
        self.normalize = Normalize(mean, std) if mean is not None else None

    def params(self, height: int, width: int, seed: int) -> tuple[int, int, int, int, bool]:
        """(top, left, h, w, flip) for an image of this size and this seed."""
        u = torch.rand(4 * _TRIES + 1, generator=rng.generator(seed, CROP_STREAM), dtype=torch.float64)
        top, left, h, w = crop_params(height, width, self.scale, self.ratio, u[:-1])
        return top, left, h, w, bool(self.hflip and float(u[-1]) < 0.5)

    def __call__(self, img: torch.Tensor, seed: int) -> torch.Tensor:
        top, left, h, w, flip = self.params(img.shape[-2], img.shape[-1], seed)
        x = to_float(img[:, top : top + h, left : left + w])
        x = resize(x, self.size)
        if flip:
            x = x.flip(-1)
        return self.normalize(x) if self.normalize is not None else x


class EvalTransform:
    """Shorter-side resize + centre crop to the exact size (no randomness); then normalization."""

    def __init__(self, size: tuple[int, int], mean=None, std=None):
        self.size = (int(size[0]), int(size[1]))
        self.normalize = Normalize(mean, std) if mean is not None else None

    def __call__(self, img: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        x = to_float(img)
        H, W = x.shape[-2:]
        th, tw = self.size
        if (H, W) != (th, tw):
            s = max(th / H, tw / W)
            nh, nw = max(th, int(round(H * s))), max(tw, int(round(W * s)))
            x = resize(x, (nh, nw))
            top, left = (nh - th) // 2, (nw - tw) // 2
            x = x[:, top : top + th, left : left + tw]
            x = x.contiguous()
        return self.normalize(x) if self.normalize is not None else x
