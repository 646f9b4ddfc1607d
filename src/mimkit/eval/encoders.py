"""Any ViT behind one interface, so protocols compare encoders and any of them can be a frozen teacher.

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

import contextlib
import json
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn

from mimkit.engine.checkpoint import CheckpointError
from mimkit.eval.attention import (AttentionReader, hf_attention_reader, open_clip_attention_reader,
                                   read_attention, timm_attention_reader)
from mimkit.models.patch import PatchGrid

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# OpenAI CLIP's pixel statistics (its preprocessor's defaults; also open_clip's OPENAI_DATASET_MEAN/STD)
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
EXTERNAL_PREFIXES = ("timm:", "hf:", "open_clip:")
PROJ_SUFFIX = "#proj"


def is_external_spec(spec) -> bool:
    """True for `timm:`, `hf:` and `open_clip:` specs (no mimkit run behind them)."""
    return str(spec).startswith(EXTERNAL_PREFIXES)


class LoadedEncoder(NamedTuple):
    encoder: nn.Module
    img_size: tuple[int, int]
    channels: int
    mean: list[float]
    std: list[float]


class _Adapter(nn.Module):
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


def _with_cls(x: torch.Tensor, num_prefix: int, has_cls: bool) -> torch.Tensor:
    """[class token ; patches] from [prefix tokens ; patches]: registers dropped, the mean patch stands in for a
    missing class token (SigLIP, avg-pooled models)."""
    patches = x[:, num_prefix:]
    cls = x[:, :1] if has_cls else patches.mean(1, keepdim=True)
    return torch.cat([cls, patches], dim=1)


class MimkitEncoder(_Adapter):
    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.model.grid.shape)

    def forward(self, images):
        return self.model(self._input(images))

    def forward_layers(self, images, layers):
        return self.model.forward_layers(self._input(images), self._layer_ids(layers))

    def attention_readers(self):
        return [timm_attention_reader(b.attn, f"mimkit {type(self.model).__name__}") for b in self.model.blocks]


class TimmEncoder(_Adapter):
    """timm ViT: class token (or the mean patch when the model has none) + patch tokens, prefix/register dropped.

    With `project` (a `#proj` spec) every returned token also goes through the final norm and the model's linear
    head: for timm's CLIP models (`*_clip_*`, head = CLIP's image projection) the CLIP embedding space."""

    def __init__(self, model, channels, depth, embed_dim, project: bool = False):
        super().__init__(model, channels, depth, embed_dim)
        self.project = project

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.model.patch_embed.grid_size)

    @property
    def has_cls(self) -> bool:
        return getattr(self.model, "cls_token", None) is not None

    @property
    def num_prefix(self) -> int:
        return int(getattr(self.model, "num_prefix_tokens", 1))

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        return _with_cls(x, self.num_prefix, self.has_cls)

    def attention_readers(self):
        who = f"timm {getattr(self.model, 'default_cfg', {}).get('architecture') or type(self.model).__name__}"
        blocks = getattr(self.model, "blocks", None)
        if blocks is None or not all(hasattr(b, "attn") for b in blocks):
            raise ValueError(f"cannot read the attention of teacher {who}: no `blocks[i].attn`")
        return [timm_attention_reader(b.attn, who) for b in blocks]

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.head(self.model.fc_norm(x))

    def forward(self, images):
        x = self.model.forward_features(self._input(images))  # final norm applied
        return self._tokens(self._head(x) if self.project else x)

    def forward_layers(self, images, layers):
        idx = self._layer_ids(layers)
        out = self.model.forward_intermediates(self._input(images), indices=sorted(set(idx)), return_prefix_tokens=True,
                                               output_fmt="NLC", intermediates_only=True)
        by_layer = {}
        for i, (spatial, prefix) in zip(sorted(set(idx)), out):
            x = spatial if prefix is None else torch.cat([prefix, spatial], dim=1)
            by_layer[i] = self._tokens(self._head(self.model.norm(x)) if self.project else x)
        return [by_layer[i] for i in idx]


class HFEncoder(_Adapter):
    """transformers ViTModel / ViTMAEModel (mask ratio 0, patch order kept)."""

    @property
    def grid_size(self) -> tuple[int, int]:
        size, patch = _pair(self.model.config.image_size), _pair(self.model.config.patch_size)
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
        return _with_cls(self._head(self._run(images).hidden_states[-1]), self.num_prefix, self.has_cls)

    def forward_layers(self, images, layers):
        hidden = self._run(images).hidden_states
        outs = [hidden[i + 1] for i in self._layer_ids(layers)]
        return [_with_cls(self._head(x) if self.project else x, self.num_prefix, self.has_cls) for x in outs]


class OpenClipTower(nn.Module):
    """The image tower of an open_clip CLIP (`model.visual`: conv1, class_embedding, positional_embedding, ln_pre,
    transformer.resblocks, ln_post, proj) run block by block, giving [B, 1 + N, D] after each residual block.

    open_clip >= 2.24 runs its blocks batch-first, older versions sequence-first: `transformer.batch_first`
    says which. `grid` (a PatchGrid) tells the frozen teacher its patch grid."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual
        self.grid = PatchGrid.make(_pair(visual.image_size), _pair(visual.patch_size), visual.conv1.in_channels)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        v = self.visual
        x = v.conv1(images).flatten(2).transpose(1, 2)  # [B, N, D], row-major patches
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        return v.ln_pre(x)

    def forward_layers(self, images: torch.Tensor, idx: list[int]) -> list[torch.Tensor]:
        x, wanted, found = self.embed(images), set(idx), {}
        seq_first = not getattr(self.visual.transformer, "batch_first", False)
        if seq_first:
            x = x.transpose(0, 1)
        for i, block in enumerate(self.visual.transformer.resblocks[:max(idx) + 1]):
            x = block(x)
            if i in wanted:
                found[i] = x.transpose(0, 1) if seq_first else x
        return [found[i] for i in idx]

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """ln_post then the image projection, on every token (the pooled path of 'tok' pooling for the class)."""
        return self.visual.ln_post(x) @ self.visual.proj


