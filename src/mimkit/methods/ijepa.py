"""I-JEPA (Assran et al., CVPR 2023; facebookresearch/ijepa `src/train.py`): predict, from one large context
block, the target encoder's features of several target blocks of the same image. No pixels, no augmentation.

Slots: MultiBlockMasking (1 context block minus 4 whole target blocks, one size of each per batch, keyed by the
training step; the context trimmed to the batch's smallest count) ->
VisionTransformer on the context patches (`ids_keep`) -> JEPAPredictor (context + one query per target patch) ->
target: EMATeacher of the encoder on the FULL image, per-token LayerNorm without affine, gathered at each target
block -> SmoothL1 (the released code; the paper writes L2: `method.loss=mse`) averaged over every value.

The predictor's query construction is the slot the variants change: StoP (methods/stop.py) adds A-projected
Gaussian noise, N-JEPA (methods/njepa.py) diffusion noise on the position embeddings. Their noise is off in
eval mode. The teacher's momentum goes linearly 0.996 -> 1 over training (`method.teacher`).

The class token of mimkit's ViT (I-JEPA's has none) is left out of the predictor; evaluate with mean pooling of
the patch tokens (the recipes set eval.pool=mean), as I-JEPA's probes do.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, field_validator

from mimkit.collapse import mean_pairwise_cosine
from mimkit.config import MethodSection, ModelConfig
from mimkit.masking import Mask
from mimkit.masking.multiblock import MultiBlockMask, MultiBlockMasking
from mimkit.methods.base import EMATeacherMixin, Method
from mimkit.models import DECODER_PRESETS, VisionTransformer
from mimkit.models.ema import EMASchedule, schedule_field
from mimkit.models.predictor import JEPAPredictor, MaskTokenQueries, position_rms

Range = tuple[float, float]


class IJEPAConfig(MethodSection):
    name: Literal["ijepa"] = "ijepa"
    num_targets: int = Field(4, ge=1, description="target blocks per image (I-JEPA: 4)")
    target_scale: Range = Field((0.15, 0.2), description="(min, max) share of the grid of a target block")
    target_aspect: Range = Field((0.75, 1.5), description="(min, max) height/width ratio of a target block")
    context_scale: Range = Field((0.85, 1.0), description="(min, max) share of the grid of the context block "
                                 "(aspect 1) before the targets are cut out of it")
    min_keep: float = Field(10, ge=0.0, description="the context keeps more than this many patches (a count; "
                            "below 1 a fraction of N); I-JEPA: 10")
    loss: Literal["smooth_l1", "mse"] = Field("smooth_l1", description="smooth_l1 as the released code, mse as "
                                              "the paper's L2")
    teacher: EMASchedule = schedule_field("linear", 0.996, 1.0)

    @field_validator("target_scale", "context_scale")
    @classmethod
    def _scale_range(cls, v: Range) -> Range:
        if not 0.0 < v[0] <= v[1] <= 1.0:
            raise ValueError(f"must be (min, max) with 0 < min <= max <= 1, got {v}")
        return v

    @field_validator("target_aspect")
    @classmethod
    def _aspect_range(cls, v: Range) -> Range:
        if not 0.0 < v[0] <= v[1]:
            raise ValueError(f"must be (min, max) with 0 < min <= max, got {v}")
        return v


def predictor_size(model: ModelConfig) -> tuple[int, int, int]:
    """(width, depth, heads) of the predictor from the model section's decoder settings (the predictor holds
    the decoder slot: `model.decoder=...`, `model.decoder_depth=...` size it)."""
    spec = DECODER_PRESETS[model.decoder]
    return model.decoder_dim or spec.dim, model.decoder_depth or spec.depth, model.decoder_heads or spec.num_heads


class IJEPA(EMATeacherMixin, Method):
    config_class = IJEPAConfig

    def __init__(self, encoder: VisionTransformer, predictor: JEPAPredictor, masking: MultiBlockMasking,
                 loss: str = "smooth_l1", teacher: EMASchedule | None = None):
        super().__init__()
        self.encoder = encoder
        self.predictor = predictor
        self.grid = encoder.grid
        self.masking = masking
        if loss not in ("smooth_l1", "mse"):
            raise ValueError(f"unknown loss {loss!r}; choose smooth_l1 or mse")
        self.loss_kind = loss
        self.init_teacher(teacher or EMASchedule(kind="linear", start=0.996, end=1.0))
        self.size_key: int | None = None  # the optimizer step, set by begin_step: keys the batch's block sizes

    @classmethod
    def make_queries(cls, method: IJEPAConfig, dim: int, pos_scale: float) -> nn.Module:
        """The predictor's query piece; the variants override this."""
        return MaskTokenQueries(dim)

    @classmethod
    def from_config(cls, method: IJEPAConfig, model: ModelConfig, img_size, in_chans: int, data=None) -> "IJEPA":
        encoder = VisionTransformer.from_config(model, img_size, in_chans)
        dim, depth, heads = predictor_size(model)
        queries = cls.make_queries(method, dim, position_rms(dim, encoder.grid.shape))
        predictor = JEPAPredictor(encoder.grid.shape, encoder.embed_dim, dim, depth, heads, queries=queries)
        masking = MultiBlockMasking(method.num_targets, method.target_scale, method.target_aspect,
                                    method.context_scale, min_keep=method.min_keep)
        return cls(encoder, predictor, masking, method.loss, method.teacher)

    def begin_step(self, step: int, total_steps: int) -> None:
        super().begin_step(step, total_steps)
        self.size_key = step

    def blocks(self, batch: dict) -> MultiBlockMask:
        # in training the step keys the block sizes, so every rank and micro-batch of one step draws the same
        # sizes (the reference's shared counter); elsewhere they come from the batch's seeds
        key = self.size_key if self.training else None
        return self.masking(batch["seed"], self.grid.shape, size_key=key)

    def make_mask(self, batch: dict) -> Mask:
        """For pictures: `masked` = the union of the target blocks, `ids_keep` = the context."""
        return self.blocks(batch).as_mask()

    @torch.no_grad()
    def target_features(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's patch features of the full image, LayerNorm'd per token without affine: [B, N, D]."""
        h = self.teacher(images)[:, 1:]
        return F.layer_norm(h.float(), (h.shape[-1],)).to(h.dtype)

    def predict(self, images: torch.Tensor, blocks: MultiBlockMask, seeds: torch.Tensor | None) -> torch.Tensor:
        """Predictions [B, K, T, D] of every target block from the context."""
        context = self.encoder(images, ids_keep=blocks.context)[:, 1:]
        return self.predictor(context, blocks.context, blocks.targets, seeds)

    def distance(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pred, target = pred.float(), target.float()
        if self.loss_kind == "mse":
            return F.mse_loss(pred, target)
        return F.smooth_l1_loss(pred, target)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        images, seeds = batch["image"], batch["seed"]
        blocks = self.blocks(batch)
        full = self.target_features(images)
        b, k, t = blocks.targets.shape
        target = torch.gather(full, 1, blocks.targets.reshape(b, k * t, 1).expand(-1, -1, full.shape[-1]))
        target = target.view(b, k, t, -1)
        pred = self.predict(images, blocks, seeds)
        loss = self.distance(pred, target)
        return {
            "loss": loss,
            # collapse: every target token alike (-> 1), or every image alike (mean of its teacher tokens)
            "target_sim": mean_pairwise_cosine(target),
            "image_sim": mean_pairwise_cosine(full.mean(dim=1)),
            "pred_sim": mean_pairwise_cosine(pred),
            "context_size": torch.tensor(float(blocks.context.shape[1]), device=loss.device),
            "target_size": torch.tensor(float(t), device=loss.device),
        }
