"""DMJD (Ma et al., 2023, "Disjoint Masking with Joint Distillation"; mx-mark/DMJD): each image is seen in two masked
views whose hidden sets overlap as little as possible (together they cover `pred_ratio` of the patches), the hidden
patches' whitened HOG is regressed (MSE), and a second branch regresses the same target on the VISIBLE tokens.

Slots: DisjointMasking (2 views, batched on the batch axis as the reference) -> VisionTransformer on visible tokens
(the reference's ConvMAE-style encoder; `corruption=mask_token` instead encodes all tokens with a mask token, the
paper's MaskFeat variant) -> MAEDecoder (or a linear head) -> HOGTarget whitened by a non-affine LayerNorm over each
(cell, channel) histogram -> masked MSE; visible branch: (Linear-LN-GELU) x2 -> Linear -> LN(no affine) projector,
Linear predictor, SmoothL1(beta=2) on visible tokens. Total: L_mim + vis_weight * L_vis.

LR rule (reference `main_pretrain.py`): lr = blr * unique batch * (pred_ratio / mask_ratio) / 256, exposed as
`DMJD.lr_scale(cfg)`; the engine's peak lr is base_lr * batch / 256, so recipes set optim.lr to the scaled value.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator

from mimkit.config import MethodSection, ModelConfig
from mimkit.losses import masked_mse
from mimkit.masking import Mask
from mimkit.masking.disjoint import DisjointMasking, stack_views
from mimkit.methods.base import Method
from mimkit.models import DECODER_PRESETS, MAEDecoder, VisionTransformer
from mimkit.targets import HOGTarget


class DMJDConfig(MethodSection):
    name: Literal["dmjd"] = "dmjd"
    mask_ratio: float = Field(0.6, gt=0.0, lt=1.0, description="share of patches each view hides (DMJD: 0.6)")
    pred_ratio: float = Field(1.0, gt=0.0, le=1.0, description="share of patches the two views' hidden sets cover "
                              "together (>= mask_ratio; 1.0 = every patch is predicted in one view or both)")
    views: int = Field(2, ge=1, le=2, description="masked views per image: 2 = disjoint masking, 1 = plain "
                       "random masking (the no-DM ablation)")
    mask_unit: int = Field(1, ge=1, description="mask unit in patches: 1 = the reference's 'rand' mode, 2 = its "
                           "'block' mode (2x2 units; needs a grid divisible by 2, so not 7x7 Fashion-MNIST)")
    corruption: Literal["drop", "mask_token"] = Field(
        "drop", description="drop: visible-only encoder + MAE decoder (reference code); mask_token: all tokens "
        "encoded with hidden ones replaced by a mask token + linear head (paper's MaskFeat variant)")
    hog_nbins: int = Field(9, ge=1, description="HOG orientation bins over [0, pi)")
    hog_cells: int = Field(2, ge=1, description="HOG cells per patch side: cell = patch / hog_cells (8 px in 16)")
    whiten: bool = Field(True, description="standardise each (cell, channel) HOG histogram: non-affine LayerNorm "
                         "over its bins (the reference's InstanceWhitening)")
    mim_loss: Literal["l2", "smooth_l1"] = Field("l2", description="loss on hidden patches (reference: l2)")
    vis_weight: float = Field(1.0, ge=0.0, description="theta: weight of the visible-token branch (0 disables it)")
    vis_beta: float = Field(2.0, gt=0.0, description="SmoothL1 beta of the visible branch (reference: 2.0)")
    vis_dim: int | None = Field(None, ge=8, description="visible projector width; None = the decoder width "
                                "(reference: decoder_embed_dim 512)")

    @model_validator(mode="after")
    def _pred_covers_mask(self):
        if self.pred_ratio < self.mask_ratio:
            raise ValueError(f"pred_ratio {self.pred_ratio} must be >= mask_ratio {self.mask_ratio}")
        return self


def visible_projector(in_dim: int, dim: int) -> nn.Sequential:
    """The reference's `proj_embed`: (Linear-LN-GELU) x2, Linear, LayerNorm without affine."""
    return nn.Sequential(
        nn.Linear(in_dim, dim), nn.LayerNorm(dim, eps=1e-6), nn.GELU(),
        nn.Linear(dim, dim), nn.LayerNorm(dim, eps=1e-6), nn.GELU(),
        nn.Linear(dim, dim), nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False),
    )


def hog_target(grid, nbins: int, cells: int) -> HOGTarget:
    ph, pw = grid.patch_size
    cell = min(ph, pw) // cells  # square cells; a non-square patch holds more along its long side
    if cell < 1 or ph % cell or pw % cell:
        raise ValueError(f"hog_cells={cells} does not split the patch {grid.patch_size} into square cells")
    return HOGTarget(grid, cell=cell, nbins=nbins)