class OpenClipEncoder(_Adapter):
    """open_clip image tower: [class ; patches] after each block; `forward` applies ln_post to every token
    (and the projection with `project`)."""

    def __init__(self, tower: OpenClipTower, depth, embed_dim, project: bool = False):
        super().__init__(tower, 3, depth, embed_dim)
        self.project = project

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.model.grid.shape)

    def forward(self, images):
        x = self.model.forward_layers(self._input(images), [self.depth - 1])[0]
        return self.model.head(x) if self.project else self.model.visual.ln_post(x)

    def forward_layers(self, images, layers):
        outs = self.model.forward_layers(self._input(images), self._layer_ids(layers))
        return [self.model.head(x) for x in outs] if self.project else outs

    def attention_readers(self):
        return [open_clip_attention_reader(b.attn, "open_clip") for b in self.model.visual.transformer.resblocks]


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, (int, float)) else (int(v[0]), int(v[1]))


def _split_proj(spec: str) -> tuple[str, bool]:
    return (spec[:-len(PROJ_SUFFIX)], True) if spec.endswith(PROJ_SUFFIX) else (spec, False)


def _load_mimkit(path: str) -> LoadedEncoder:
    from mimkit.engine.checkpoint import encoder_from_checkpoint, find_checkpoint

    encoder, _, ckpt = encoder_from_checkpoint(find_checkpoint(path))
    return wrap_mimkit(encoder, ckpt["data"])


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


@contextlib.contextmanager
def _quiet_root_logger():
    import logging

    before = logging.root.level
    logging.root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logging.root.setLevel(before)


def _load_timm(name: str, project: bool = False) -> LoadedEncoder:
    import timm

    kwargs = {} if project else {"num_classes": 0}  # `#proj` keeps the head (CLIP's image projection)
    try:
        if name.startswith("local-dir:"):
            folder = Path(name[len("local-dir:"):]).expanduser()
            if not (folder / "config.json").is_file():
                raise CheckpointError(f"{folder} has no config.json: not a timm model folder")
            model = timm.create_model(f"local-dir:{folder}", pretrained=True, **kwargs)
        else:
            with _hub_offline():
                model = timm.create_model(name, pretrained=True, **kwargs)
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - hub/network/unknown-model errors, all reported the same way
        raise CheckpointError(
            f"cannot load pretrained timm model {name!r} ({type(err).__name__}: {err}); weights are only used when "
            "already available locally: give timm:local-dir:FOLDER (config.json + model.safetensors)") from err
    width = model.num_features
    if project:
        if not isinstance(model.head, nn.Linear):
            raise CheckpointError(f"timm:{name}{PROJ_SUFFIX}: the model has no linear head to project with "
                                  f"(head: {type(model.head).__name__}); drop {PROJ_SUFFIX}")
        width = model.head.out_features
    cfg = model.pretrained_cfg or {}
    channels = int(cfg.get("input_size", (3,))[0]) if cfg.get("input_size") else 3
    channels = int(getattr(model.patch_embed.proj, "in_channels", channels))
    size = _pair(model.patch_embed.img_size)
    mean, std = list(cfg.get("mean", IMAGENET_MEAN)), list(cfg.get("std", IMAGENET_STD))
    return LoadedEncoder(TimmEncoder(model.eval(), channels, len(model.blocks), width, project), size, channels,
                         mean[:channels], std[:channels])


