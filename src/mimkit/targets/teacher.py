"""A frozen teacher as configuration: features of any ViT (a mimkit run, timm, Hugging Face) as prediction targets.

MaskAlign, BEiT v2's VQ-KD, DTM, Hybrid Distillation and the MIM-from-CLIP family read features of a frozen,
usually bigger, model. `method.teacher.source=<spec>` names it (any spec `mimkit.backends.load_encoder`
takes: a mimkit checkpoint or run folder, `timm:<name>` / `timm:local-dir:<folder>`, `hf:<folder or cached hub
name>`, `open_clip:...`; see docs/teachers.md), with
`layers` to read and a per-token `norm`. The teacher sees the same images as the student, converted:

1. from the data's normalisation to the teacher's (its own mean/std; grey images repeat to RGB in the adapter);
2. resized to the teacher's input size when it differs (bicubic);
3. its patch-token maps resampled to the student's patch grid (bilinear) when the grids differ, so target i
   belongs to student patch i whatever the two patch sizes.

The teacher is frozen (no gradients, eval mode, excluded from the optimizer and from the method's state_dict:
its weights come from `source`, so a checkpoint of a distillation run stays the student's size). Widths that
differ are the student's business (a learnable projection on the student side, as the papers do).

`forward_with_attention` also gives the teacher's attention maps from the same pass, for every spec kind (the
encoder adapter says where each block's attention is; docs/teachers.md, "Attention").
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from mimkit.models.frozen import HoldsFrozen


def renormalisation(data_mean, data_std, model_mean, model_std, grey_repeats: bool = False):
    """(scale, shift), each [1, C, 1, 1], with x_model = x * scale + shift = (x * d_std + d_mean - m_mean) / m_std:
    images normalised with the data's statistics, seen in a frozen model's own normalisation. With
    `grey_repeats`, grey images for an RGB model use the model's channel-averaged statistics (the adapter
    repeats the grey channel)."""
    m_mean, m_std = (torch.tensor(list(v), dtype=torch.float32) for v in (model_mean, model_std))
    d_mean, d_std = (torch.tensor(list(v), dtype=torch.float32) for v in (data_mean, data_std))
    if len(m_mean) != len(d_mean):
        if not (grey_repeats and len(d_mean) == 1):
            raise ValueError(f"the images have {len(d_mean)} channels but the model takes {len(m_mean)}")
        m_mean, m_std = m_mean.mean(0, keepdim=True), m_std.mean(0, keepdim=True)
    return (d_std / m_std).view(1, -1, 1, 1), ((d_mean - m_mean) / m_std).view(1, -1, 1, 1)


class TeacherConfig(BaseModel):
    """Settings of a frozen teacher (a field of a distillation method's config: `method.teacher.source=...`)."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(..., description="mimkit checkpoint/run folder, timm:<name>, timm:local-dir:<folder>, "
                                         "hf:<folder or cached hub name>, open_clip:<model>@<file|tag>; a #proj suffix "
                                         "gives CLIP's projected tokens (docs/teachers.md; weights must be local)")
    layers: list[int] = Field([-1], description="0-based blocks to read (negative: from the end)")
    norm: Literal["none", "layernorm", "standardize"] = Field(
        "layernorm", description="per-token LayerNorm without affine (I-JEPA, MaskAlign, data2vec), per-dimension "
                                 "standardisation over the batch's tokens, or none")
    drop_cls: bool = Field(False, description="return the patch tokens only")
    cache_dir: str | None = Field(None, description="cache the teacher's features here, keyed by sample seed and "
                                                    "checked against the image (targets.teacher_cache)")
    cache_max_gb: float = Field(2.0, gt=0, description="stop adding to the cache beyond this size")


