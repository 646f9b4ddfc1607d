"""HPM, Hard Patches Mining (Wang et al., CVPR 2023; Haochen-Wang409/HPM `models_mae_learn_loss.py`).

MAE plus a loss predictor: a second decoder branch learns to rank the patches by their reconstruction loss, and
an EMA copy of the whole model, shown the full image, scores every patch so that the mask hides the patches
expected to be hardest. An easy-to-hard curriculum raises their share alpha_t of the mask over training.

Slots: EMATeacher (models.ema) -> score-driven mask (top alpha_t * M by predicted loss + random rest) ->
VisionTransformer (visible tokens only) -> MAE decoder input shared by the reconstruction branch (MAEDecoder) and
the LossPredictor branch -> PixelTarget -> masked MSE + pairwise ranking BCE on the predicted losses.
"""

from __future__ import annotations

import functools
from functools import partial
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field
from timm.models.vision_transformer import Block

from mimkit import rng
from mimkit.config import MethodSection, ModelConfig
from mimkit.losses import masked_mse
from mimkit.masking import Mask, mask_from_noise
from mimkit.methods.base import EMATeacherMixin, Method, Reconstruction
from mimkit.models import MAEDecoder, VisionTransformer
from mimkit.models.ema import ramp_momentum
from mimkit.models.vit import init_mae_weights
from mimkit.targets import PixelTarget

# The random part of the mask uses MAE's stream (RandomMasking: 1) on purpose: with no hard patches (alpha = 0,
# the start of training) HPM hides exactly the patches MAE would for the same seeds.
_RANDOM_STREAM = 1


class HPMConfig(MethodSection):
    name: Literal["hpm"] = "hpm"
    mask_ratio: float = Field(0.75, gt=0.0, lt=1.0, description="M = N - int(N * (1 - mask_ratio)) hidden patches")
    norm_pix: bool = Field(False, description="norm-pix targets; the released HPM script leaves them off")
    hard_max: float = Field(0.5, ge=0.0, le=1.0,
                            description="curriculum: alpha_t = hard_max * progress of the mask is mined by predicted "
                                        "loss (reference: 0.5 * (epoch + 1) / epochs)")
    pred_loss: Literal["relative", "absolute"] = Field(
        "relative", description="loss-predictor objective: pairwise ranking BCE (default) or MSE to per-image "
                                "standardised losses")
    pred_weight: float = Field(1.0, ge=0.0, description="weight of the loss-predictor objective")
    ema_momentum: float = Field(0.99, ge=0.0, le=1.0,
                                description="EMA teacher momentum at the start (reference 0.999, for ~4M steps)")
    ema_momentum_end: float = Field(0.995, ge=0.0, le=1.0,
                                    description="momentum after the ramp (reference 0.9999)")
    ema_ramp: float = Field(0.125, ge=0.0, le=1.0,
                            description="share of training of the linear momentum ramp (reference 100/800 epochs)")


