"""ResNet encoder on timm's ResNet, with timm's parameter names, behind the same interface as the ViT.

The timm model's modules (conv1, bn1, act1, maxpool, layer1..layer4) are this module's own children, so
`encoder.state_dict()` has exactly timm's keys: `timm.create_model(name, in_chans=C, num_classes=0)` loads it
strictly (with all 4 stages). What evaluation needs (src/mimkit/eval) is met the ViT way:

* `encoder(images)` -> tokens [B, 1 + N, D]: the global average pool first (the "class token" slot, so
  `pool="cls"` is GAP), then the N = h*w cells of the last feature map in raster order;
* `forward_layers(images, layers)` -> the same layout after each chosen stage (D differs per stage);
* `depth` = number of stages, `embed_dim` = channels of the last stage;
* `grid` = the PatchGrid of `patch_size`-pixel cells on which MIM methods draw their masks (for a CNN the
  "patch" is the mask cell, not a token: tokens are the last feature map's cells).

Small images: below 64 px (CIFAR, Fashion-MNIST) the stem keeps full resolution, as in the CIFAR ResNets
(openmixup's ResNet_CIFAR, the reference's CIFAR setting): conv1 runs at stride 1 and the 3x3 max-pool is
removed, so a 32-px image gives stage maps 32, 16, 8, 4 (total stride 8). Unlike ResNet_CIFAR's 3x3 conv1,
conv1 keeps timm's 7x7 kernel (padding 3) so every weight keeps timm's shape; to rebuild the same network in
timm, create the model and set `model.conv1.stride = (1, 1)`, `model.maxpool = nn.Identity()`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from mimkit.models.patch import PatchGrid

CNN_PRESETS: dict[str, str] = {"resnet18": "resnet18", "resnet50": "resnet50"}  # config name -> timm name
SMALL_INPUT = 64  # images with a side below this use the full-resolution stem

Hook = Callable[[int, torch.Tensor], torch.Tensor]


def _ceil_div(n: int, s: int) -> int:
    return -(-n // s)


class ResNetEncoder(nn.Module):
    def __init__(self, name: str = "resnet18", img_size: int | tuple[int, int] = 224, in_chans: int = 3,
                 patch_size: int | tuple[int, int] = 16, depth: int | None = None, drop_path_rate: float = 0.0,
                 small_stem: bool | None = None):
        super().__init__()
        import timm

        if name not in CNN_PRESETS:
            raise ValueError(f"encoder {name!r} is not a ResNet; choose one of {sorted(CNN_PRESETS)}")
        self.grid = PatchGrid.make(img_size, patch_size, in_chans)
        self.timm_name = CNN_PRESETS[name]
        model = timm.create_model(self.timm_name, pretrained=False, in_chans=in_chans, num_classes=0,
                                  drop_path_rate=drop_path_rate)
        self.small_stem = min(self.grid.img_size) < SMALL_INPUT if small_stem is None else bool(small_stem)
        if self.small_stem:
            model.conv1.stride = (1, 1)
            model.maxpool = nn.Identity()
        n_stages = 4 if depth is None else max(1, min(4, int(depth)))  # `model.depth` counts stages here
        self.conv1, self.bn1, self.act1, self.maxpool = model.conv1, model.bn1, model.act1, model.maxpool
        names = ["layer1", "layer2", "layer3", "layer4"][:n_stages]
        for n in names:
            setattr(self, n, getattr(model, n))
        self.stage_names = names
        self.stage_dims = [self._out_channels(getattr(model, n)) for n in names]
        self.embed_dim = self.stage_dims[-1]
        self.input_dims = [self.bn1.num_features] + self.stage_dims[:-1]  # channels entering each stage
        # strides: the stem's, then layer1 keeps the resolution and every later stage halves it
        self.stem_stride = 1 if self.small_stem else 4
        self.stage_strides = [1] + [2] * (n_stages - 1)

    @staticmethod
    def _out_channels(stage: nn.Module) -> int:
        return [m for m in stage.modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features

    @classmethod
    def from_config(cls, model, img_size, in_chans: int) -> "ResNetEncoder":
        """The encoder a config's `model` section describes (`patch_size` = mask cell, `depth` = stages)."""
        return cls(model.encoder, img_size, in_chans, model.patch_size, model.depth, model.drop_path)

    @property
    def depth(self) -> int:
        return len(self.stage_names)

    @property
    def stages(self) -> list[nn.Module]:
        return [getattr(self, n) for n in self.stage_names]

    def timm_kwargs(self) -> dict:
        """Arguments for `timm.create_model(self.timm_name, **kwargs)`; a small-input stem still has to be set
        by hand (see the module docstring)."""
        return dict(in_chans=self.grid.in_chans, num_classes=0)

    # geometry ------------------------------------------------------------------------------------------------
    def input_strides(self) -> list[int]:
        """Stride (pixels per cell) of the feature map that enters each stage."""
        out, s = [], self.stem_stride
        for st in self.stage_strides:
            out.append(s)
            s *= st
        return out

    def map_shapes(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """(shape of the map entering each stage, shape of each stage's output); convolutions with padding
        give ceil(n / stride) at every stride-2 step."""
        h, w = self.grid.img_size
        if self.small_stem:
            cur = (h, w)
        else:
            cur = (_ceil_div(_ceil_div(h, 2), 2), _ceil_div(_ceil_div(w, 2), 2))
        ins, outs = [], []
        for st in self.stage_strides:
            ins.append(cur)
            cur = (_ceil_div(cur[0], st), _ceil_div(cur[1], st))
            outs.append(cur)
        return ins, outs

    @property
    def out_stride(self) -> int:
        """Pixels per cell of the last feature map."""
        s = self.stem_stride
        for st in self.stage_strides:
            s *= st
        return s

    @property
    def feature_shape(self) -> tuple[int, int]:
        return self.map_shapes()[1][-1]

    # forward -------------------------------------------------------------------------------------------------
    def stem(self, images: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.act1(self.bn1(self.conv1(images))))

    def forward_maps(self, images: torch.Tensor, hook: Hook | None = None, upto: int | None = None) -> list[torch.Tensor]:
        """Feature maps [B, D_i, h_i, w_i] after each stage (up to stage `upto`, inclusive). `hook(i, x)` may
        change the map that enters stage i (MIM corruption of intermediate features)."""
        last = self.depth - 1 if upto is None else upto
        x = self.stem(images)
        maps = []
        for i, stage in enumerate(self.stages[: last + 1]):
            if hook is not None:
                x = hook(i, x)
            x = stage(x)
            maps.append(x)
        return maps

    @staticmethod
    def tokens(fmap: torch.Tensor) -> torch.Tensor:
        """[B, D, h, w] -> [B, 1 + h*w, D]: global average pool first, then the cells in raster order."""
        cells = fmap.flatten(2).transpose(1, 2)
        return torch.cat([cells.mean(dim=1, keepdim=True), cells], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.tokens(self.forward_maps(images)[-1])

    forward_features = forward

    def forward_layers(self, images: torch.Tensor, layers) -> list[torch.Tensor]:
        """Tokens [B, 1 + N_i, D_i] after each chosen stage (0-based; negative from the end), in the order given;
        runs only as far as the deepest one."""
        idx = [i + self.depth if i < 0 else i for i in layers]
        if any(not 0 <= i < self.depth for i in idx):
            raise ValueError(f"layers {list(layers)} out of range for {self.depth} stages")
        maps = self.forward_maps(images, upto=max(idx))
        return [self.tokens(maps[i]) for i in idx]


def is_cnn(name: str) -> bool:
    return name in CNN_PRESETS


def build_encoder(model, img_size, in_chans: int) -> nn.Module:
    """A ViT or a ResNet, by the config's `model.encoder`."""
    if is_cnn(model.encoder):
        return ResNetEncoder.from_config(model, img_size, in_chans)
    from mimkit.models.vit import VisionTransformer

    return VisionTransformer.from_config(model, img_size, in_chans)


__all__ = ["CNN_PRESETS", "ResNetEncoder", "build_encoder", "is_cnn"]
