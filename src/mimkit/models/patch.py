"""Patch geometry: the grid of an image and the (patch-row, patch-col, channel) flattening MAE uses."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def to_2tuple(v: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    a, b = v
    return (int(a), int(b))


@dataclass(frozen=True)
class PatchGrid:
    img_size: tuple[int, int]
    patch_size: tuple[int, int]
    in_chans: int

    def __post_init__(self):
        (h, w), (ph, pw) = self.img_size, self.patch_size
        if h % ph or w % pw:
            raise ValueError(f"image size {self.img_size} is not divisible by patch size {self.patch_size}")

    @classmethod
    def make(cls, img_size, patch_size, in_chans: int) -> "PatchGrid":
        return cls(to_2tuple(img_size), to_2tuple(patch_size), int(in_chans))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])

    @property
    def num_patches(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def patch_dim(self) -> int:
        return self.patch_size[0] * self.patch_size[1] * self.in_chans

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, N, ph*pw*C], each patch flattened as (row, col, channel) like MAE and HF."""
        b, c, h, w = images.shape
        gh, gw = self.shape
        ph, pw = self.patch_size
        if (c, h, w) != (self.in_chans, *self.img_size):
            raise ValueError(f"expected images of shape [B, {self.in_chans}, {self.img_size[0]}, {self.img_size[1]}], got {list(images.shape)}")
        x = images.reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, gh * gw, ph * pw * c)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """Inverse of `patchify`: [B, N, ph*pw*C] -> [B, C, H, W]."""
        b = patches.shape[0]
        gh, gw = self.shape
        ph, pw = self.patch_size
        x = patches.reshape(b, gh, gw, ph, pw, self.in_chans).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, self.in_chans, gh * ph, gw * pw)

    def expand_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Bool[B, N] patch mask -> Bool[B, 1, H, W] pixel mask."""
        gh, gw = self.shape
        ph, pw = self.patch_size
        m = mask.reshape(-1, 1, gh, 1, gw, 1).expand(-1, 1, gh, ph, gw, pw)
        return m.reshape(-1, 1, gh * ph, gw * pw)