def _hf_folder(name: str) -> Path:
    """A local folder, or a hub name's snapshot in the local Hugging Face cache (never downloaded)."""
    folder = Path(name).expanduser()
    if folder.exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1:
        return folder
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception as err:  # noqa: BLE001 - not cached / invalid repo id, reported the same way
        raise CheckpointError(
            f"hf:{name}: no folder {name!r} and no cached Hugging Face model {name!r} ({type(err).__name__}); "
            f"weights are read locally only: fetch it once (e.g. `hf download {name}`) or give "
            "hf:<folder> (config.json + weights)") from err


# model_type -> (transformers class, final norm, pixel statistics when the folder has no preprocessor_config.json)
_HF_TOWERS = {
    "clip": ("CLIPVisionModel", "post_layernorm", (CLIP_MEAN, CLIP_STD)),
    "clip_vision_model": ("CLIPVisionModel", "post_layernorm", (CLIP_MEAN, CLIP_STD)),
    "siglip": ("SiglipVisionModel", "post_layernorm", ([0.5] * 3, [0.5] * 3)),
    "siglip_vision_model": ("SiglipVisionModel", "post_layernorm", ([0.5] * 3, [0.5] * 3)),
    "dinov2": ("Dinov2Model", "layernorm", (IMAGENET_MEAN, IMAGENET_STD)),
    "dinov2_with_registers": ("Dinov2WithRegistersModel", "layernorm", (IMAGENET_MEAN, IMAGENET_STD)),
}


def _load_hf(name: str, project: bool = False) -> LoadedEncoder:
    import transformers
    from transformers import ViTMAEModel, ViTModel
    from transformers.utils import logging as hf_logging

    spec = f"hf:{name}{PROJ_SUFFIX if project else ''}"
    folder = _hf_folder(name)
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
                             _pair(c.image_size), channels, mean, std)
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
    return LoadedEncoder(enc, _pair(c.image_size), channels, mean, std)


def _torch_weights(path: Path, spec: str) -> dict[str, torch.Tensor]:
    """Tensors only: safetensors, or torch.load(weights_only=True) (a pickle that needs code is refused)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unreadable / code-carrying files, reported the same way
        raise CheckpointError(
            f"{spec}: cannot read weights from {path} ({type(err).__name__}: {err}); only tensors are loaded "
            "(safetensors or a plain state_dict; OpenAI's TorchScript .pt archives need converting)") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # open_clip training checkpoints
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{spec}: {path} holds a {type(state).__name__}, not a state_dict")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def _open_clip_weights(model_name: str, where: str, spec: str) -> tuple[Path, dict]:
    """(weights file, pretrained-tag config) for `<model>@<file or tag>`; a tag's file comes from the HF cache."""
    import open_clip

    path = Path(where).expanduser()
    if path.is_file():
        return path, {}
    tag_cfg = open_clip.get_pretrained_cfg(model_name, where) or {}
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise CheckpointError(f"{spec}: {where!r} is neither a weights file nor a pretrained tag of {model_name!r} "
                              f"(tags: {', '.join(tags) or 'none'})")
    hub = tag_cfg.get("hf_hub", "")
    if not hub:
        raise CheckpointError(f"{spec}: tag {where!r} is only downloadable from {tag_cfg.get('url')}; save that file "
                              f"and give open_clip:{model_name}@<file>")
    from huggingface_hub import hf_hub_download

    repo, filename = hub.rstrip("/"), None
    if not hub.endswith("/"):
        repo, filename = hub.rsplit("/", 1)
    names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    for name in names:
        try:
            return Path(hf_hub_download(repo, name, revision=tag_cfg.get("revision"), local_files_only=True)), tag_cfg
        except Exception:  # noqa: BLE001 - not cached: try the next name, then report
            continue
    raise CheckpointError(f"{spec}: the weights of tag {where!r} ({repo}: {' or '.join(names)}) are not in the local "
                          f"Hugging Face cache; fetch them once (e.g. `hf download {repo} {names[0]}`) or "
                          f"give open_clip:{model_name}@<file>")


