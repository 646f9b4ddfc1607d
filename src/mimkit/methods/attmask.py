"""AttMask, attention-guided masking for distillation MIM (Kakogeorgiou et al., ECCV 2022; gkakogeorgiou/attmask).

iBOT (methods.ibot) with one slot changed: the mask. The EMA teacher's forward on the unmasked views also gives
its last block's class-token attention to every patch (mean over heads, VisionTransformer.
forward_with_cls_attention), and the student's mask hides the most attended patches (High), the same with a few
of the most attended revealed again as hints (Hint), or the least attended (Low, the paper's control). Images
are masked with probability masking_prob (0.5), at a ratio U(0.1, 0.5) (iBOT's pred_ratio 0.3 -+ 0.2).

Slots: data.views -> EMATeacher (encoder + DINO head, one pass: logits and attention) -> AttentionGuidedMasking
(masking.attention_guided) -> iBOT's student, head and losses unchanged.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from mimkit.masking.attention_guided import HINT_STREAM, AttentionGuidedMasking
from mimkit.methods.ibot import IBOT, DistillationSettings


class AttMaskConfig(DistillationSettings):
    name: Literal["attmask"] = "attmask"
    variant: Literal["high", "hint", "low"] = Field(
        "high", description="hide the most attended patches (high), the same with hints revealed (hint), or the "
                            "least attended (low, the control)")
    show_max: float = Field(0.1, ge=0.0, le=1.0, description="hint: reveal int(show_max * ratio * N) patches drawn "
                                                             "from the int(show_max * N) most attended")


class AttMask(IBOT):
    config_class = AttMaskConfig
    mask_reads_teacher = True

    def __init__(self, encoder, cfg: AttMaskConfig):
        super().__init__(encoder, cfg)
        self.masking = AttentionGuidedMasking(cfg.variant, cfg.show_max)

    @torch.no_grad()
    def teacher_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher logits [M, 1 + N, K] and class-token attention to the patches [M, N], from one pass."""
        t = self.teacher.module
        tokens, scores = t["encoder"].forward_with_cls_attention(images)
        return t["head"](tokens).float(), scores

    def view_mask(self, seeds: torch.Tensor, view: int, scores: torch.Tensor | None) -> torch.Tensor:
        # the reference draws one ratio per batch; here each image's own (batch-independent, from its seed)
        ratios = self.mask_ratios(seeds, view)
        return self.masking(scores, ratios, seeds, stream=HINT_STREAM + view).masked
