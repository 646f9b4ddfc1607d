"""DTM, Dynamic Token Morphing ("Morphing Tokens Draw Strong Masked Image Models", Kim et al., ICLR'25; card C16).

A BEiT v2-style student regresses a frozen teacher's last-layer tokens after both are *morphed*: contextually
similar target tokens are grouped by ToMe bipartite matching on the target features, and every token of the
prediction and of the target is replaced by its group's mean (targets.token_morphing), so the regression targets
become region-level averages instead of spatially inconsistent per-token features.

Slots: BlockMasking (BEiT v2, ~40% of patches) -> VisionTransformer.embed_masked (mask token, all tokens encoded)
-> the encoder's final LayerNorm + a Linear head to the teacher's width (the repo's `norm` -> `lm_head`) ->
FrozenTeacher (`method.teacher.source`, last layer) -> token morphing, L draws per step -> SmoothL1(beta=2) per
token over ALL tokens (hidden and visible; the class token too unless `method.teacher.drop_cls`), averaged over
the draws. Schedule per step (one per batch, as the repo; drawn from the batch's sample seeds): n ~ U{0..n1}
merges, k ~ U{1..k_max} matching iterations, r = ceil(n/k) (floor when k*ceil(n/k) > n1) merges per iteration.
With no merges (n1 = 0 or morph: false) the loss is plain per-token distillation.

Deviations: the repo's teacher is CLIP ViT-B/16 (@ proj, 512-d) on patch tokens only and its ToMe call then
protects the first *patch* token; here the teacher is any FrozenTeacher, the sequence carries the class token and
that is what is protected (`teacher.drop_cls=true` gives the repo's patch-only sequence, nothing protected).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field, field_validator

from mimkit.collapse import mean_pairwise_cosine
from mimkit.config import MethodSection, ModelConfig
from mimkit.masking import Mask
from mimkit.masking.block import BlockMasking
from mimkit.methods.base import Method
from mimkit.models import VisionTransformer
from mimkit.targets.teacher import FrozenTeacher, TeacherConfig
from mimkit.targets.token_morphing import batch_generator, draw_schedule, morph, token_groups


class DTMConfig(MethodSection):
    name: Literal["dtm"] = "dtm"
    teacher: TeacherConfig
    mask_ratio: float = Field(0.4, gt=0.0, lt=1.0, description="block-masked share of patches (BEiT v2: 75/196)")
    morph: bool = Field(True, description="false: plain per-token distillation (the DTM ablation)")
    n1: int | float = Field(1.0, description="most merges per draw: a float in [0, 1] is a share of the N patch "
                                             "tokens (1.0 = all, the repo's 196 of 196), an int a count")
    k_max: int = Field(14, ge=1, description="matching iterations k ~ U{1..k_max}")
    draws: int = Field(2, ge=1, description="L morphing draws per step, losses averaged")
    beta: float = Field(2.0, gt=0.0, description="SmoothL1 change point")
    standardize_target: bool = Field(False, description="per-token standardisation of the morphed targets")

    @field_validator("n1")
    @classmethod
    def _n1_range(cls, v):
        if isinstance(v, float) and not 0.0 <= v <= 1.0:
            raise ValueError(f"a float n1 is a share of the patches and must be in [0, 1], got {v}")
        if isinstance(v, int) and v < 0:
            raise ValueError(f"a count n1 must be >= 0, got {v}")
        return v


def smooth_l1_per_token(pred: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """SmoothL1 averaged over the feature dimension: [B, T] (the repo's per-patch loss)."""
    diff = (pred - target).abs()
    return torch.where(diff < beta, 0.5 * diff ** 2 / beta, diff - 0.5 * beta).mean(dim=-1)


def standardize_tokens(x: torch.Tensor) -> torch.Tensor:
    """Each token to zero mean and unit variance over its features (the repo's `normalize_target`)."""
    return (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True) + 1e-6).sqrt()


