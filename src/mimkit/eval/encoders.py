"""Any ViT behind one interface, so protocols compare encoders: mimkit checkpoints, timm models, HF ViT/ViTMAE.

`load_encoder(spec)` -> `LoadedEncoder(encoder, img_size, channels, mean, std)` (unpacks as a 5-tuple), where
`encoder(images)` gives tokens [B, 1 + N, D] (class token first), `encoder.forward_layers(images, layers)` the
tokens after chosen blocks, and `encoder.depth` / `encoder.embed_dim` describe it. Specs:

* a mimkit checkpoint file or run folder;
* `timm:<name>` (pretrained weights must already be in the local cache) or `timm:local-dir:<folder>`
  (config.json + model.safetensors, e.g. from `mimkit export --format timm`);
* `hf:<folder>` (a transformers ViT / ViTMAE folder).

Single-channel images are repeated to 3 channels when the encoder wants RGB.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn

from mimkit.engine.checkpoint import CheckpointError

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


class LoadedEncoder(NamedTuple):
    encoder: nn.Module
    img_size: tuple[int, int]
    channels: int
    mean: list[float]
    std: list[float]


class _Adapter(nn.Module):
    """Common wrapper: channel repeat, [B, 1 + N, D] outputs, `forward_layers`, `depth`, `embed_dim`."""

    def __init__(self, model: nn.Module, channels: int, depth: int, embed_dim: int):
        super().__init__()
        self.model, self.channels, self.depth, self.embed_dim = model, channels, depth, embed_dim

    def _input(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1 and self.channels > 1:
            images = images.expand(-1, self.channels, -1, -1)
        return images

    def _layer_ids(self, layers) -> list[int]:
        idx = [i + self.depth if i < 0 else i for i in layers]
        if any(not 0 <= i < self.depth for i in idx):
            raise ValueError(f"layers {list(layers)} out of range for {self.depth} blocks")
        return idx


class MimkitEncoder(_Adapter):
    def forward(self, images):
        return self.model(self._input(images))

    def forward_layers(self, images, layers):
        return self.model.forward_layers(self._input(images), self._layer_ids(layers))


class TimmEncoder(_Adapter):
    """timm ViT: class token (or the mean patch when the model has none) + patch tokens, prefix/register dropped."""

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        n = getattr(self.model, "num_prefix_tokens", 1)
        patches = x[:, n:]
        cls = x[:, :1] if getattr(self.model, "cls_token", None) is not None else patches.mean(1, keepdim=True)
        return torch.cat([cls, patches], dim=1)

    def forward(self, images):
        return self._tokens(self.model.forward_features(self._input(images)))

    def forward_layers(self, images, layers):
        idx = self._layer_ids(layers)
        out = self.model.forward_intermediates(self._input(images), indices=sorted(set(idx)), return_prefix_tokens=True,
                                               output_fmt="NLC", intermediates_only=True)
        by_layer = {}
        for i, (spatial, prefix) in zip(sorted(set(idx)), out):
            by_layer[i] = self._tokens(spatial if prefix is None else torch.cat([prefix, spatial], dim=1))
        return [by_layer[i] for i in idx]


class HFEncoder(_Adapter):
    """transformers ViTModel / ViTMAEModel (mask ratio 0, patch order kept)."""

    def _run(self, images):
        images = self._input(images)
        kwargs = {}
        if self.model.config.model_type == "vit_mae":
            n = self.model.embeddings.patch_embeddings.num_patches
            kwargs["noise"] = torch.arange(n, device=images.device, dtype=torch.float32).expand(images.shape[0], -1)
        return self.model(pixel_values=images, output_hidden_states=True, **kwargs)

    def forward(self, images):
        return self._run(images).last_hidden_state

    def forward_layers(self, images, layers):
        hidden = self._run(images).hidden_states  # embeddings, then each layer
        return [hidden[i + 1] for i in self._layer_ids(layers)]


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, (int, float)) else (int(v[0]), int(v[1]))


def _load_mimkit(path: str) -> LoadedEncoder:
    from mimkit.engine.checkpoint import find_checkpoint, method_from_checkpoint

    method, _, ckpt = method_from_checkpoint(find_checkpoint(path))
    return wrap_mimkit(method.encoder, ckpt["data"])


def wrap_mimkit(enc: nn.Module, data: dict) -> LoadedEncoder:
    """A mimkit ViT with its checkpoint's data section ({"img_size", "channels", "mean", "std"})."""
    return LoadedEncoder(MimkitEncoder(enc, int(data["channels"]), enc.depth, enc.embed_dim), _pair(data["img_size"]),
                         int(data["channels"]), list(data["mean"]), list(data["std"]))


