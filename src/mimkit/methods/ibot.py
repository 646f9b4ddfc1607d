"""iBOT, image BERT pre-training with an online tokenizer (Zhou et al., ICLR 2022; bytedance/ibot `main_ibot.py`).

An EMA teacher sees two augmented global views unmasked; the student sees the same views with some patches
replaced by a mask token. One DINO head, shared by the class token and the patch tokens, maps tokens to K
prototypes. The student's masked patches learn the teacher's patch distributions (the "online tokenizer": MIM
by self-distillation) and its class tokens learn the teacher's class distribution of the *other* view (DINO).
Teacher outputs are centred (EMA of the batch means, separate centres for class and patches) and sharpened
(temperature warmed from 0.04 to 0.07); the student uses temperature 0.1.

Multi-crop (`local_crops_number`, the reference's --local_crops_number): N more views, smaller (local_crop_size
pixels, area local_crops_scale) and never masked, go through the student only; their class tokens learn the
teacher's class distributions of both global views. The class-token loss averages the cross-entropy over every
(teacher global view q, student view v != q) pair, globals and locals, as iBOTLoss does. Local crops are embedded
with the position table resampled to their grid (VisionTransformer.embed, DINO's interpolate_pos_encoding).

Differences from the reference's multi-crop: local crops take byol_views()' photometrics with blur p=0.5 and no
solarisation, like DataAugmentationiBOT's local transform, but its blur sigma scaled to the training size as every
mimkit view; validation and picture batches carry no views, so there the local crops are the whole image resized
to local_crop_size (the global views are the image itself there too); the default local size is 12 px, 3/7 of
Fashion-MNIST's 28 as 96 is of 224, and any other training size must set it (a multiple of model.patch_size).
The reference's weight-decay schedule (cosine 0.04 -> 0.4) is an optimizer option for every method:
optim.weight_decay=0.04 optim.weight_decay_end=0.4 (the recipe keeps a constant 0.05, as its benchmarks ran); the
reference's decayed group also holds the class and mask tokens, which mimkit never decays.

Slots: data.views (two byol_views()-style global crops, then the local crops) -> per-image ratio (half the images unmasked, the rest
U(0.1, 0.5)) -> BlockMasking (iBOT's non-exact variant) or random -> VisionTransformer.embed_masked + mask
token -> DINOHead (models.dino_head) -> cross-entropy against the EMATeacher's centred, sharpened softmax.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator

from mimkit import rng
from mimkit.collapse import batch_entropy, mean_entropy
from mimkit.config import ConfigError, MethodSection, ModelConfig
from mimkit.data.views import CropScale, ViewSpec, byol_views, views_of
from mimkit.masking import BlockMasking, Mask
from mimkit.methods.base import EMATeacherMixin, Method
from mimkit.models import VisionTransformer
from mimkit.models.dino_head import DINOHead
from mimkit.models.ema import EMASchedule, schedule_field

RATIO_STREAM = 0x1B07  # per-image ratio draws; view v uses RATIO_STREAM + 2 * v (+1: the within-range draw)
SHAPE_STREAM = 0x1B17  # block / random mask draws; view v uses SHAPE_STREAM + v
NUM_VIEWS = 2


class DistillationSettings(MethodSection):
    """What iBOT and methods built on it (AttMask) share: head, temperatures, centres, ratios, weights."""

    out_dim: int = Field(1024, ge=2, description="prototypes K (reference 8192; card 0.6: 1024-4096 at small scale)")
    hidden_dim: int = Field(512, ge=1, description="head MLP width (reference 2048)")
    bottleneck_dim: int = Field(128, ge=1, description="head bottleneck before the prototypes (reference 256)")
    head_layers: int = Field(3, ge=1, description="head Linear layers before the L2 norm (reference 3)")
    norm_last_layer: bool = Field(True, description="fix the prototypes' norm to 1 (DINO/iBOT code default; the "
                                                    "ViT-S recipe learns it: false)")
    freeze_last_layer: float = Field(0.01, ge=0.0, le=1.0,
                                     description="share of training with the prototypes frozen (reference 1 epoch)")
    mim_weight: float = Field(1.0, ge=0.0, description="lambda2, masked-patch distillation (0: the DINO ablation)")
    cls_weight: float = Field(1.0, ge=0.0, description="lambda1, cross-view class-token distillation")
    student_temp: float = Field(0.1, gt=0.0)
    teacher_temp_start: float = Field(0.04, gt=0.0, description="teacher temperature at the start of the warm-up")
    teacher_temp: float = Field(0.07, gt=0.0, description="teacher temperature after the warm-up (ViT-S: 0.07)")
    teacher_temp_warmup: float = Field(0.3, ge=0.0, le=1.0,
                                       description="share of training of the linear temperature warm-up "
                                                   "(reference 30 epochs: 30/100 in AttMask's runs)")
    center_momentum: float = Field(0.9, ge=0.0, le=1.0, description="EMA momentum of both centres")
    pred_ratio: float = Field(0.3, gt=0.0, lt=1.0, description="mean mask ratio of a masked image")
    pred_ratio_var: float = Field(0.2, ge=0.0, description="a masked image's ratio ~ U(pred_ratio -+ pred_ratio_var)")
    masking_prob: float = Field(0.5, ge=0.0, le=1.0, description="share of images masked at all (iBOT: pred_ratio "
                                                                 "list [0, 0.3], one picked per image)")
    crop_scale: tuple[float, float] = Field((0.25, 1.0), description="global crops' area range (ViT-S: 0.25-1)")
    local_crops_number: int = Field(0, ge=0, description="small unmasked views whose class tokens learn the "
                                    "teacher's global class distributions (reference default 0, ViT-S recipe 10)")
    local_crops_scale: CropScale = Field((0.05, 0.25), description="local crops' area range (ViT-S recipe "
                                         "0.05-0.25; the reference's default 0.05-0.4)")
    local_crop_size: int = Field(12, ge=1, description="side of a local crop in pixels, a multiple of "
                                 "model.patch_size (reference: 96 for 224 px globals; 12 is 3/7 of 28 px)")
    teacher: EMASchedule = schedule_field("cosine", 0.996, 1.0)

    @model_validator(mode="after")
    def _check_ratio(self):
        if self.pred_ratio_var > self.pred_ratio or self.pred_ratio + self.pred_ratio_var >= 1.0:
            raise ValueError(f"pred_ratio_var: pred_ratio -+ pred_ratio_var must lie in [0, 1), got "
                             f"{self.pred_ratio} -+ {self.pred_ratio_var}")
        return self


class IBOTConfig(DistillationSettings):
    name: Literal["ibot"] = "ibot"
    mask: Literal["block", "random"] = Field("block", description="mask shape: BEiT blocks (iBOT's non-exact "
                                                                   "variant, min area (min(h, w) // 3)^2) or random")


def teacher_temperature(progress: float, start: float, end: float, warmup: float) -> float:
    """Linear start -> end over the first `warmup` share of training, then `end`."""
    if warmup <= 0:
        return end
    return start + (end - start) * min(max(progress, 0.0) / warmup, 1.0)


class IBOT(EMATeacherMixin, Method):
    config_class = IBOTConfig
    mask_reads_teacher = False  # iBOT's block/random masks ignore the teacher's scores

    def __init__(self, encoder: VisionTransformer, cfg: DistillationSettings):
        super().__init__()
        self.encoder = encoder
        self.grid = encoder.grid
        self.cfg = cfg
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))  # iBOT's masked_embed: zeros
        self.head = DINOHead(encoder.embed_dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.head_layers,
                             cfg.norm_last_layer)
        self.init_teacher(cfg.teacher)
        self.register_buffer("center_cls", torch.zeros(1, cfg.out_dim))
        self.register_buffer("center_patch", torch.zeros(1, cfg.out_dim))

    @classmethod
    def from_config(cls, method: DistillationSettings, model: ModelConfig, img_size, in_chans: int, data=None):
        encoder = VisionTransformer.from_config(model, img_size, in_chans)
        if method.local_crops_number > 0:
            patch = encoder.grid.patch_size
            if method.local_crop_size % patch[0] or method.local_crop_size % patch[1]:
                raise ConfigError(f"method.local_crop_size={method.local_crop_size} is not a multiple of "
                                  f"model.patch_size={model.patch_size}: local crops must be whole patches "
                                  f"(the reference crops 96 px for 224 px globals, 3/7 of their side)")
        return cls(encoder, method)

    @classmethod
    def view_specs(cls, cfg) -> list[ViewSpec]:
        """Two global crops (byol_views() at crop_scale), then `local_crops_number` local ones."""
        specs = [spec.model_copy(update={"crop_scale": tuple(cfg.crop_scale)}) for spec in byol_views()]
        side = cfg.local_crop_size
        local = ViewSpec(crop_scale=tuple(cfg.local_crops_scale), size=(side, side), jitter_p=0.8, grayscale_p=0.2,
                         blur_p=0.5)
        return specs + [local] * cfg.local_crops_number

    def student(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "head": self.head}

    # ---- schedules -------------------------------------------------------------------------------------------
    def teacher_temp(self, progress: float) -> float:
        c = self.cfg
        return teacher_temperature(progress, c.teacher_temp_start, c.teacher_temp, c.teacher_temp_warmup)

    def begin_step(self, step: int, total_steps: int) -> None:
        super().begin_step(step, total_steps)
        self.head.last_layer.frozen = self.progress < self.cfg.freeze_last_layer

    # ---- masks -----------------------------------------------------------------------------------------------
    def mask_ratios(self, seeds: torch.Tensor, view: int = 0) -> torch.Tensor:
        """Per-image ratio [B]: 0 with probability 1 - masking_prob, else U(pred_ratio -+ pred_ratio_var)."""
        c = self.cfg
        u = rng.uniform(seeds, 2, stream=RATIO_STREAM + 2 * view)
        ratio = c.pred_ratio - c.pred_ratio_var + 2 * c.pred_ratio_var * u[:, 1]
        return torch.where(u[:, 0] < c.masking_prob, ratio, torch.zeros_like(ratio))

    def view_mask(self, seeds: torch.Tensor, view: int, scores: torch.Tensor | None) -> torch.Tensor:
        """Bool[B, N] hidden patches of one view (iBOT ignores the teacher's attention `scores`)."""
        gh, gw = self.grid.shape
        n = gh * gw
        counts = (self.mask_ratios(seeds, view).double() * n).floor().long().tolist()
        if self.cfg.mask == "random":  # iBOT's 'rand': int(ratio * N) uniformly chosen patches
            noise = rng.uniform(seeds, n, stream=SHAPE_STREAM + view)
            ranks = noise.argsort(1).argsort(1)
            return (ranks < torch.tensor(counts).unsqueeze(1)).to(seeds.device)
        min_area = max(1, (min(gh, gw) // 3) ** 2)  # iBOT's block minimum, a patch count
        rows = []
        for seed, count in zip(seeds.tolist(), counts):
            if count == 0:
                rows.append(torch.zeros(n, dtype=torch.bool))
                continue
            # BEiT's loop targets round(ratio * N); count / N makes it iBOT's int(ratio * N), never exceeded
            blocks = BlockMasking(count / n, min_area=min_area, exact=False)
            rows.append(blocks.sample(rng.generator(seed, SHAPE_STREAM + view), (gh, gw)).view(-1))
        return torch.stack(rows).to(seeds.device)

    def masks(self, seeds: torch.Tensor, scores: torch.Tensor | None) -> torch.Tensor:
        """Bool[V * B, N] for the views stacked view-major (as the images are), scores [V * B, N] or None."""
        b = seeds.shape[0]
        return torch.cat([self.view_mask(seeds, v, None if scores is None else scores[v * b:(v + 1) * b])
                          for v in range(NUM_VIEWS)])

    @torch.no_grad()
    def teacher_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(teacher head logits [M, 1 + N, K] on the unmasked images, patch scores or None)."""
        t = self.teacher.module
        return t["head"](t["encoder"](images)).float(), None

    @torch.no_grad()
    def make_mask(self, batch: dict) -> Mask:
        """The student's mask on view 0 (batch["image"]), as drawn in training; the teacher runs only for a
        mask that reads its scores (AttMask)."""
        scores = self.teacher_forward(batch["image"])[1] if self.mask_reads_teacher else None
        return Mask(masked=self.view_mask(batch["seed"], 0, scores))

    def local_views(self, batch: dict) -> torch.Tensor | None:
        """The batch's local crops stacked view-major [L * B, C, s, s], or None without local crops; a batch
        without views (validation, pictures) gets its image resized to the local size for each."""
        n = self.cfg.local_crops_number
        if n == 0:
            return None
        views = batch.get("views")
        if views is None:
            side = self.cfg.local_crop_size
            image = batch["image"]
            small = F.interpolate(image, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
            return torch.cat([small] * n)
        if len(views) != NUM_VIEWS + n:
            raise ValueError(f"the batch has {len(views)} views, the method needs {NUM_VIEWS} global and {n} local")
        return torch.cat(list(views[NUM_VIEWS:]))

    # ---- loss ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def update_centers(self, teacher_cls: torch.Tensor, teacher_patch: torch.Tensor) -> None:
        """center <- m * center + (1 - m) * batch mean of the raw teacher logits (the patch centre averages
        the patches of each image first); under DDP the sums and counts are all-reduced, as DINO does."""
        stats = torch.cat([teacher_cls.sum(0), teacher_patch.mean(1).sum(0),
                           teacher_cls.new_tensor([teacher_cls.shape[0]])])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        k = teacher_cls.shape[1]
        means = stats[:-1].view(2, k) / stats[-1]
        m = self.cfg.center_momentum
        self.center_cls.copy_(self.center_cls * m + means[0:1] * (1 - m))
        self.center_patch.copy_(self.center_patch * m + means[1:2] * (1 - m))

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        c = self.cfg
        seeds = batch["seed"]
        images = torch.cat(views_of(batch, NUM_VIEWS))
        b = seeds.shape[0]
        t_out, scores = self.teacher_forward(images)
        masked = self.masks(seeds, scores)
        tokens = self.encoder.forward_tokens(self.encoder.embed_masked(images, masked, self.mask_token))
        temp = self.teacher_temp(self.progress)
        t_cls = F.softmax((t_out[:, 0] - self.center_cls) / temp, dim=-1)
        t_patch = F.softmax((t_out[:, 1:] - self.center_patch) / temp, dim=-1)
        # the head is per token: run it on the class tokens and the hidden patches only
        s_cls = F.log_softmax(self.head(tokens[:, 0]).float() / c.student_temp, dim=-1).view(NUM_VIEWS, b, -1)
        local = self.local_views(batch)
        if local is not None:  # local crops: the student only, unmasked, their class tokens
            s_local = self.head(self.encoder(local)[:, 0]).float() / c.student_temp
            s_cls = torch.cat([s_cls, F.log_softmax(s_local, dim=-1).view(-1, b, s_cls.shape[-1])])
        # class tokens: teacher (global) view q against student view v != q (global or local), averaged over pairs
        t_views = t_cls.view(NUM_VIEWS, b, -1)
        pairs = [(q, v) for q in range(NUM_VIEWS) for v in range(s_cls.shape[0]) if q != v]
        cls_loss = sum(-(t_views[q] * s_cls[v]).sum(-1).mean() for q, v in pairs) / len(pairs)
        # hidden patches: mean over each image's hidden patches (0 for unmasked images), then over all images
        s_patch = F.log_softmax(self.head(tokens[:, 1:][masked]).float() / c.student_temp, dim=-1)
        per_patch = -(t_patch[masked] * s_patch).sum(-1)
        hidden = masked.sum(1, keepdim=True).expand_as(masked)[masked].clamp_min(1)
        mim_loss = (per_patch / hidden).sum() / masked.shape[0]
        if self.training:
            self.update_centers(t_out[:, 0], t_out[:, 1:])
        with torch.no_grad():  # the part of the cross-entropy the student can remove: KL(teacher || student)
            t_ent = -(t_cls * t_cls.clamp_min(1e-12).log()).sum(-1).mean()
        return {
            "loss": c.cls_weight * cls_loss + c.mim_weight * mim_loss,
            "cls_loss": cls_loss.detach(),
            "mim_loss": mim_loss.detach(),
            "cls_kl": cls_loss.detach() - t_ent,
            "teacher_entropy": mean_entropy(t_patch),
            "teacher_batch_entropy": batch_entropy(t_patch),
            "teacher_temp": torch.tensor(temp, device=images.device),
            "mask_share": masked.float().mean(),
        }
