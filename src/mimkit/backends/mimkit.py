"""mimkit runs as encoders: a checkpoint file or run folder, or a mimkit ViT in memory (`wrap_mimkit`)."""

from __future__ import annotations

import torch.nn as nn

from mimkit.backends.attention import timm_attention_reader
from mimkit.backends.base import EncoderAdapter, LoadedEncoder, pair


class MimkitEncoder(EncoderAdapter):
    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.model.grid.shape)

    def forward(self, images):
        return self.model(self._input(images))

    def forward_layers(self, images, layers):
        return self.model.forward_layers(self._input(images), self._layer_ids(layers))

    def attention_readers(self):
        return [timm_attention_reader(b.attn, f"mimkit {type(self.model).__name__}") for b in self.model.blocks]


def load_mimkit(path: str) -> LoadedEncoder:
    from mimkit.backends.runs import encoder_from_checkpoint, find_checkpoint

    encoder, _, ckpt = encoder_from_checkpoint(find_checkpoint(path))
    return wrap_mimkit(encoder, ckpt["data"])


def wrap_mimkit(enc: nn.Module, data: dict) -> LoadedEncoder:
    """A mimkit ViT with its checkpoint's data section ({"img_size", "channels", "mean", "std"})."""
    return LoadedEncoder(MimkitEncoder(enc, int(data["channels"]), enc.depth, enc.embed_dim), pair(data["img_size"]),
                         int(data["channels"]), list(data["mean"]), list(data["std"]))