class FrozenTeacher(HoldsFrozen):
    """features(images) -> one tensor [B, 1 + N, D_t] per layer, on the student's N patches (class token first)."""

    def __init__(self, loaded, student_grid: tuple[int, int], data_mean, data_std, layers=(-1,),
                 norm: str = "layernorm", drop_cls: bool = False):
        super().__init__()
        self.hold_frozen("_encoder", loaded.encoder)  # no parameters for the optimizer, nothing in the state_dict
        self.img_size = tuple(loaded.img_size)
        self.student_grid = tuple(int(v) for v in student_grid)
        self.layers, self.norm, self.drop_cls = list(layers), norm, drop_cls
        self.depth, self.embed_dim = int(loaded.encoder.depth), int(loaded.encoder.embed_dim)
        self._encoder._layer_ids(self.layers)  # out-of-range layers fail here, naming the layers
        scale, shift = renormalisation(data_mean, data_std, loaded.mean, loaded.std, grey_repeats=True)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("shift", shift, persistent=False)

    @classmethod
    def from_config(cls, cfg: TeacherConfig, student_grid, data_mean, data_std) -> "FrozenTeacher":
        from mimkit.backends import load_encoder

        teacher = cls(load_encoder(cfg.source), student_grid, data_mean, data_std, cfg.layers, cfg.norm, cfg.drop_cls)
        if cfg.cache_dir:
            teacher.use_cache(cfg)
        return teacher

    @classmethod
    def for_method(cls, cfg: TeacherConfig, student_grid, data, who: str, one_layer: bool = False
                   ) -> "FrozenTeacher":
        """`from_config` with the run's data statistics (`data_stats`: a clear error without them), as a method
        `who` builds its teacher. `one_layer`: the method reads a single teacher layer, so a list of several in
        `cfg.layers` is an error naming them."""
        mean, std = data_stats(data, who)
        if one_layer and len(cfg.layers) != 1:
            raise ValueError(f"{who} reads one teacher layer; method.teacher.layers={cfg.layers}")
        return cls.from_config(cfg, student_grid, mean, std)

    def use_cache(self, cfg: TeacherConfig, rank: int | None = None) -> None:
        """Cache features under cache_dir/<hash of everything that shapes them>, one writer per rank."""
        import hashlib
        import json

        import torch.distributed as dist

        from mimkit.targets.teacher_cache import TeacherCache

        what = {"source": str(Path(cfg.source).expanduser().resolve()) if Path(cfg.source).exists() else cfg.source,
                "layers": cfg.layers, "norm": cfg.norm, "drop_cls": cfg.drop_cls, "grid": self.student_grid,
                "scale": self.scale.flatten().tolist(), "shift": self.shift.flatten().tolist()}
        key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.cache = TeacherCache(Path(cfg.cache_dir) / key, int(cfg.cache_max_gb * (1 << 30)), rank)

    @property
    def encoder(self) -> nn.Module:
        return self._encoder

    def teacher_grid(self) -> tuple[int, int]:
        grid = getattr(self._encoder, "grid_size", None)  # the backends adapters know their grid
        if grid is not None:
            return int(grid[0]), int(grid[1])
        model = getattr(self._encoder, "model", self._encoder)
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        if grid is None and hasattr(model, "grid"):
            grid = model.grid.shape
        if grid is None:  # transformers ViT
            conf = model.config
            grid = (conf.image_size // conf.patch_size,) * 2 if isinstance(conf.image_size, int) else \
                tuple(s // conf.patch_size for s in conf.image_size)
        return int(grid[0]), int(grid[1])

    def _to_student_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        gh, gw = self.teacher_grid()
        sh, sw = self.student_grid
        cls, patches = tokens[:, :1], tokens[:, 1:]
        if patches.shape[1] != gh * gw:
            raise ValueError(f"teacher gave {patches.shape[1]} patch tokens for a {gh}x{gw} grid")
        if (gh, gw) != (sh, sw):
            b, _, d = patches.shape
            maps = patches.transpose(1, 2).reshape(b, d, gh, gw).float()
            maps = F.interpolate(maps, size=(sh, sw), mode="bilinear", align_corners=False)
            patches = maps.flatten(2).transpose(1, 2).to(tokens.dtype)
        return torch.cat([cls, patches], dim=1)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm == "layernorm":
            return F.layer_norm(x.float(), x.shape[-1:])
        if self.norm == "standardize":
            flat = x.float().reshape(-1, x.shape[-1])
            return (x.float() - flat.mean(0)) / (flat.var(0, unbiased=False) + 1e-6).sqrt()
        return x.float()

    cache = None

    @torch.no_grad()
    def features(self, images: torch.Tensor, seeds: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Features of `images`; with `seeds` (the batch's sample seeds) and a cache, read from disk when there."""
        if self.cache is not None and seeds is not None:
            return self.cache.get(images, seeds, self._compute)
        return self._compute(images)

    def _compute(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = images.float() * self.scale + self.shift
        if tuple(x.shape[-2:]) != self.img_size:
            x = F.interpolate(x, size=self.img_size, mode="bicubic", align_corners=False)
        outs = self._encoder.forward_layers(x, self.layers)
        outs = [self._normalise(self._to_student_grid(o)) for o in outs]
        return [o[:, 1:] for o in outs] if self.drop_cls else outs

    def forward(self, images: torch.Tensor, seeds: torch.Tensor | None = None) -> list[torch.Tensor]:
        return self.features(images, seeds)

    @property
    def has_class_token(self) -> bool:
        """Whether the teacher has a class token (SigLIP has none: the mean patch stands in for it in features)."""
        return bool(getattr(self._encoder, "has_cls", True))

    def check_attention(self) -> None:
        """Raise now, naming the teacher, when its attention cannot be read (`forward_with_attention`): every
        loader kind can (mimkit, timm ViTs with timm's plain Attention, hf: ViT/ViTMAE/CLIP/SigLIP/DINOv2,
        open_clip towers); timm variants with relative position bias or rope cannot."""
        self._encoder.attention_readers()

    @torch.no_grad()
    def forward_with_attention(self, images: torch.Tensor, attention_layers
                               ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """One teacher pass giving (features, attentions).

        features: as `features` gives them (the configured layers, normalised, on the student's grid, never
        from the cache: the pass runs anyway). attentions: per layer of `attention_layers` (0-based, negative
        from the end) the softmax probabilities [B, H, T_t, T_t] (float32) over the teacher's OWN tokens (its
        grid, prefix tokens first: class token, then registers), read by the encoder adapter's forward pre-hooks
        on the blocks' attention modules, which recompute softmax(q k^T * scale) from the module's input, so the
        pass itself keeps its fused kernel (backends `forward_layers_with_attention`)."""
        x = images.float() * self.scale + self.shift
        if tuple(x.shape[-2:]) != self.img_size:
            x = F.interpolate(x, size=self.img_size, mode="bicubic", align_corners=False)
        outs, attns = self._encoder.forward_layers_with_attention(x, self.layers, attention_layers)
        feats = [self._normalise(self._to_student_grid(o)) for o in outs]
        feats = [f[:, 1:] for f in feats] if self.drop_cls else feats
        return feats, attns

    def cls_attention_on_student_grid(self, attn: torch.Tensor) -> torch.Tensor:
        """[B, N_student]: how much attention each patch receives, summing to 1, resampled bilinearly to the
        student's grid when the grids differ. Class-token teachers: the class token's row (row 0, mean over
        heads) on the patches (the last N_teacher columns; registers between are left out). Teachers without a
        class token (SigLIP): the attention each patch receives averaged over all query rows and heads (no token
        summarises the image, so every patch's view of it counts the same)."""
        gh, gw = self.teacher_grid()
        sh, sw = self.student_grid
        if self.has_class_token:
            row = attn[:, :, 0, -gh * gw:].float().mean(1)  # [B, N_t]
        else:
            row = attn[:, :, :, -gh * gw:].float().mean(2).mean(1)
        if (gh, gw) != (sh, sw):
            maps = F.interpolate(row.view(-1, 1, gh, gw), size=(sh, sw), mode="bilinear", align_corners=False)
            row = maps.flatten(1).clamp_min(0)
        return row / row.sum(-1, keepdim=True).clamp_min(1e-12)


def teacher_fields(config_class) -> list[str]:
    """Names of a method config's frozen-teacher fields (TeacherConfig-typed, e.g. "teacher", or Hybrid
    Distillation's "mim_teacher" and "feature_teacher"): what `method.<field>.source=...` must set."""
    return [name for name, field in config_class.model_fields.items() if field.annotation is TeacherConfig]


def data_stats(data, who: str) -> tuple[list[float], list[float]]:
    """(mean, std) of the run's data section, which a method that shows the images to a frozen model (a teacher,
    a tokenizer) needs to convert them to that model's normalisation; a clear error without them."""
    if data is None or data.mean is None or data.std is None:
        raise ValueError(f"{who} shows the images to a frozen teacher or tokenizer and needs the data's mean/std "
                         "(data.mean, data.std): the trainer resolves them; pass the run's DataConfig as `data` "
                         "when building the method by hand")
    return list(data.mean), list(data.std)