@contextlib.contextmanager
def _hub_offline():
    """Only files already in the local Hugging Face cache: no network requests while creating a timm model."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _load_timm(name: str) -> LoadedEncoder:
    import timm

    try:
        if name.startswith("local-dir:"):
            folder = Path(name[len("local-dir:"):]).expanduser()
            if not (folder / "config.json").is_file():
                raise CheckpointError(f"{folder} has no config.json: not a timm model folder")
            model = timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=0)
        else:
            with _hub_offline():
                model = timm.create_model(name, pretrained=True, num_classes=0)
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - hub/network/unknown-model errors, all reported the same way
        raise CheckpointError(
            f"cannot load pretrained timm model {name!r} ({type(err).__name__}: {err}); weights are only used when "
            "already available locally: give timm:local-dir:FOLDER (config.json + model.safetensors)") from err
    cfg = model.pretrained_cfg or {}
    channels = int(cfg.get("input_size", (3,))[0]) if cfg.get("input_size") else 3
    channels = int(getattr(model.patch_embed.proj, "in_channels", channels))
    size = _pair(model.patch_embed.img_size)
    mean, std = list(cfg.get("mean", IMAGENET_MEAN)), list(cfg.get("std", IMAGENET_STD))
    return LoadedEncoder(TimmEncoder(model.eval(), channels, len(model.blocks), model.num_features), size, channels,
                         mean[:channels], std[:channels])


def _load_hf(folder: str) -> LoadedEncoder:
    import json

    from transformers import ViTMAEModel, ViTModel

    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} has no config.json: not a transformers model folder")
    conf = json.loads((folder / "config.json").read_text())
    kind = conf.get("model_type")
    if kind not in ("vit", "vit_mae"):
        raise CheckpointError(f"{folder} holds a {kind!r} model; hf: supports 'vit' and 'vit_mae'")
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a pretraining folder's decoder weights are unused here, as intended
    try:
        if kind == "vit_mae":
            model = ViTMAEModel.from_pretrained(folder, mask_ratio=0.0)
        else:
            model = ViTModel.from_pretrained(folder, add_pooling_layer=False)
    finally:
        hf_logging.set_verbosity(level)
    c = model.config
    pre = folder / "preprocessor_config.json"
    prep = json.loads(pre.read_text()) if pre.is_file() else {}
    channels = int(c.num_channels)
    mean = list(prep.get("image_mean", IMAGENET_MEAN))[:channels]
    std = list(prep.get("image_std", IMAGENET_STD))[:channels]
    return LoadedEncoder(HFEncoder(model.eval(), channels, c.num_hidden_layers, c.hidden_size), _pair(c.image_size),
                         channels, mean, std)


def load_encoder(spec: str) -> LoadedEncoder:
    """(encoder, img_size (H, W), channels, mean, std) for a checkpoint / run folder, `timm:...` or `hf:...`."""
    spec = str(spec)
    if spec.startswith("timm:"):
        return _load_timm(spec[len("timm:"):])
    if spec.startswith("hf:"):
        return _load_hf(spec[len("hf:"):])
    return _load_mimkit(spec)


def norm_for(loaded: LoadedEncoder, data_channels: int) -> tuple[list[float], list[float]]:
    """Mean/std for images with `data_channels` channels fed to this encoder (grey images to an RGB model:
    the channel average, as the adapter repeats the grey channel)."""
    if data_channels == len(loaded.mean):
        return list(loaded.mean), list(loaded.std)
    if data_channels == 1:
        return [sum(loaded.mean) / len(loaded.mean)], [sum(loaded.std) / len(loaded.std)]
    raise CheckpointError(f"the images have {data_channels} channels but the encoder takes {loaded.channels}")
