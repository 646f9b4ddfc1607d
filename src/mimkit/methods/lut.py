"""LUT, Learning with Unmasked Tokens (Kim et al., ECCV 2024; naver-ai/lut `models_lut.py`, `engine_lut.py`).

MAE on one augmented view, plus an objective that gives the encoder's *visible* tokens a view of the whole image
("broader context"): a second augmentation of the image keeps V of the patches view 1 hides, and the mean-pooled
encoder outputs of both masked views, through a projector and a predictor, are pulled BYOL-style towards an EMA
teacher's projected embedding of the *other* view, seen whole (no mask).

    L = w_mae * MSE(view-1 masked patches) + w_bc * mean_{v != u} (2 - 2 cos(q_v, sg(k_u)))
    q_v = predictor(head(GAP(encoder(view v, its V visible patches))))
    k_u = head_t(GAP(encoder_t(view u, all patches)))           (EMA of encoder + head; no predictor)

Slots: data.views (two ViewSpecs: plain, and colour jitter + one of grayscale/solarise/blur) -> one seeded
permutation per image split into disjoint visible sets ids[:V] / ids[V:2V] -> VisionTransformer (visible tokens
only) -> MAEDecoder -> PixelTarget (norm-pix) -> masked MSE on view 1; MLPHead projector + predictor
(models.byol_head) -> cross-view cosine loss against an EMATeacher (cosine momentum schedule).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from mimkit import rng
from mimkit.collapse import mean_pairwise_cosine
from mimkit.config import MethodSection, ModelConfig
from mimkit.data.views import CropScale, ViewSpec, views_of
from mimkit.losses import masked_mse
from mimkit.masking import Mask, mask_from_noise
from mimkit.methods.base import EMATeacherMixin, Method, Reconstruction
from mimkit.models import MAEDecoder, VisionTransformer
from mimkit.models.byol_head import MLPHead
from mimkit.models.ema import EMASchedule, schedule_field
from mimkit.targets import PixelTarget

# MAE's mask stream (RandomMasking uses 1): view 1's mask is exactly the mask MAE draws for the same seeds, so
# LUT with w_bc = 0 is MAE.
_MASK_STREAM = 1
NUM_VIEWS = 2


class LUTConfig(MethodSection):
    name: Literal["lut"] = "lut"
    mask_ratio: float = Field(0.75, gt=0.0, lt=1.0,
                              description="view 1 keeps V = int(N * (1 - mask_ratio)) patches; view 2 keeps the next "
                                          "V of the same permutation, so 2V <= N is needed (mask_ratio >= ~0.5)")
    norm_pix: bool = Field(True, description="norm-pix targets for the MAE branch (the recommended LUT run)")
    w_mae: float = Field(1.0, ge=0.0, description="weight of the MAE reconstruction loss on view 1")
    w_bc: float = Field(0.25, ge=0.0, description="weight of the cross-view broader-context loss (0: MAE)")
    head_hidden: int = Field(1024, ge=1, description="hidden width of projector and predictor (reference 4096 for "
                                                     "ViT-S/B/L; 1024 = 4096 * 192/768 for ViT-Tiny)")
    head_depth: int = Field(2, ge=1, description="Linear layers of the projector (head)")
    pred_depth: int = Field(2, ge=1, description="Linear layers of the predictor")
    teacher: EMASchedule = schedule_field("cosine", 0.996, 1.0)
    crop_scale: CropScale = Field(
        (0.75, 1.0), description="RandomResizedCrop area range of both views. The reference's views are Resize + "
                                 "RandomCrop(pad 4, reflect): a shift, no zoom; at 28-32 px a 4-px shift keeps "
                                 ">= ~77% of the image, hence (0.75, 1)")
    view2_jitter_p: float = Field(0.8, ge=0.0, le=1.0,
                                  description="view 2: probability of ColorJitter(0.4, 0.4, 0.2, 0.1)")
    view2_distort_p: float = Field(1 / 3, ge=0.0, le=1.0,
                                   description="view 2: probability of each of grayscale, solarise and blur (the "
                                               "reference applies exactly one of the three; independent draws "
                                               "of 1/3 each keep each one's frequency)")


def disjoint_masks(noise: torch.Tensor, ratio: float) -> tuple[Mask, Mask]:
    """Two masks from one permutation per image (argsort of `noise` [B, N]): view 1 keeps ids[:V] (exactly
    mask_from_noise's mask), view 2 keeps ids[V:2V], patches view 1 hides. ids_restore of view 2 un-shuffles
    [its visible; the rest] like view 1's."""
    first = mask_from_noise(noise, ratio)
    b, n = noise.shape
    v = first.num_visible
    if 2 * v > n:
        raise ValueError(f"method.mask_ratio={ratio} keeps V={v} of N={n} patches; LUT's second view keeps V other "
                         f"patches, which needs 2V <= N: raise method.mask_ratio (>= 0.5 always works)")
    ids_shuffle = torch.argsort(first.ids_restore, dim=1)  # the inverse permutation: exact, no ties
    order = torch.cat([ids_shuffle[:, v:2 * v], ids_shuffle[:, :v], ids_shuffle[:, 2 * v:]], dim=1)
    masked = torch.ones(b, n, dtype=torch.bool, device=noise.device)
    masked.scatter_(1, order[:, :v], False)
    second = Mask(masked=masked, ids_keep=order[:, :v], ids_restore=torch.argsort(order, dim=1))
    return first, second


def cross_view_loss(students: list[torch.Tensor], teachers: list[torch.Tensor]) -> torch.Tensor:
    """mean over ordered pairs v != u of mean_b (2 - 2 cos(q_v[b], k_u[b])); the teacher side is detached.
    Same-view pairs never enter: the student must predict the *other* view's full-image embedding."""
    if len(students) != len(teachers) or len(students) < 2:
        raise ValueError(f"need the same number (>= 2) of student and teacher views, got "
                         f"{len(students)} and {len(teachers)}")
    total, terms = 0.0, 0
    for u, k in enumerate(teachers):
        k = F.normalize(k.detach().float(), dim=-1)
        for v, q in enumerate(students):
            if v == u:
                continue
            total = total + (2 - 2 * (F.normalize(q.float(), dim=-1) * k).sum(-1)).mean()
            terms += 1
    return total / terms


@torch.no_grad()
def spread(x: torch.Tensor) -> torch.Tensor:
    """SimSiam's collapse measure, scaled to ~1: per-dimension std over the batch of the L2-normalised rows,
    averaged over dimensions, times sqrt(D). About 1 for embeddings spread like an isotropic Gaussian, 0 when
    every row is the same vector. Unlike the mean pairwise cosine it ignores a direction all rows share (ReLU
    MLP outputs have a large one), so it separates 'alike' from 'collapsed'."""
    x = x.detach().float()
    if x.shape[0] < 2:
        return torch.zeros((), device=x.device)
    return F.normalize(x, dim=-1).std(dim=0).mean() * x.shape[-1] ** 0.5


def patch_mean(latent: torch.Tensor) -> torch.Tensor:
    """GAP of the patch tokens (class token excluded), as the reference pools both branches."""
    return latent[:, 1:, :].mean(dim=1)


class LUT(EMATeacherMixin, Method):
    config_class = LUTConfig

    def __init__(self, encoder: VisionTransformer, decoder: MAEDecoder, cfg: LUTConfig | None = None):
        super().__init__()
        cfg = cfg or LUTConfig()
        self.cfg = cfg
        self.encoder = encoder
        self.decoder = decoder
        self.grid = encoder.grid
        self.mask_ratio = cfg.mask_ratio
        # fail at build time, with the field's name, rather than at the first batch
        disjoint_masks(torch.zeros(1, self.grid.num_patches), cfg.mask_ratio)
        self.target = PixelTarget(self.grid, norm=cfg.norm_pix)
        d = encoder.embed_dim
        self.head = MLPHead(d, cfg.head_hidden, d, cfg.head_depth)
        self.predictor = MLPHead(d, cfg.head_hidden, d, cfg.pred_depth)
        # the teacher copies what produces k (the reference averages the whole model; decoder and predictor of
        # the copy are never used)
        self.init_teacher(cfg.teacher)

    @classmethod
    def from_config(cls, method: LUTConfig, model: ModelConfig, img_size, in_chans: int, data=None) -> "LUT":
        encoder = VisionTransformer.from_config(model, img_size, in_chans)
        return cls(encoder, MAEDecoder.from_config(model, encoder), method)

    @classmethod
    def view_specs(cls, cfg: LUTConfig) -> list[ViewSpec]:
        scale = tuple(cfg.crop_scale)
        p = cfg.view2_distort_p
        return [
            ViewSpec(crop_scale=scale),
            ViewSpec(crop_scale=scale, jitter_p=cfg.view2_jitter_p, brightness=0.4, contrast=0.4, saturation=0.2,
                     hue=0.1, grayscale_p=p, solarize_p=p, blur_p=p),
        ]

    def student(self) -> dict[str, nn.Module]:
        """The parts the EMA teacher follows (registered in the method, not again here)."""
        return {"encoder": self.encoder, "head": self.head}

    def end_step(self, step: int, total_steps: int) -> None:
        m = self.momentum(step / max(1, total_steps))
        head = self.teacher.module["head"]
        kept = {n: b.clone() for n, b in head.named_buffers() if b.is_floating_point()}
        super().end_step(step, total_steps)
        # EMATeacher copies buffers; the reference (timm ModelEma over the whole state_dict) averages the BN
        # running statistics like the weights, so the teacher's normalisation stays matched to its lagging weights
        with torch.no_grad():
            for n, b in head.named_buffers():
                if n in kept:
                    b.copy_(torch.lerp(kept[n], b, 1.0 - m))

    # ---- masks -----------------------------------------------------------------------------------------------
    def make_masks(self, batch: dict) -> tuple[Mask, Mask]:
        """(view-1 mask, view-2 mask) from each image's seed (or an explicit batch["mask_noise"])."""
        noise = batch.get("mask_noise")
        if noise is None:
            noise = rng.uniform(batch["seed"], self.grid.num_patches, stream=_MASK_STREAM)
        return disjoint_masks(noise.to(batch["image"].device), self.mask_ratio)

    def make_mask(self, batch: dict) -> Mask:
        """View 1's mask (MAE's): what the picture shows."""
        return self.make_masks(batch)[0]

    # ---- branches --------------------------------------------------------------------------------------------
    def encode_masked(self, views: list[torch.Tensor], masks: tuple[Mask, Mask]) -> list[torch.Tensor]:
        """Encoder outputs [B, 1 + V, D] of each view on its visible patches, in one pass (both keep V)."""
        b = views[0].shape[0]
        latent = self.encoder(torch.cat(views), ids_keep=torch.cat([m.ids_keep for m in masks]))
        return list(latent.split(b))

    def student_embeddings(self, latents: list[torch.Tensor]) -> list[torch.Tensor]:
        """q_v per view. The head runs per view, so BatchNorm's batch statistics are one view's (as the reference)."""
        return [self.predictor(self.head(patch_mean(z))) for z in latents]

    @torch.no_grad()
    def teacher_embeddings(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """k_u per view: the EMA encoder on the whole (unmasked) view, GAP, EMA head; no predictor. The teacher
        is in eval mode, so its BatchNorm uses the running statistics and the pass can take both views at once."""
        t = self.teacher.module
        b = views[0].shape[0]
        return list(t["head"](patch_mean(t["encoder"](torch.cat(views)))).float().split(b))

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        views = views_of(batch, NUM_VIEWS)  # validation batches: the image itself twice
        masks = self.make_masks(batch)
        latents = self.encode_masked(views, masks)
        pred = self.decoder(latents[0], masks[0].ids_restore)
        with torch.no_grad():
            target = self.target(views[0])
        mae_loss, _ = masked_mse(pred, target, masks[0].masked)
        students = self.student_embeddings(latents)
        teachers = self.teacher_embeddings(views)
        bc_loss = cross_view_loss(students, teachers)
        c = self.cfg
        dev = mae_loss.device
        return {
            "loss": c.w_mae * mae_loss + c.w_bc * bc_loss,
            "mae_loss": mae_loss.detach(),
            "bc_loss": bc_loss.detach(),
            # collapse: every image's teacher embedding alike -> 1 (mean over the views of the in-batch mean)
            "target_sim": torch.stack([mean_pairwise_cosine(k) for k in teachers]).mean().to(dev),
            "target_spread": torch.stack([spread(k) for k in teachers]).mean().to(dev),
            "student_sim": torch.stack([mean_pairwise_cosine(q) for q in students]).mean().to(dev),
            "momentum": torch.tensor(self.momentum(self.progress), device=dev),
        }

    @torch.no_grad()
    def reconstruct(self, batch: dict) -> Reconstruction:
        """MAE's picture for view 1 (batch["image"] is view 0 of the loader's views)."""
        images = batch["image"]
        mask = self.make_mask(batch)
        latent = self.encoder(images, ids_keep=mask.ids_keep)
        pred = self.target.to_pixels(self.decoder(latent, mask.ids_restore).float(), images.float())
        return Reconstruction.from_mask(images, pred, self.grid.expand_mask(mask.masked))