def _load_open_clip(name: str, project: bool = False) -> LoadedEncoder:
    spec = f"open_clip:{name}{PROJ_SUFFIX if project else ''}"
    try:
        import open_clip
    except ImportError as err:
        raise CheckpointError(f"{spec} needs open_clip (pip install 'open_clip_torch>=3.0' or "
                              "pip install 'mimkit[clip]')") from err
    tag_cfg: dict = {}
    weights: Path | None = None
    if name.startswith(("local-dir:", "hf-hub:")):
        model_name = name  # open_clip reads open_clip_config.json; the weights are found below
        if name.startswith("local-dir:"):
            folder = Path(name[len("local-dir:"):]).expanduser()
        else:
            from huggingface_hub import snapshot_download

            repo = name[len("hf-hub:"):]
            try:
                folder = Path(snapshot_download(repo, local_files_only=True))
            except Exception as err:  # noqa: BLE001
                raise CheckpointError(
                    f"{spec}: {repo!r} is not in the local Hugging Face cache ({type(err).__name__}); fetch it once "
                    f"(`hf download {repo}`) or use open_clip:local-dir:<folder>") from err
            model_name = f"local-dir:{folder}"
        found = [folder / f for f in ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                                      "open_clip_pytorch_model.bin", "model.safetensors") if (folder / f).is_file()]
        if not (folder / "open_clip_config.json").is_file() or not found:
            raise CheckpointError(f"{spec}: {folder} needs open_clip_config.json and open_clip_model.safetensors "
                                  "(or open_clip_pytorch_model.bin)")
        weights = found[0]
    elif "@" in name:
        model_name, where = name.split("@", 1)
        weights, tag_cfg = _open_clip_weights(model_name, where, spec)
    else:
        raise CheckpointError(f"{spec}: give the weights: open_clip:{name}@<file or pretrained tag>, "
                              "open_clip:local-dir:<folder> or open_clip:hf-hub:<repo>")
    state = _torch_weights(weights, spec)  # read before building the model: a bad file fails fast
    try:
        # open_clip logs "no pretrained weights loaded" for a model whose weights are loaded just below
        with _hub_offline(), _quiet_root_logger():
            model = open_clip.create_model(model_name, pretrained=None, load_weights=False, pretrained_text=False,
                                           force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)))
    except Exception as err:  # noqa: BLE001 - unknown model names, bad configs
        raise CheckpointError(f"{spec}: open_clip cannot build {model_name!r} ({type(err).__name__}: {err}); "
                              f"known models: open_clip.list_models()") from err
    visual = model.visual
    if not all(hasattr(visual, a) for a in ("conv1", "class_embedding", "positional_embedding", "transformer")):
        raise CheckpointError(f"{spec}: the image tower is a {type(visual).__name__}; open_clip: reads open_clip's "
                              "own VisionTransformer (timm-trunk models: use timm:<name> instead)")
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    missing, unexpected = visual.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{spec}: {weights} does not fit {model_name!r}'s image tower (missing "
                              f"{sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]})")
    if project and (visual.proj is None or getattr(visual, "attn_pool", None) is not None):
        raise CheckpointError(f"{spec}: this image tower has no plain token projection; drop {PROJ_SUFFIX}")
    pre = open_clip.get_model_preprocess_cfg(model) or {}
    mean = list(tag_cfg.get("mean") or pre.get("mean") or CLIP_MEAN)
    std = list(tag_cfg.get("std") or pre.get("std") or CLIP_STD)
    tower = OpenClipTower(visual.eval())
    width = visual.proj.shape[1] if project else visual.transformer.width
    enc = OpenClipEncoder(tower, len(visual.transformer.resblocks), int(width), project)
    return LoadedEncoder(enc, tuple(tower.grid.img_size), 3, mean[:3], std[:3])


def load_encoder(spec: str) -> LoadedEncoder:
    """(encoder, img_size (H, W), channels, mean, std) for a checkpoint / run folder, `timm:...`, `hf:...` or
    `open_clip:...` (a `#proj` suffix: tokens in CLIP's projected space)."""
    spec = str(spec)
    if is_external_spec(spec):
        base, project = _split_proj(spec)
        if base.startswith("timm:"):
            return _load_timm(base[len("timm:"):], project)
        if base.startswith("hf:"):
            return _load_hf(base[len("hf:"):], project)
        return _load_open_clip(base[len("open_clip:"):], project)
    if spec.endswith(PROJ_SUFFIX) and not Path(spec).exists():
        raise CheckpointError(f"{spec}: {PROJ_SUFFIX} applies to CLIP models (timm:, hf:, open_clip:), not to a "
                              "mimkit checkpoint")
    return _load_mimkit(spec)


def norm_for(loaded: LoadedEncoder, data_channels: int) -> tuple[list[float], list[float]]:
    """Mean/std for images with `data_channels` channels fed to this encoder (grey images to an RGB model:
    the channel average, as the adapter repeats the grey channel)."""
    if data_channels == len(loaded.mean):
        return list(loaded.mean), list(loaded.std)
    if data_channels == 1:
        return [sum(loaded.mean) / len(loaded.mean)], [sum(loaded.std) / len(loaded.std)]
    raise CheckpointError(f"the images have {data_channels} channels but the encoder takes {loaded.channels}")