class LossPredictor(nn.Module):
    """HPM's second decoder branch: as deep and wide as the reconstruction decoder, on the same input tokens;
    it predicts p*p*C values per patch and their mean is the patch's predicted loss (as the reference)."""

    def __init__(self, dim: int, depth: int, num_heads: int, out_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.Sequential(
            *[Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)]
        )
        self.norm = norm_layer(dim)
        self.pred = nn.Linear(dim, out_dim)
        init_mae_weights(self)

    @classmethod
    def like(cls, decoder: MAEDecoder) -> "LossPredictor":
        first = decoder.blocks[0]
        dim = decoder.embed.out_features
        return cls(dim, len(decoder.blocks), first.attn.num_heads, decoder.pred.out_features,
                   first.mlp.fc1.out_features / dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Decoder input [B, 1 + N, Dd] (class token first, raster order) -> predicted losses [B, N]."""
        return self.pred(self.norm(self.blocks(tokens)))[:, 1:, :].mean(dim=-1)


def pair_labels(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For losses [B, M]: (pos, neg) Bool[B, M, M] with pos[b, i, j] = target_j > target_i, neg the reverse.
    Pairs with equal losses (and i = j) are in neither: they carry no ranking information."""
    diff = target.unsqueeze(1) - target.unsqueeze(2)
    return diff > 0, diff < 0


def ranking_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """HPM's relative loss: for every ordered pair (i, j) of masked patches of an image, BCE of the logit
    pred_j - pred_i against [target_j > target_i], summed over the batch and divided by the number of non-tied
    pairs. The target losses are detached. (The reference writes -log(sigmoid + 1e-6); we use the exact,
    stable softplus form, which differs only where the eps cap would bind, losses above ~13.8.)"""
    pos, neg = pair_labels(target.detach().float())
    pred = pred.float()
    logit = pred.unsqueeze(1) - pred.unsqueeze(2)
    per_pair = torch.where(pos, F.softplus(-logit), torch.where(neg, F.softplus(logit), torch.zeros_like(logit)))
    return per_pair.sum() / (pos | neg).sum().clamp_min(1)


def absolute_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """HPM's absolute variant: MSE to the target losses standardised per image."""
    target = target.detach().float()
    target = (target - target.mean(1, keepdim=True)) / (target.var(1, keepdim=True) + 1e-6) ** 0.5
    return (pred.float() - target).pow(2).mean()


@torch.no_grad()
def ranking_accuracy(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Share of non-tied pairs whose predicted order matches the true loss order (predicted ties count 1/2)."""
    pos, neg = pair_labels(target.float())
    logit = pred.float().unsqueeze(1) - pred.float().unsqueeze(2)
    score = torch.where(logit > 0, 1.0, torch.where(logit < 0, 0.0, 0.5))
    correct = torch.where(pos, score, 0.0) + torch.where(neg, 1.0 - score, 0.0)
    return correct.sum() / (pos | neg).sum().clamp_min(1)


class HPM(EMATeacherMixin, Method):
    config_class = HPMConfig

    def __init__(self, encoder: VisionTransformer, decoder: MAEDecoder, mask_ratio: float = 0.75,
                 norm_pix: bool = False, hard_max: float = 0.5, pred_loss: str = "relative", pred_weight: float = 1.0,
                 ema_momentum: float = 0.99, ema_momentum_end: float = 0.995, ema_ramp: float = 0.125):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.loss_predictor = LossPredictor.like(decoder)
        self.grid = encoder.grid
        self.mask_ratio = mask_ratio
        num_patches = self.grid.num_patches
        self.num_masked = num_patches - int(num_patches * (1 - mask_ratio))
        if self.num_masked >= num_patches:
            raise ValueError(f"mask ratio {mask_ratio} leaves no visible patch out of {num_patches}")
        self.target = PixelTarget(self.grid, norm=norm_pix)
        self.hard_max, self.pred_loss, self.pred_weight = hard_max, pred_loss, pred_weight
        # the EMA copy of the whole network (timm.ModelEma in the reference), made after initialisation
        self.init_teacher(functools.partial(ramp_momentum, start=ema_momentum, end=ema_momentum_end, ramp=ema_ramp))

    @classmethod
    def from_config(cls, method: HPMConfig, model: ModelConfig, img_size, in_chans: int, data=None) -> "HPM":
        encoder = VisionTransformer.from_config(model, img_size, in_chans)
        return cls(encoder, MAEDecoder.from_config(model, encoder), method.mask_ratio, method.norm_pix,
                   method.hard_max, method.pred_loss, method.pred_weight, method.ema_momentum,
                   method.ema_momentum_end, method.ema_ramp)

    def student(self) -> dict[str, nn.Module]:
        """The parts the EMA teacher copies (not registered again: they live in the method)."""
        return {"encoder": self.encoder, "decoder": self.decoder, "loss_predictor": self.loss_predictor}

    @property
    def alpha(self) -> float:
        """Share of the mask taken from the highest predicted losses; grows linearly with training progress."""
        return self.hard_max * min(max(self.progress, 0.0), 1.0)

    @torch.no_grad()
    def teacher_scores(self, images: torch.Tensor) -> torch.Tensor:
        """The EMA model's predicted loss of every patch, [B, N], with the whole image visible (the reference
        calls the EMA model with an all-False mask: no mask tokens at all)."""
        t = self.teacher.module
        latent = t["encoder"](images)
        b, n = images.shape[0], self.grid.num_patches
        ids = torch.arange(n, device=images.device).expand(b, n)
        return t["loss_predictor"](t["decoder"].tokens(latent, ids)).float()

    def hard_count(self, alpha: float) -> int:
        return int(self.num_masked * alpha)

    @torch.no_grad()
    def make_mask(self, batch: dict, scores: torch.Tensor | None = None, alpha: float | None = None) -> Mask:
        """Hide M patches: the int(M * alpha) highest-scored, then M - that many uniformly at random from the rest
        (random from the image's seed). scores default to the teacher's, alpha to the curriculum's."""
        seeds = batch["seed"]
        if scores is None:
            scores = self.teacher_scores(batch["image"])
        n_hard = self.hard_count(self.alpha if alpha is None else alpha)
        noise = rng.uniform(seeds, self.grid.num_patches, stream=_RANDOM_STREAM).to(scores.device)
        if n_hard > 0:
            hard = scores.float().topk(n_hard, dim=1).indices
            noise = noise.scatter(1, hard, 2.0)  # above every uniform draw: sorted into the hidden share
        return mask_from_noise(noise, self.mask_ratio)

    def predict(self, images: torch.Tensor, mask: Mask) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixel predictions [B, N, P], predicted losses [B, N]) from the two decoder branches."""
        latent = self.encoder(images, ids_keep=mask.ids_keep)
        tokens = self.decoder.tokens(latent, mask.ids_restore)
        return self.decoder.head(tokens), self.loss_predictor(tokens)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["image"]
        alpha = self.alpha
        mask = self.make_mask(batch, alpha=alpha)
        pred, loss_pred = self.predict(images, mask)
        with torch.no_grad():
            target = self.target(images)
        recon, per_patch = masked_mse(pred, target, mask.masked)
        b = images.shape[0]
        # masked patches in raster order, M per image (the mask hides the same number in every image)
        predicted = loss_pred[mask.masked].view(b, -1)
        actual = per_patch[mask.masked].view(b, -1).detach()
        if self.pred_loss == "relative":
            learn = ranking_loss(predicted, actual)
        else:
            learn = absolute_loss(predicted, actual)
        return {
            "loss": recon + self.pred_weight * learn,
            "recon_loss": recon.detach(),
            "pred_loss": learn.detach(),
            "rank_acc": ranking_accuracy(predicted.detach(), actual),
            "alpha": torch.tensor(alpha, device=recon.device),
        }

    @torch.no_grad()
    def reconstruct(self, batch: dict) -> Reconstruction:
        images = batch["image"]
        mask = self.make_mask(batch)
        pred = self.target.to_pixels(self.predict(images, mask)[0].float(), images.float())
        hidden = self.grid.expand_mask(mask.masked)
        return Reconstruction.from_mask(images, pred, hidden)
