"""What every backend gives: an encoder adapter with one interface, and the loaded encoder's input description.

`encoder(images)` -> tokens [B, 1 + N, D] (class token first; the mean patch token for models without one),
`encoder.forward_layers(images, layers)` -> the tokens after chosen blocks (before the final norm),
`encoder.forward_layers_with_attention(images, layers, attention_layers)` -> those tokens and the chosen blocks'
attention probabilities from the same pass; `depth`, `embed_dim`, `grid_size`, `has_cls`, `num_prefix` describe
it. A backend subclasses `EncoderAdapter` and says how to run its model's blocks and where their attention is.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from mimkit.backends.attention import AttentionReader, read_attention

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# OpenAI CLIP's pixel statistics (its preprocessor's defaults; also open_clip's OPENAI_DATASET_MEAN/STD)
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
PROJ_SUFFIX = "#proj"


class LoadedEncoder(NamedTuple):
    encoder: nn.Module
    img_size: tuple[int, int]
    channels: int
    mean: list[float]
    std: list[float]


class EncoderAdapter(nn.Module):
    """Common wrapper: channel repeat, [B, 1 + N, D] outputs, `forward_layers`, `depth`, `embed_dim`, `grid_size`,
    and attention read from the same pass (`attention_readers`, `forward_layers_with_attention`).

    `has_cls`: the model has a class token (else the mean patch stands in for it in the outputs); `num_prefix`:
    how many tokens precede the patches in the model's own sequence (class, then registers)."""

    has_cls: bool = True
    num_prefix: int = 1

    def __init__(self, model: nn.Module, channels: int, depth: int, embed_dim: int):
        super().__init__()
        self.model, self.channels, self.depth, self.embed_dim = model, channels, depth, embed_dim

    def attention_readers(self) -> list[AttentionReader]:
        """Per block (all `depth` of them): (the module to pre-hook, fn(args, kwargs) -> [B, H, T, T] float32
        probabilities recomputed from that module's input). A ValueError naming the model when its attention
        cannot be read."""
        raise ValueError(f"cannot read the attention of teacher {type(self).__name__}")

    def forward_layers_with_attention(self, images: torch.Tensor, layers, attention_layers
                                      ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(forward_layers(images, layers), the attention probabilities [B, H, T, T] (float32, over the model's
        own tokens, prefix tokens first) of each block in `attention_layers`), from ONE pass: forward pre-hooks
        on the blocks' attention modules recompute the probabilities from their inputs. The pass runs to the
        deepest block either list names."""
        readers = self.attention_readers()
        if len(readers) != self.depth:
            raise RuntimeError(f"{type(self).__name__}: {len(readers)} attention readers for {self.depth} blocks")
        att_ids, ids = self._layer_ids(list(attention_layers)), self._layer_ids(list(layers))
        run = sorted(set(ids) | ({max(att_ids)} if att_ids else set()))
        outs, attns = read_attention(readers, att_ids, lambda: self.forward_layers(images, run) if run else [],
                                     type(self).__name__)
        outs = dict(zip(run, outs))
        return [outs[i] for i in ids], attns

    def _input(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1 and self.channels > 1:
            images = images.expand(-1, self.channels, -1, -1)
        return images

    def _layer_ids(self, layers) -> list[int]:
        idx = [i + self.depth if i < 0 else i for i in layers]
        if any(not 0 <= i < self.depth for i in idx):
            raise ValueError(f"layers {list(layers)} out of range for {self.depth} blocks")
        return idx


def with_cls(x: torch.Tensor, num_prefix: int, has_cls: bool) -> torch.Tensor:
    """[class token ; patches] from [prefix tokens ; patches]: registers dropped, the mean patch stands in for a
    missing class token (SigLIP, avg-pooled models)."""
    patches = x[:, num_prefix:]
    cls = x[:, :1] if has_cls else patches.mean(1, keepdim=True)
    return torch.cat([cls, patches], dim=1)


def with_cls(x: torch.Tensor, num_prefix: int, has_cls: bool) -> torch.Tensor:
    """[class token ; patches] from [prefix tokens ; patches]: registers dropped, the mean patch stands in for a
    missing class token (SigLIP, avg-pooled models)."""
    patches = x[:, num_prefix:]
    cls = x[:, :1] if has_cls else patches.mean(1, keepdim=True)
    return torch.cat([cls, patches], dim=1)


def pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, (int, float)) else (int(v[0]), int(v[1]))
