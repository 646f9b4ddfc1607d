"""The floors a pretrained encoder is compared against, as encoders the protocols run unchanged.

* raw pixels (`PixelEncoder`): the normalised image flattened, with no parameters, so linear probe and kNN on
  "pixels" are the same code on the same splits as for any encoder (fine-tuning does not apply);
* random init: the same architecture freshly initialised (`mimkit.eval.finetune.random_init`); its fine-tune
  row is fine-tuning from scratch.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mimkit import rng
from mimkit.eval.finetune import random_init

RANDOM_INIT_STREAM = 0xBA5E11


class PixelEncoder(nn.Module):
    """images [B, C, H, W] -> [B, 2, C*H*W]: the flattened image as the class token and as the one patch token,
    so "cls" and "mean" pooling both give the pixels themselves."""

    def __init__(self, image_shape) -> None:
        super().__init__()
        self.image_shape = tuple(int(s) for s in image_shape)
        self.embed_dim = 1
        for s in self.image_shape:
            self.embed_dim *= s

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"PixelEncoder was built for images {list(self.image_shape)}, got "
                             f"{list(images.shape[1:])}")
        flat = images.flatten(1).float()
        return torch.stack([flat, flat], dim=1)


def image_shape_of(dataset) -> tuple[int, ...]:
    item = dataset[0]
    return tuple((item["image"] if isinstance(item, dict) else item[0]).shape)


def seeded_random_init(encoder: nn.Module, seed: int = 0) -> nn.Module:
    """`random_init(encoder)` drawn from its own seeded stream (the global RNG is left as it was): seed alone
    could redraw the very init the encoder was built from."""
    state = torch.random.get_rng_state()
    torch.manual_seed(rng.combine(int(seed), RANDOM_INIT_STREAM))
    try:
        return random_init(encoder)
    finally:
        torch.random.set_rng_state(state)


def baseline_encoders(encoder: nn.Module, dataset, seed: int = 0) -> dict[str, nn.Module]:
    """{"pretrained": encoder, "random_init": seeded_random_init(encoder, seed), "raw_pixels": PixelEncoder for
    `dataset`'s images}."""
    return {"pretrained": encoder, "random_init": seeded_random_init(encoder, seed),
            "raw_pixels": PixelEncoder(image_shape_of(dataset))}


def is_trainable(encoder: nn.Module) -> bool:
    """Whether fine-tuning applies (raw pixels have nothing to train)."""
    return any(p.requires_grad for p in encoder.parameters())
