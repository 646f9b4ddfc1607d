"""Hybrid Distillation ("Hybrid Distillation: Connecting Masked Autoencoders with Contrastive Learners", ICLR'24;
card S5): one student distilled from two frozen teachers at once.

- The MIM teacher (`method.mim_teacher`, a MAE checkpoint) supplies token RELATIONS: its attention maps
  softmax(q k^T) at chosen layers, which the student's attention maps at the same relative depths imitate
  (KL(teacher || student) per query row, or MSE), so the student keeps the MIM teacher's diverse attention.
- The feature teacher (`method.feature_teacher`, an iBOT/DINO/CLIP-like checkpoint) supplies final features: a
  Linear projection of the student's last-layer tokens regresses the teacher's last-layer tokens at the same
  positions (SmoothL1 or MSE), for discrimination.
- Progressive redundant-token removal: the student sees the class token and only the patches the MIM teacher's
  last-block class token attends to most; the `drop_ratio` of patches with the LOWEST class-token attention are
  removed, growing linearly from 0 at the start of training to `max_drop` at the end (`self.progress`). The
  relation loss is restricted to the kept tokens (teacher rows renormalised over them), the feature loss taken
  at the kept positions.

loss = alpha * relation + beta * feature, alpha = beta = 1 [OpenReview review].

[unverified] There is no official code: everything beyond the abstract and the review is this toolkit's reading
of the card, in particular which layers are paired (here: the same depth fractions of student and teacher,
`relation_layers`), KL as the default relation loss, the linear drop schedule and its 0.5 end value, dropping by
the MIM teacher's last-block class-token attention, heads averaged when the head counts differ, and the class
token being kept and included in both losses (the feature teacher's `drop_cls` leaves it out of the feature loss).
The MIM teacher must run on the student's patch grid (its attention is over its own tokens) and have a class
token (any spec kind: mimkit, timm:, hf:, open_clip:; not SigLIP).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from mimkit.collapse import mean_entropy, mean_pairwise_cosine
from mimkit.config import DepthFraction, MethodSection, ModelConfig
from mimkit.backends.attention import timm_attention_logits
from mimkit.masking import Mask
from mimkit.methods.base import Method
from mimkit.models import VisionTransformer
from mimkit.models.vit import block_at
from mimkit.targets.teacher import FrozenTeacher, TeacherConfig


class HybridDistillConfig(MethodSection):
    name: Literal["hybrid_distill"] = "hybrid_distill"
    mim_teacher: TeacherConfig
    feature_teacher: TeacherConfig
    relation_layers: list[DepthFraction] = Field(
        [0.5, 1.0], min_length=1, description="depth fractions: student block block_at(f, its depth) imitates "
                                              "the MIM teacher's block block_at(f, teacher depth)")
    relation_loss: Literal["kl", "mse"] = "kl"
    feature_loss: Literal["smooth_l1", "mse"] = "smooth_l1"
    max_drop: float = Field(0.5, ge=0.0, lt=1.0, description="share of patches removed at the end of training")
    alpha: float = Field(1.0, ge=0.0, description="relation loss weight")
    beta: float = Field(1.0, ge=0.0, description="feature loss weight")


def kept_relations(attn: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """The teacher's attention [B, H, T, T] among the tokens `token_ids` Long[B, K] only, each row renormalised
    over them: [B, H, K, K]."""
    b, h, t, _ = attn.shape
    k = token_ids.shape[1]
    rows = attn.gather(2, token_ids[:, None, :, None].expand(b, h, k, t))
    sub = rows.gather(3, token_ids[:, None, None, :].expand(b, h, k, k))
    return sub / sub.sum(-1, keepdim=True).clamp_min(1e-12)


def relation_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, kind: str = "kl") -> torch.Tensor:
    """KL(teacher || student) summed over keys, or the squared difference of the probabilities averaged over
    keys, then averaged over query rows, heads and images. Head counts that differ: both averaged over heads."""
    if student_logits.shape[1] != teacher_probs.shape[1]:
        log_s = student_logits.softmax(-1).mean(1, keepdim=True).clamp_min(1e-12).log()
        teacher_probs = teacher_probs.mean(1, keepdim=True)
    else:
        log_s = student_logits.log_softmax(-1)
    if kind == "kl":
        return F.kl_div(log_s, teacher_probs, reduction="none").sum(-1).mean()
    return (log_s.exp() - teacher_probs).pow(2).mean()


class HybridDistill(Method):
    config_class = HybridDistillConfig

    def __init__(self, encoder: VisionTransformer, mim_teacher: FrozenTeacher, feature_teacher: FrozenTeacher,
                 relation_layers=(0.5, 1.0), relation: str = "kl", feature: str = "smooth_l1",
                 max_drop: float = 0.5, alpha: float = 1.0, beta: float = 1.0):
        super().__init__()
        self.encoder = encoder
        self.grid = encoder.grid
        if tuple(mim_teacher.teacher_grid()) != tuple(self.grid.shape):
            raise ValueError(f"method.mim_teacher runs on a {mim_teacher.teacher_grid()} patch grid but the student "
                             f"on {tuple(self.grid.shape)}: relations need the same tokens (match the image and "
                             "patch sizes)")
        if not mim_teacher.has_class_token:
            raise ValueError("method.mim_teacher has no class token (SigLIP?): the relations pair the student's class "
                             "token with the teacher's; use a class-token teacher")
        self.mim_teacher, self.feature_teacher = mim_teacher, feature_teacher  # frozen, outside the state_dict
        self.student_layers = [block_at(f, encoder.depth) for f in relation_layers]
        self.teacher_layers = [block_at(f, mim_teacher.depth) for f in relation_layers]
        self.proj = nn.Linear(encoder.embed_dim, feature_teacher.embed_dim)
        self.relation, self.feature = relation, feature
        self.max_drop, self.alpha, self.beta = max_drop, alpha, beta

    @classmethod
    def from_config(cls, method: HybridDistillConfig, model: ModelConfig, img_size, in_chans: int,
                    data=None) -> "HybridDistill":
        encoder = VisionTransformer.from_config(model, img_size, in_chans)
        grid = encoder.grid.shape
        mim = FrozenTeacher.for_method(method.mim_teacher, grid, data, "Hybrid Distillation")
        feat = FrozenTeacher.for_method(method.feature_teacher, grid, data, "Hybrid Distillation")
        return cls(encoder, mim, feat, method.relation_layers, method.relation_loss, method.feature_loss,
                   method.max_drop, method.alpha, method.beta)

    def drop_ratio(self) -> float:
        """Share of patches removed now: linear from 0 (progress 0) to max_drop (progress 1)."""
        return self.max_drop * min(max(self.progress, 0.0), 1.0)

    def num_kept(self) -> int:
        n = self.grid.num_patches
        return n - min(n - 1, math.floor(self.drop_ratio() * n + 0.5))

    def keep_from_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """ids_keep Long[B, V] in raster order: the V patches with the highest teacher class-token attention."""
        order = scores.argsort(dim=-1, descending=True, stable=True)
        return order[:, : self.num_kept()].sort(dim=-1).values

    @torch.no_grad()
    def teacher_view(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(ids_keep, the MIM teacher's attention at the relation layers) from one MIM-teacher pass."""
        layers = sorted(set(self.teacher_layers) | {self.mim_teacher.depth - 1})
        _, attn = self.mim_teacher.forward_with_attention(images, layers)
        by_layer = dict(zip(layers, attn))
        scores = self.mim_teacher.cls_attention_on_student_grid(by_layer[self.mim_teacher.depth - 1])
        return self.keep_from_scores(scores), [by_layer[i] for i in self.teacher_layers]

    def make_mask(self, batch: dict) -> Mask:
        """The dropped patches (True) at the current progress, with ids_keep."""
        ids_keep, _ = self.teacher_view(batch["image"])
        masked = torch.ones(ids_keep.shape[0], self.grid.num_patches, dtype=torch.bool, device=ids_keep.device)
        return Mask(masked=masked.scatter(1, ids_keep, False), ids_keep=ids_keep)

    def student(self, images: torch.Tensor, ids_keep: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(normed output [B, 1 + V, D], attention logits [B, H, 1 + V, 1 + V] at the relation layers)."""
        tokens = self.encoder.embed(images)
        tokens = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        x = self.encoder._with_cls(tokens)
        logits = {}
        for i, block in enumerate(self.encoder.blocks):
            if i in self.student_layers:
                logits[i] = timm_attention_logits(block.attn, block.norm1(x))
            x = block(x)
        return self.encoder.norm(x), [logits[i] for i in self.student_layers]

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        images, seeds = batch["image"], batch["seed"]
        ids_keep, teacher_attn = self.teacher_view(images)
        with torch.no_grad():
            target = self.feature_teacher(images, seeds)[0].float()
        out, student_logits = self.student(images, ids_keep)
        b = images.shape[0]
        cls_id = torch.zeros(b, 1, dtype=torch.long, device=images.device)
        # relation tokens: the class token + the kept patches, in the teacher's token order (prefix tokens first)
        prefix = teacher_attn[0].shape[-1] - self.grid.num_patches
        token_ids = torch.cat([cls_id, prefix + ids_keep], dim=1)
        rel = sum(relation_loss(s, kept_relations(t.float(), token_ids), self.relation)
                  for s, t in zip(student_logits, teacher_attn)) / len(student_logits)
        if self.feature_teacher.drop_cls:
            pred, target = self.proj(out[:, 1:]).float(), target.gather(1, ids_keep[..., None].expand(
                -1, -1, target.shape[-1]))
        else:
            pos = torch.cat([cls_id, 1 + ids_keep], dim=1)
            pred, target = self.proj(out).float(), target.gather(1, pos[..., None].expand(-1, -1, target.shape[-1]))
        feat = F.smooth_l1_loss(pred, target) if self.feature == "smooth_l1" else F.mse_loss(pred, target)
        with torch.no_grad():
            attn_entropy = mean_entropy(student_logits[-1].softmax(-1))
        return {
            "loss": self.alpha * rel + self.beta * feat,
            "relation_loss": rel.detach(),
            "feature_loss": feat.detach(),
            "kept": torch.tensor(float(ids_keep.shape[1])),
            "drop_ratio": torch.tensor(1.0 - ids_keep.shape[1] / self.grid.num_patches),
            "pred_sim": mean_pairwise_cosine(pred),          # collapse of the projected student tokens
            "target_sim": mean_pairwise_cosine(target),
            "attn_entropy": attn_entropy,                    # student's last relation map: 0 = one-hot attention
        }
