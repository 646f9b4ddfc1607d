"""MaskAlign, "Stare at What You See" (Xue et al., CVPR'23; OpenDriveLab/maskalign): no reconstruction, no decoder.

A student ViT sees only the class token and the visible patches (30%) and aligns its block outputs with a frozen
teacher's features of the FULL image, read at the class token and the visible positions. The visible set is drawn
from the teacher's class-token attention (multinomial without replacement: salient patches tend to be seen), and
that attention comes from the same teacher pass as the targets, so a step costs one teacher pass plus a student
pass over 30% of the tokens.

Slots: FrozenTeacher.forward_with_attention (targets: its layers LayerNorm-whitened, norm "layernorm"; last block's
attention) -> AttentionSampledMasking -> VisionTransformer on CLS + visible (run_blocks taps on every block, before
the final norm) -> DynamicAlignment (W = I + 0.01 mixing, Linear D_s -> D_t per aligned layer) -> loss
sum_k w_k * 2 * SmoothL1(T_k, head_k(S'_k)), "topK" weights: the last k = min(K, depth) student layers, 1/k each.

Depths may differ: student block j (1-based) aligns with teacher block round(j * L_t / L_s) (half up), the
proportional depth; equal depths align layer to layer. The teacher's layers follow from this (so
`method.teacher.layers` is left unset).

UTA (Unmasked Token Alignment, card S7) is this method with mask=block_reversed (the visible set is a BEiT block
mask's blocks: kept blocks cover the image better than scattered patches), mixing=none, aligned_layers=1 and
loss=cosine: configs/uta_vit_tiny_fmnist.yaml.

The encoder's final norm is never in the loss (taps are read before it), so it is frozen at its identity
initialisation: every trainable parameter then takes part in the backward pass, as DDP requires.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from mimkit import collapse
from mimkit.config import MethodSection, ModelConfig
from mimkit.masking import BlockMasking, Mask
from mimkit.masking.attention_sampled import AttentionSampledMasking
from mimkit.methods.base import Method
from mimkit.models import VisionTransformer
from mimkit.models.dynamic_alignment import DynamicAlignment
from mimkit.targets.teacher import FrozenTeacher, TeacherConfig


class MaskAlignConfig(MethodSection):
    name: Literal["maskalign"] = "maskalign"
    teacher: TeacherConfig = Field(..., description="the frozen teacher (method.teacher.source=...); its layers "
                                                    "are chosen from the depths, its norm whitens the targets")
    mask: Literal["attention", "random", "block_reversed"] = Field(
        "attention", description="visible set: drawn from the teacher's class-token attention (MaskAlign), uniform "
                                 "random, or the blocks of a BEiT block mask (UTA's reversed block mask)")
    mask_ratio: float = Field(0.7, gt=0.0, lt=1.0, description="fraction of patches hidden from the student")
    block_min_area: float = Field(0.08, gt=0.0, description="block_reversed: smallest block (fraction of N if < 1)")
    mixing: Literal["dynamic", "none"] = Field("dynamic", description="Dynamic Alignment's learnable layer mixing "
                                                                      "(W = I + 0.01), or none (fixed identity)")
    aligned_layers: int = Field(5, ge=1, description="loss_weights topK: the last min(K, depth) student layers "
                                                     "are aligned, weight 1/k each (UTA: 1, the last only)")
    loss: Literal["smooth_l1", "cosine"] = Field("smooth_l1", description="2 * SmoothL1 (MaskAlign) or "
                                                                           "1 - cosine per token (UTA)")


def aligned_student_layers(depth: int, k: int) -> list[int]:
    """0-based student blocks the loss reads: the last min(k, depth)."""
    return list(range(depth - min(k, depth), depth))


def teacher_layer_for(student_layer: int, student_depth: int, teacher_depth: int) -> int:
    """0-based teacher block at the same relative depth as 0-based student block `student_layer`."""
    j = math.floor((student_layer + 1) * teacher_depth / student_depth + 0.5)
    return min(teacher_depth, max(1, j)) - 1


class MaskAlign(Method):
    config_class = MaskAlignConfig

    def __init__(self, encoder: VisionTransformer, teacher: FrozenTeacher, cfg: MaskAlignConfig):
        super().__init__()
        self.encoder, self.teacher, self.cfg = encoder, teacher, cfg
        self.grid = encoder.grid
        encoder.norm.requires_grad_(False)
        depth = encoder.depth
        self.student_layers = aligned_student_layers(depth, cfg.aligned_layers)
        self.weights = [1.0 / len(self.student_layers)] * len(self.student_layers)
        self.align = DynamicAlignment(depth, encoder.embed_dim, teacher.embed_dim, self.student_layers,
                                      mixing=cfg.mixing == "dynamic")
        self.sampling = AttentionSampledMasking(cfg.mask_ratio)
        # UTA's reversed block mask: BEiT blocks covering (1 - mask_ratio) of the patches are what stays visible
        self.block_masking = BlockMasking(1.0 - cfg.mask_ratio, min_area=cfg.block_min_area)

    @classmethod
    def from_config(cls, method: MaskAlignConfig, model: ModelConfig, img_size, in_chans: int,
                    data=None) -> "MaskAlign":
        if method.teacher.layers != [-1]:
            raise ValueError(f"method.teacher.layers={method.teacher.layers}: maskalign picks the teacher layers "
                             "from the two depths (aligned_layers); leave it unset")
        if method.teacher.drop_cls:
            raise ValueError("method.teacher.drop_cls=true: maskalign aligns the class token too")
        encoder = VisionTransformer.from_config(model, img_size, in_chans)
        teacher = FrozenTeacher.for_method(method.teacher.model_copy(update={"cache_dir": None}), encoder.grid.shape,
                                           data, "MaskAlign")
        depth = encoder.depth
        teacher.layers = [teacher_layer_for(j, depth, teacher.depth)
                          for j in aligned_student_layers(depth, method.aligned_layers)]
        if method.teacher.cache_dir:  # keyed by the layers really read (only mask=random|block_reversed uses it)
            teacher.use_cache(method.teacher.model_copy(update={"layers": teacher.layers}))
        if method.mask == "attention":
            teacher.check_attention()  # a teacher whose attention cannot be read fails now, naming it
        return cls(encoder, teacher, method)

    # -------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def teacher_pass(self, images: torch.Tensor, seeds: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Targets (one [B, 1 + N, D_t] per aligned layer) and, for mask=attention, the class-token attention
        on the student's grid [B, N], from ONE teacher pass."""
        if self.cfg.mask != "attention":
            return self.teacher.features(images, seeds), None
        feats, (attn,) = self.teacher.forward_with_attention(images, [-1])
        return feats, self.teacher.cls_attention_on_student_grid(attn)

    def student_mask(self, seeds: torch.Tensor, scores: torch.Tensor | None) -> Mask:
        if self.cfg.mask == "block_reversed":
            visible = self.block_masking(seeds, self.grid.shape).masked  # the blocks are what the student sees
            ids_shuffle = torch.argsort((~visible).to(torch.uint8), dim=1, stable=True)  # visible first, raster
            keep = int(visible[0].sum())
            return Mask(masked=~visible, ids_keep=ids_shuffle[:, :keep], ids_restore=torch.argsort(ids_shuffle, 1))
        return self.sampling(seeds, self.grid.shape, scores)

    @torch.no_grad()
    def make_mask(self, batch: dict) -> Mask:
        _, scores = self.teacher_pass(batch["image"], batch["seed"])
        return self.student_mask(batch["seed"], scores)

    def student_layers_out(self, images: torch.Tensor, mask: Mask) -> list[torch.Tensor]:
        """Every block's output [B, 1 + V, D_s] for the class token and the visible patches only."""
        tokens = self.encoder.embed(images)
        tokens = torch.gather(tokens, 1, mask.ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        _, taps = self.encoder.run_blocks(tokens, taps=range(self.encoder.depth))
        return [taps[i] for i in range(self.encoder.depth)]

    def align_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pred, target = pred.float(), target.float()
        if self.cfg.loss == "cosine":
            return (1.0 - F.cosine_similarity(pred, target, dim=-1)).mean()
        return 2.0 * F.smooth_l1_loss(pred, target)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        images, seeds = batch["image"], batch["seed"]
        targets, scores = self.teacher_pass(images, seeds)
        mask = self.student_mask(seeds, scores)
        layers = self.student_layers_out(images, mask)
        preds = self.align(layers)
        b = images.shape[0]
        index = torch.cat([torch.zeros(b, 1, dtype=torch.long, device=images.device), mask.ids_keep + 1], dim=1)
        loss = images.new_zeros((), dtype=torch.float32)
        for w, pred, target in zip(self.weights, preds, targets):
            target = torch.gather(target, 1, index.unsqueeze(-1).expand(-1, -1, target.shape[-1]))
            loss = loss + w * self.align_loss(pred, target)
        out = {"loss": loss, "visible": torch.tensor(float(mask.ids_keep.shape[1]), device=loss.device),
               # collapse watch (-> 1: every token alike): the student's pooled last layer and its aligned
               # tokens, and the teacher's targets, since a weak teacher's whitened tokens can be nearly one
               # vector, which a constant prediction matches (then a low loss means little)
               "student_sim": collapse.mean_pairwise_cosine(layers[-1][:, 1:].mean(1)),
               "pred_sim": collapse.mean_pairwise_cosine(preds[-1][:, 1:]),
               "target_sim": collapse.mean_pairwise_cosine(target[:, 1:])}
        if self.align.mixing is not None:
            # how much of its own layer each aligned output still takes (starts at 1.01)
            out["mixing_self"] = torch.diagonal(self.align.mixing.detach())[self.student_layers].mean()
        return out