class DMJD(Method):
    config_class = DMJDConfig

    def __init__(self, encoder: VisionTransformer, target: HOGTarget, decoder: MAEDecoder | None = None,
                 cfg: DMJDConfig | None = None, vis_dim: int = 128):
        super().__init__()
        cfg = cfg or DMJDConfig()
        self.cfg = cfg
        self.encoder = encoder
        self.grid = encoder.grid
        self.target = target
        self.masking = DisjointMasking(cfg.mask_ratio, cfg.pred_ratio if cfg.views == 2 else cfg.mask_ratio,
                                       cfg.mask_unit)
        d, td = encoder.embed_dim, target.dim
        if cfg.corruption == "drop":
            if decoder is None:
                raise ValueError("corruption=drop needs a decoder")
            self.decoder = decoder
        else:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
            self.head = nn.Linear(d, td)
            nn.init.trunc_normal_(self.mask_token, std=0.02)
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        if cfg.vis_weight > 0:
            self.projector = visible_projector(d, vis_dim)
            self.predictor = nn.Linear(vis_dim, td)
            for m in [*self.projector, self.predictor]:  # the reference: every Linear xavier-uniform, zero bias
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)

    @classmethod
    def from_config(cls, method: DMJDConfig, model: ModelConfig, img_size, in_chans: int, data=None) -> "DMJD":
        encoder = VisionTransformer.from_config(model, img_size, in_chans)
        target = hog_target(encoder.grid, method.hog_nbins, method.hog_cells)
        decoder = MAEDecoder.from_config(model, encoder, target.dim) if method.corruption == "drop" else None
        vis_dim = method.vis_dim or model.decoder_dim or DECODER_PRESETS[model.decoder].dim
        return cls(encoder, target, decoder, method, vis_dim)

    @staticmethod
    def lr_scale(cfg) -> float:
        """DMJD's lr multiplier pred_ratio / mask_ratio (a PretrainConfig or its `method` section): the peak lr
        is base_lr * batch / 256 * lr_scale; 1 with a single view (nothing extra is predicted)."""
        m = getattr(cfg, "method", cfg)
        return m.pred_ratio / m.mask_ratio if m.views == 2 else 1.0

    def make_views(self, batch: dict) -> list[Mask]:
        """The views' masks ([view 1] or [view 1, view 2]), each Bool[B, N] with ids_keep / ids_restore."""
        views = self.masking(batch["seed"], self.grid.shape)
        return views[: self.cfg.views]

    def make_mask(self, batch: dict) -> Mask:
        """View 1's mask (pictures); `make_views` gives every view."""
        return self.make_views(batch)[0]

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """Whitened HOG [B, N, dim]: each (cell, channel) histogram standardised over its bins."""
        t = self.target(images)
        if self.cfg.whiten:
            # HOGTarget's histograms are L2-normalised per cell and channel; LayerNorm is scale-invariant, so this
            # matches the reference's LN over raw histograms up to its eps
            b, n, dim = t.shape
            nb = self.target.nbins
            t = F.layer_norm(t.view(b, n, dim // nb, nb), (nb,)).view(b, n, dim)
        return t

    def encode(self, images: torch.Tensor, mask: Mask) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden-branch predictions [B, N, dim] at every patch, encoder tokens of the visible patches
        [B, V, D] in `mask.ids_keep` order)."""
        if self.cfg.corruption == "drop":
            latent = self.encoder(images, ids_keep=mask.ids_keep)
            return self.decoder(latent, mask.ids_restore), latent[:, 1:]
        tokens = self.encoder.forward_tokens(self.encoder.embed_masked(images, mask.masked, self.mask_token))[:, 1:]
        visible = torch.gather(tokens, 1, mask.ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        return self.head(tokens), visible

    def predict_visible(self, visible: torch.Tensor) -> torch.Tensor:
        """Visible branch: [B, V, D] encoder tokens -> [B, V, dim] target predictions."""
        return self.predictor(self.projector(visible))

    def losses(self, pred: torch.Tensor, pred_vis: torch.Tensor | None, target: torch.Tensor,
               mask: Mask) -> dict[str, torch.Tensor]:
        """{"loss_mim": on hidden patches, "loss_vis": on visible patches (`mask.ids_keep`) only}."""
        if self.cfg.mim_loss == "l2":
            loss_mim, _ = masked_mse(pred, target, mask.masked)
        else:
            per = F.smooth_l1_loss(pred.float(), target.float(), reduction="none", beta=self.cfg.vis_beta).mean(-1)
            w = mask.masked.to(per.dtype)
            loss_mim = (per * w).sum() / w.sum().clamp_min(1.0)
        if pred_vis is None:
            return {"loss_mim": loss_mim, "loss_vis": loss_mim.new_zeros(())}
        target_vis = torch.gather(target, 1, mask.ids_keep.unsqueeze(-1).expand(-1, -1, target.shape[-1]))
        loss_vis = F.smooth_l1_loss(pred_vis.float(), target_vis.float(), beta=self.cfg.vis_beta)
        return {"loss_mim": loss_mim, "loss_vis": loss_vis}

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["image"]
        views = self.make_views(batch)
        mask = stack_views(views)
        with torch.no_grad():
            target = self.targets(images)
        k = len(views)  # the views go through the encoder as one batch (view-major), as the reference does
        pred, visible = self.encode(torch.cat([images] * k), mask)
        pred_vis = self.predict_visible(visible) if self.cfg.vis_weight > 0 else None
        out = self.losses(pred, pred_vis, torch.cat([target] * k), mask)
        out["loss"] = out["loss_mim"] + self.cfg.vis_weight * out["loss_vis"]
        union = torch.stack([v.masked for v in views]).any(0)
        out["pred_coverage"] = union.float().mean().detach()  # share of patches predicted in some view
        return out
