"""BEiT v2 (Peng et al., 2022; card C4 stage 2): BEiT's masked code prediction with the codes of a trained VQ-KD
tokenizer (methods/vqkd.py, stage 1), plus a patch-aggregation branch that routes global information into [CLS].

    codes = tokenizer(x)                                   frozen VQ-KD, on the uncorrupted image
    h     = encoder(mask-token corrupted x)                block mask, exactly round(0.38 N) hidden patches
    h_agg = agg_blocks([CLS after the last block ; patches after block `early_layers`])
    L     = CE(lm_head(norm(h_L[masked])), code) + CE(lm_head(norm(h_agg[masked])), code)

norm (the encoder's final LayerNorm) and lm_head are shared by both terms; the aggregation blocks are dropped
after pretraining (they are not part of `encoder`).

`method.tokenizer` names a vqkd run folder or checkpoint (`mimkit tokenizer fit` writes one). Its encoder, code
projection and codebook are loaded frozen (methods.vqkd.load_tokenizer: the teacher that trained it is not
needed) and kept out of the state_dict and the optimizer (models.frozen.HoldsFrozen, as for
targets.teacher.FrozenTeacher): a BEiT v2 checkpoint holds the student only and rebuilds the tokenizer from that
path when loaded.

Deviations: mimkit's ViT has no layer-scale and no shared relative position bias (absolute sin-cos instead);
the tokenizer sees the student's crop at the student's resolution (BEiT v2 feeds it a second 224-px copy).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from mimkit.config import MethodSection, ModelConfig
from mimkit.masking import Mask
from mimkit.masking.block import BlockMasking
from mimkit.methods.base import Method
from mimkit.models import VisionTransformer
from mimkit.models.aggregation_head import PatchAggregationHead, early_layer_index
from mimkit.models.frozen import HoldsFrozen
from mimkit.targets.teacher import data_stats, renormalisation


class BEiTv2Config(MethodSection):
    name: Literal["beit_v2"] = "beit_v2"
    tokenizer: str = Field(..., description="a vqkd run folder or checkpoint (`mimkit tokenizer fit` output)")
    mask_ratio: float = Field(0.38, gt=0.0, lt=1.0, description="exactly round(ratio * N) hidden patches "
                                                                "(BEiT v2: 75 of 196)")
    block_min_area: float = Field(0.08, gt=0.0, description="smallest mask block: < 1 a share of N "
                                                            "(BEiT v2: 16 of 196), >= 1 a patch count")
    early_layers: int | None = Field(None, ge=1, description="blocks before the patch tokens the aggregation "
                                                             "branch reads (BEiT v2: 9 of 12); None: 3/4 depth")
    head_layers: int = Field(2, ge=0, description="blocks of the aggregation branch; 0 removes it (ablation)")


class BEiTv2(HoldsFrozen, Method):
    config_class = BEiTv2Config

    def __init__(self, encoder: VisionTransformer, tokenizer, data_mean, data_std, cfg: BEiTv2Config):
        super().__init__()
        self.encoder = encoder
        self.grid = encoder.grid
        if tuple(tokenizer.grid.shape) != tuple(self.grid.shape):
            raise ValueError(f"method.tokenizer={cfg.tokenizer!r} codes a {tokenizer.grid.shape} patch grid, the "
                             f"student has {self.grid.shape}: train the tokenizer with the same grid")
        self.hold_frozen("_tokenizer", tokenizer)  # no parameters for the optimizer, nothing in the state_dict
        self.num_codes = int(tokenizer.num_codes)
        if len(tokenizer.data_mean) != len(list(data_mean)):
            raise ValueError(f"method.tokenizer={cfg.tokenizer!r} was trained on {len(tokenizer.data_mean)}-channel "
                             f"images, this run's have {len(list(data_mean))}")
        # the tokenizer's input in its own run's normalisation (identity when both runs agree)
        scale, shift = renormalisation(data_mean, data_std, tokenizer.data_mean, tokenizer.data_std)
        self.register_buffer("tok_scale", scale, persistent=False)
        self.register_buffer("tok_shift", shift, persistent=False)
        self.tok_size = tuple(tokenizer.grid.img_size)
        d = encoder.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.lm_head = nn.Linear(d, self.num_codes)
        nn.init.trunc_normal_(self.lm_head.weight, std=0.02)
        nn.init.zeros_(self.lm_head.bias)
        self.masking = BlockMasking(cfg.mask_ratio, cfg.block_min_area, exact=True)
        self.aggregation = None
        if cfg.head_layers:
            self.early = early_layer_index(cfg.early_layers, encoder.depth)
            self.aggregation = PatchAggregationHead.for_encoder(encoder, cfg.head_layers)

    @classmethod
    def from_config(cls, method: BEiTv2Config, model: ModelConfig, img_size, in_chans: int, data=None) -> "BEiTv2":
        from mimkit.methods.vqkd import load_tokenizer

        mean, std = data_stats(data, "BEiT v2")
        encoder = VisionTransformer.from_config(model, img_size, in_chans)
        return cls(encoder, load_tokenizer(method.tokenizer), mean, std, method)

    @property
    def tokenizer(self):
        return self._tokenizer

    def make_mask(self, batch: dict) -> Mask:
        return self.masking(batch["seed"], self.grid.shape)

    @torch.no_grad()
    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """Long[B, N]: the tokenizer's code of every patch of the uncorrupted images."""
        x = images.float() * self.tok_scale + self.tok_shift
        if tuple(x.shape[-2:]) != self.tok_size:
            x = F.interpolate(x, size=self.tok_size, mode="bicubic", align_corners=False)
        return self._tokenizer.tokenize(x)

    def logits(self, images: torch.Tensor, mask: Mask) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Code logits [B, N, K] of the last layer and of the aggregation branch (None without one)."""
        enc = self.encoder
        tokens = enc.embed_masked(images, mask.masked, self.mask_token)
        if self.aggregation is None:
            return self.lm_head(enc.forward_tokens(tokens)[:, 1:]), None
        last = enc.depth - 1
        out, taps = enc.run_blocks(tokens, taps=(self.early, last))
        main = self.lm_head(out[:, 1:])
        agg = self.aggregation(taps[last][:, :1], taps[self.early][:, 1:])
        return main, self.lm_head(enc.norm(agg)[:, 1:])

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["image"]
        mask = self.make_mask(batch)
        codes = self.targets(images)
        main, agg = self.logits(images, mask)
        hidden = mask.masked
        target = codes[hidden]
        main_h = main[hidden].float()
        loss_main = F.cross_entropy(main_h, target)
        out = {"mlm_loss": loss_main.detach(), "mlm_acc": (main_h.argmax(-1) == target).float().mean()}
        loss = loss_main
        if agg is not None:
            agg_h = agg[hidden].float()
            loss_agg = F.cross_entropy(agg_h, target)
            loss = loss + loss_agg
            out.update(agg_mlm_loss=loss_agg.detach(), agg_mlm_acc=(agg_h.argmax(-1) == target).float().mean())
        # collapse of the targets: the share of the codebook this batch's codes use
        out["target_code_usage"] = torch.tensor(torch.unique(codes).numel() / self.num_codes, device=loss.device)
        return {"loss": loss, **out}
