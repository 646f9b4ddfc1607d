"""transformers image models (`hf:<folder or cached hub name>`): ViT / ViTMAE, CLIP (full model or vision tower),
SigLIP, DINOv2 (with registers)."""

from __future__ import annotations

import json

import torch
import torch.nn as nn

from mimkit.backends.attention import hf_attention_reader
from mimkit.backends.base import (CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, PROJ_SUFFIX, EncoderAdapter,
                                  LoadedEncoder, pair, with_cls)
from mimkit.backends.hub import hf_folder
from mimkit.backends.runs import CheckpointError


class HFEncoder(EncoderAdapter):
    """transformers ViTModel / ViTMAEModel (mask ratio 0, patch order kept)."""

    @property
    def grid_size(self) -> tuple[int, int]:
        size, patch = pair(self.model.config.image_size), pair(self.model.config.patch_size)
        return size[0] // patch[0], size[1] // patch[1]

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

    def attention_readers(self):
        who = f"hf:{self.model.config.model_type}"
        return [hf_attention_reader(layer, who) for layer in _hf_layers(self.model, self.depth, who)]


def _hf_layers(model: nn.Module, depth: int, who: str) -> list[nn.Module]:
    """The encoder layers of a transformers vision model, whichever nesting its version uses."""
    for path in ("layers", "encoder.layers", "encoder.layer", "vision_model.encoder.layers",
                 "vision_model.encoder.layer"):
        found = model
        for name in path.split("."):
            found = getattr(found, name, None)
        if isinstance(found, nn.ModuleList) and len(found) == depth:
            return list(found)
    raise ValueError(f"cannot read the attention of teacher {who}: no list of {depth} encoder layers in "
                     f"{type(model).__name__}")


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    """`model.<name>` or `model.vision_model.<name>` (transformers 4 nests the tower one level deeper than 5)."""
    found = getattr(model, name, None)
    return found if found is not None else getattr(getattr(model, "vision_model", None), name, None)


class HFVisionTowerEncoder(HFEncoder):
    """transformers CLIP / SigLIP / DINOv2 image towers.

    hidden_states[0] is the embedding output (after CLIP's pre-layernorm), hidden_states[i + 1] block i's output;
    `forward` adds the final norm (CLIP/SigLIP `post_layernorm`, DINOv2 `layernorm`) to every token, as timm's
    `forward_features` does. Tokens are [class ; patches]: DINOv2's registers dropped, the mean patch for SigLIP
    (no class token). `project`: final norm then CLIP's `visual_projection` on every returned token."""

    def __init__(self, model, channels, depth, embed_dim, num_prefix: int, has_cls: bool, final_norm: str,
                 project: bool = False):
        super().__init__(model, channels, depth, embed_dim)
        self.num_prefix, self.has_cls, self.final_norm_name, self.project = num_prefix, has_cls, final_norm, project

    def _run(self, images):
        return self.model(pixel_values=self._input(images), output_hidden_states=True)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        x = _submodule(self.model, self.final_norm_name)(x)
        return self.model.visual_projection(x) if self.project else x

    def forward(self, images):
        return with_cls(self._head(self._run(images).hidden_states[-1]), self.num_prefix, self.has_cls)

    def forward_layers(self, images, layers):
        hidden = self._run(images).hidden_states
        outs = [hidden[i + 1] for i in self._layer_ids(layers)]
        return [with_cls(self._head(x) if self.project else x, self.num_prefix, self.has_cls) for x in outs]


# model_type -> (transformers class, final norm, pixel statistics when the folder has no preprocessor_config.json)
_HF_TOWERS = {
    "clip": ("CLIPVisionModel", "post_layernorm", (CLIP_MEAN, CLIP_STD)),
    "clip_vision_model": ("CLIPVisionModel", "post_layernorm", (CLIP_MEAN, CLIP_STD)),
    "siglip": ("SiglipVisionModel", "post_layernorm", ([0.5] * 3, [0.5] * 3)),
    "siglip_vision_model": ("SiglipVisionModel", "post_layernorm", ([0.5] * 3, [0.5] * 3)),
    "dinov2": ("Dinov2Model", "layernorm", (IMAGENET_MEAN, IMAGENET_STD)),
    "dinov2_with_registers": ("Dinov2WithRegistersModel", "layernorm", (IMAGENET_MEAN, IMAGENET_STD)),
}