class DTM(Method):
    config_class = DTMConfig

    def __init__(self, encoder: VisionTransformer, teacher: FrozenTeacher, mask_ratio: float = 0.4,
                 morph_tokens: bool = True, n1: int | None = None, k_max: int = 14, draws: int = 2,
                 beta: float = 2.0, standardize_target: bool = False):
        super().__init__()
        self.encoder = encoder
        self.grid = encoder.grid
        self.teacher = teacher  # frozen, outside the state_dict (see targets.teacher)
        self.cls_in_targets = not teacher.drop_cls
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.head = nn.Linear(encoder.embed_dim, teacher.embed_dim)  # after the encoder's final LayerNorm
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.masking = BlockMasking(mask_ratio)
        n = self.grid.num_patches
        self.n1 = n if n1 is None else int(n1)
        if not 0 <= self.n1 <= n:
            raise ValueError(f"method.n1={n1} merges is more than the {n} patch tokens")
        self.morph_tokens, self.k_max, self.draws = morph_tokens, k_max, draws
        self.beta, self.standardize_target = beta, standardize_target

    @classmethod
    def from_config(cls, method: DTMConfig, model: ModelConfig, img_size, in_chans: int, data=None) -> "DTM":
        encoder = VisionTransformer.from_config(model, img_size, in_chans)
        teacher = FrozenTeacher.for_method(method.teacher, encoder.grid.shape, data, "DTM", one_layer=True)
        n = encoder.grid.num_patches
        n1 = round(method.n1 * n) if isinstance(method.n1, float) else method.n1
        return cls(encoder, teacher, method.mask_ratio, method.morph, n1, method.k_max, method.draws, method.beta,
                   method.standardize_target)

    def make_mask(self, batch: dict) -> Mask:
        return self.masking(batch["seed"], self.grid.shape)

    def predict(self, images: torch.Tensor, mask: Mask) -> torch.Tensor:
        """Teacher-width predictions for every token, [B, 1 + N, D_t] (patch tokens only with drop_cls)."""
        tokens = self.encoder.forward_tokens(self.encoder.embed_masked(images, mask.masked, self.mask_token))
        return self.head(tokens if self.cls_in_targets else tokens[:, 1:]).float()

    @torch.no_grad()
    def targets(self, images: torch.Tensor, seeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.teacher(images, seeds)[0].float()

    def schedule(self, seeds: torch.Tensor) -> list[tuple[int, int]]:
        """(iterations, merges per iteration) for each draw of this batch; [(0, 0)] when not morphing."""
        if not self.morph_tokens:
            return [(0, 0)]
        return draw_schedule(self.n1, self.k_max, self.draws, batch_generator(seeds))

    def morphed_loss(self, pred: torch.Tensor, target: torch.Tensor, schedule) -> tuple[torch.Tensor, float]:
        """Mean over draws of the per-token SmoothL1 between morphed prediction and morphed target, and the
        mean number of groups (tokens after morphing) over the draws."""
        total, groups = 0.0, 0.0
        for k, r in schedule:
            sigma = token_groups(target, k, r, class_token=self.cls_in_targets)
            x, y = morph(pred, sigma), morph(target, sigma)
            if self.standardize_target:
                y = standardize_tokens(y)
            total = total + smooth_l1_per_token(x, y, self.beta).mean()
            groups += sigma.shape[1]
        return total / len(schedule), groups / len(schedule)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        images, seeds = batch["image"], batch["seed"]
        mask = self.make_mask(batch)
        pred = self.predict(images, mask)
        target = self.targets(images, seeds)
        loss, groups = self.morphed_loss(pred, target, self.schedule(seeds))
        tokens = target.shape[1]
        return {
            "loss": loss,
            "groups": torch.tensor(groups),                # tokens left after morphing, mean over draws
            "merges": torch.tensor(tokens - groups),
            "pred_sim": mean_pairwise_cosine(pred),        # collapse of the student's predictions
            "target_sim": mean_pairwise_cosine(target),
        }
