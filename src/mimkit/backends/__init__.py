"""Outside models (and mimkit runs) behind one interface, for frozen teachers, tokenizers and evaluation alike.

`load_encoder(spec)` -> `LoadedEncoder(encoder, img_size, channels, mean, std)` (unpacks as a 5-tuple), where
`encoder(images)` gives tokens [B, 1 + N, D] (class token first; the mean patch token for models without one),
`encoder.forward_layers(images, layers)` the tokens after chosen blocks (before the final norm),
`encoder.forward_layers_with_attention(images, layers, attention_layers)` those tokens and the chosen blocks'
attention probabilities from the same pass, and `encoder.depth` / `encoder.embed_dim` / `encoder.grid_size` /
`encoder.has_cls` / `encoder.num_prefix` describe it. Specs (docs/teachers.md):

* a mimkit checkpoint file or run folder;
* `timm:<name>` (pretrained weights must already be in the local cache) or `timm:local-dir:<folder>`
  (config.json + model.safetensors, e.g. from `mimkit export --format timm`);
* `hf:<folder or hub name>`: a transformers ViT / ViTMAE, CLIP (full model or vision tower), SigLIP or DINOv2
  folder; a hub name is read from the local Hugging Face cache only;
* `open_clip:<model>@<weights file>`, `open_clip:<model>@<pretrained tag>` (file in the local HF cache),
  `open_clip:local-dir:<folder>` or `open_clip:hf-hub:<repo>` (cached): the image tower of an open_clip CLIP
  (optional dependency: `pip install open_clip_torch`).

A `#proj` suffix (timm, hf and open_clip CLIP models) passes every returned token through the model's final norm
and image projection (CLIP's `visual.proj`: 512-d for ViT-B/16), the space BEiT v2 / DTM distil from.
Weights are never downloaded and never unpickled beyond tensors (safetensors or `torch.load(weights_only=True)`).
Single-channel images are repeated to 3 channels when the encoder wants RGB.
"""

from __future__ import annotations

from pathlib import Path

from mimkit.backends.base import (CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, PROJ_SUFFIX, EncoderAdapter,
                                  LoadedEncoder)
from mimkit.backends.mimkit import MimkitEncoder, load_mimkit, wrap_mimkit
from mimkit.backends.open_clip import OpenClipEncoder, OpenClipTower, load_open_clip
from mimkit.backends.timm import TimmEncoder, load_timm
from mimkit.backends.transformers import HFEncoder, HFVisionTowerEncoder, load_hf
from mimkit.backends.runs import CheckpointError

EXTERNAL_PREFIXES = ("timm:", "hf:", "open_clip:")


def is_external_spec(spec) -> bool:
    """True for `timm:`, `hf:` and `open_clip:` specs (no mimkit run behind them)."""
    return str(spec).startswith(EXTERNAL_PREFIXES)


def _split_proj(spec: str) -> tuple[str, bool]:
    return (spec[:-len(PROJ_SUFFIX)], True) if spec.endswith(PROJ_SUFFIX) else (spec, False)


def load_encoder(spec: str) -> LoadedEncoder:
    """(encoder, img_size (H, W), channels, mean, std) for a checkpoint / run folder, `timm:...`, `hf:...` or
    `open_clip:...` (a `#proj` suffix: tokens in CLIP's projected space)."""
    spec = str(spec)
    if is_external_spec(spec):
        base, project = _split_proj(spec)
        if base.startswith("timm:"):
            return load_timm(base[len("timm:"):], project)
        if base.startswith("hf:"):
            return load_hf(base[len("hf:"):], project)
        return load_open_clip(base[len("open_clip:"):], project)
    if spec.endswith(PROJ_SUFFIX) and not Path(spec).exists():
        raise CheckpointError(f"{spec}: {PROJ_SUFFIX} applies to CLIP models (timm:, hf:, open_clip:), not to a "
                              "mimkit checkpoint")
    return load_mimkit(spec)


def norm_for(loaded: LoadedEncoder, data_channels: int) -> tuple[list[float], list[float]]:
    """Mean/std for images with `data_channels` channels fed to this encoder (grey images to an RGB model:
    the channel average, as the adapter repeats the grey channel)."""
    if data_channels == len(loaded.mean):
        return list(loaded.mean), list(loaded.std)
    if data_channels == 1:
        return [sum(loaded.mean) / len(loaded.mean)], [sum(loaded.std) / len(loaded.std)]
    raise CheckpointError(f"the images have {data_channels} channels but the encoder takes {loaded.channels}")


__all__ = ["CLIP_MEAN", "CLIP_STD", "EXTERNAL_PREFIXES", "IMAGENET_MEAN", "IMAGENET_STD", "PROJ_SUFFIX",
           "CheckpointError", "EncoderAdapter", "HFEncoder", "HFVisionTowerEncoder", "LoadedEncoder", "MimkitEncoder",
           "OpenClipEncoder", "OpenClipTower", "TimmEncoder", "is_external_spec", "load_encoder", "norm_for",
           "wrap_mimkit"]
