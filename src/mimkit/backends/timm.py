"""timm ViTs (`timm:<name>` from the local cache, `timm:local-dir:<folder>`), optionally in CLIP's projected space."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from mimkit.backends.attention import timm_attention_reader
from mimkit.backends.base import IMAGENET_MEAN, IMAGENET_STD, PROJ_SUFFIX, EncoderAdapter, LoadedEncoder, pair, with_cls
from mimkit.backends.hub import hub_offline
from mimkit.backends.runs import CheckpointError


class TimmEncoder(EncoderAdapter):
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
        return with_cls(x, self.num_prefix, self.has_cls)

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


def load_timm(name: str, project: bool = False) -> LoadedEncoder:
    import timm

    kwargs = {} if project else {"num_classes": 0}  # `#proj` keeps the head (CLIP's image projection)
    try:
        if name.startswith("local-dir:"):
            folder = Path(name[len("local-dir:"):]).expanduser()
            if not (folder / "config.json").is_file():
                raise CheckpointError(f"{folder} has no config.json: not a timm model folder")
            model = timm.create_model(f"local-dir:{folder}", pretrained=True, **kwargs)
        else:
            with hub_offline():
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
    size = pair(model.patch_embed.img_size)
    mean, std = list(cfg.get("mean", IMAGENET_MEAN)), list(cfg.get("std", IMAGENET_STD))
    return LoadedEncoder(TimmEncoder(model.eval(), channels, len(model.blocks), width, project), size, channels,
                         mean[:channels], std[:channels])
