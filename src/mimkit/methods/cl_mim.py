"""CL + MIM, the hybrid of "What Do Self-Supervised Vision Transformers Learn?" (Park et al., ICLR 2023, card E2):
SimMIM and MoCo v3 on ONE backbone, L = (1 - lam) * L_SimMIM + lam * L_MoCo v3.

The paper finds CL (global, low-frequency, late layers) and MIM (local, high-frequency, early layers) complement
each other and that "even the simplest harmonization", this linear combination, beats both at the ends of the
lam sweep (lam = 0 is SimMIM, lam = 1 MoCo v3). The value of lam it uses is unverified: sweep {0, .1, .25, .5, 1}.

Per step, on the loader's two augmented views (MoCo v3's BYOL-style pair, data.views.byol_views):
  MIM  view 0 with SimMIM's mask-token corruption -> encoder -> pixel head -> L1 on hidden pixels (exactly SimMIM's
       forward, inherited: with lam = 0 the loss is SimMIM's on batch["image"], which is view 0)
  CL   both views unmasked -> encoder -> class token -> projector (3-layer MLP, BN) -> predictor (2-layer MLP, BN)
       = q1, q2; the momentum encoder (EMA of encoder + projector, cosine 0.99 -> 1) gives k1, k2 on the same
       unmasked views; L_CL = InfoNCE(q1, k2) + InfoNCE(q2, k1), each 2 * tau * CE with tau = 0.2 (MoCo v3).
The CL pass is an extra, unmasked forward of both views (MoCo v3 never masks; feeding it the masked view would
make lam = 1 something other than MoCo v3): 3 student passes and 2 momentum passes per batch. Both branches always
run, whatever lam, so every parameter takes part in the backward (DDP without find_unused_parameters) and both
losses are logged for the whole sweep.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from mimkit.collapse import mean_pairwise_cosine
from mimkit.config import ModelConfig
from mimkit.data.views import CropScale, ViewSpec, byol_views, views_of
from mimkit.masking import SwappableMaskSettings
from mimkit.methods.simmim import SimMIM
from mimkit.models import VisionTransformer
from mimkit.methods.base import EMATeacherMixin
from mimkit.models.ema import EMASchedule, schedule_field
from mimkit.models.moco_head import MoCoMLP, batch_statistics, info_nce, positive_is_nearest

NUM_VIEWS = 2


class CLMIMConfig(SwappableMaskSettings):
    """SimMIM's mask settings (coarse 2x2-patch units, ratio 0.6) plus MoCo v3's."""

    name: Literal["cl_mim"] = "cl_mim"
    lam: float = Field(0.5, ge=0.0, le=1.0, description="weight of the CL loss: (1 - lam) * SimMIM + lam * MoCo v3 "
                                                        "(0: SimMIM, 1: MoCo v3; the paper's value is unverified)")
    temperature: float = Field(0.2, gt=0.0, description="InfoNCE temperature tau (MoCo v3 ViT: 0.2)")
    mlp_dim: int = Field(1024, ge=1, description="hidden width of projector and predictor (reference 4096; "
                                                 "1024 = 4096 * 192/768 for ViT-Tiny)")
    out_dim: int = Field(256, ge=1, description="projection / prediction width (reference 256)")
    proj_depth: int = Field(3, ge=1, description="Linear layers of the projector (MoCo v3 ViT: 3)")
    pred_depth: int = Field(2, ge=1, description="Linear layers of the predictor (MoCo v3: 2)")
    teacher: EMASchedule = schedule_field("cosine", 0.99, 1.0)
    crop_scale: CropScale = Field(
        (0.2, 1.0), description="RandomResizedCrop area range of both views (MoCo v3: 0.08-1; SimMIM alone: "
                                "0.67-1). At 28 px a 0.08 crop is 2x2 patches, too little to reconstruct from")


class CLMIM(EMATeacherMixin, SimMIM):
    """SimMIM (mask token, pixel head, make_mask, predict, reconstruct: inherited) plus a MoCo v3 branch."""

    config_class = CLMIMConfig

    def __init__(self, encoder: VisionTransformer, cfg: CLMIMConfig | None = None):
        cfg = cfg or CLMIMConfig()
        super().__init__(encoder, cfg.mask, cfg.mask_ratio, cfg.mask_unit, cfg.block_min_area)
        self.cfg = cfg
        self.projector = MoCoMLP(encoder.embed_dim, cfg.mlp_dim, cfg.out_dim, cfg.proj_depth)
        self.predictor = MoCoMLP(cfg.out_dim, cfg.mlp_dim, cfg.out_dim, cfg.pred_depth)
        self.init_teacher(cfg.teacher)  # MoCo v3's momentum encoder: backbone + projector

    @classmethod
    def from_config(cls, method: CLMIMConfig, model: ModelConfig, img_size, in_chans: int, data=None) -> "CLMIM":
        return cls(VisionTransformer.from_config(model, img_size, in_chans), method)

    @classmethod
    def view_specs(cls, cfg: CLMIMConfig) -> list[ViewSpec]:
        return [spec.model_copy(update={"crop_scale": tuple(cfg.crop_scale)}) for spec in byol_views()]

    def student(self) -> dict[str, nn.Module]:
        """The parts the momentum encoder follows (registered in the method, not again here)."""
        return {"encoder": self.encoder, "projector": self.projector}

    # ---- contrastive branch ----------------------------------------------------------------------------------
    def projections(self, views: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(projector outputs per view, class-token features [V * B, D]). One encoder pass for all views; the
        projector runs per view, so its BatchNorms see one view's batch, as MoCo v3 (one call per view)."""
        b = views[0].shape[0]
        features = self.encoder(torch.cat(views))[:, 0]
        return [self.projector(f) for f in features.split(b)], features

    @torch.no_grad()
    def keys(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Momentum-encoder projections k per view (unmasked views, class token). Its BatchNorms use each view's
        batch statistics, as MoCo v3's momentum encoder (in train mode) does."""
        t = self.teacher.module
        b = views[0].shape[0]
        features = t["encoder"](torch.cat(views))[:, 0]
        with batch_statistics(t["projector"]):
            return [t["projector"](f).float() for f in features.split(b)]

    def contrastive_loss(self, queries: list[torch.Tensor], keys: list[torch.Tensor]) -> torch.Tensor:
        """Symmetric MoCo v3 loss: ctr(q1, k2) + ctr(q2, k1) (a sum, as the reference)."""
        tau = self.cfg.temperature
        return info_nce(queries[0], keys[1], tau) + info_nce(queries[1], keys[0], tau)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        views = views_of(batch, NUM_VIEWS)  # validation / picture batches: the image itself twice
        mim_loss = super().forward({**batch, "image": views[0]})["loss"]
        projections, features = self.projections(views)
        queries = [self.predictor(z) for z in projections]
        keys = self.keys(views)
        cl_loss = self.contrastive_loss(queries, keys)
        lam = self.cfg.lam
        dev = mim_loss.device
        return {
            "loss": (1.0 - lam) * mim_loss + lam * cl_loss,
            "mim_loss": mim_loss.detach(),
            "cl_loss": cl_loss.detach(),
            "cl_acc": torch.stack([positive_is_nearest(queries[0], keys[1]),
                                   positive_is_nearest(queries[1], keys[0])]).mean(),
            # collapse of the CL branch: every image's projection alike -> 1. The projections end in a BatchNorm
            # without affine (centred per dimension), so feature_sim, on the class tokens before the projector,
            # is the one that shows an encoder mapping every image to one direction.
            "proj_sim": torch.stack([mean_pairwise_cosine(z) for z in projections]).mean().to(dev),
            "target_sim": torch.stack([mean_pairwise_cosine(k) for k in keys]).mean().to(dev),
            "feature_sim": mean_pairwise_cosine(features).to(dev),
            "momentum": torch.tensor(self.momentum(self.progress), device=dev),
        }