def load_hf(name: str, project: bool = False) -> LoadedEncoder:
    import transformers
    from transformers import ViTMAEModel, ViTModel
    from transformers.utils import logging as hf_logging

    spec = f"hf:{name}{PROJ_SUFFIX if project else ''}"
    folder = hf_folder(name)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} has no config.json: not a transformers model folder")
    conf = json.loads((folder / "config.json").read_text())
    kind = conf.get("model_type")
    if kind not in ("vit", "vit_mae", *_HF_TOWERS):
        raise CheckpointError(f"{folder} holds a {kind!r} model; hf: supports 'vit', 'vit_mae', "
                              f"{', '.join(repr(k) for k in _HF_TOWERS)}")
    if project and not kind.startswith("clip"):
        raise CheckpointError(f"{spec}: {PROJ_SUFFIX} needs a CLIP model (an image projection); {folder} is {kind!r}")
    pre = folder / "preprocessor_config.json"
    prep = json.loads(pre.read_text()) if pre.is_file() else {}
    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # unused weights (a decoder, CLIP's text tower) are left out on purpose
    hf_logging.disable_progress_bar()
    try:
        if kind == "vit_mae":
            model = ViTMAEModel.from_pretrained(folder, mask_ratio=0.0)
        elif kind == "vit":
            model = ViTModel.from_pretrained(folder, add_pooling_layer=False)
        else:
            cls_name = "CLIPVisionModelWithProjection" if project else _HF_TOWERS[kind][0]
            model, info = getattr(transformers, cls_name).from_pretrained(folder, local_files_only=True,
                                                                         output_loading_info=True)
            if info.get("missing_keys"):  # e.g. #proj on a vision tower saved without its projection
                raise CheckpointError(f"{spec}: {folder} lacks weights for {sorted(info['missing_keys'])[:4]} "
                                      f"(as {cls_name})")
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - missing/corrupt weight files, reported with the spec
        raise CheckpointError(f"cannot load {spec} from {folder} ({type(err).__name__}: {err})") from err
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
    c = model.config
    channels = int(getattr(c, "num_channels", 3))
    default_mean, default_std = _HF_TOWERS[kind][2] if kind in _HF_TOWERS else (IMAGENET_MEAN, IMAGENET_STD)
    mean = list(prep.get("image_mean", default_mean))[:channels]
    std = list(prep.get("image_std", default_std))[:channels]
    if kind in ("vit", "vit_mae"):
        return LoadedEncoder(HFEncoder(model.eval(), channels, c.num_hidden_layers, c.hidden_size),
                             pair(c.image_size), channels, mean, std)
    if kind.startswith("dinov2"):
        # DINOv2 configs say 518 (the position table's size); it is used at its processor's crop (224), with the
        # position table interpolated by the model. The config records the size so the grid is known downstream.
        crop = prep.get("crop_size")
        if isinstance(crop, dict) and "height" in crop:
            c.image_size = int(crop["height"]) if crop["height"] == crop["width"] else (crop["height"], crop["width"])
        elif isinstance(crop, int):
            c.image_size = crop
    registers = int(getattr(c, "num_register_tokens", 0) or 0) if kind == "dinov2_with_registers" else 0
    has_cls = not kind.startswith("siglip")
    width = model.visual_projection.out_features if project else c.hidden_size
    enc = HFVisionTowerEncoder(model.eval(), channels, c.num_hidden_layers, width, int(has_cls) + registers, has_cls,
                               _HF_TOWERS[kind][1], project)
    return LoadedEncoder(enc, pair(c.image_size), channels, mean, std)
