"""SelectiveMAE (Wang et al., ICCV 2025, "Harnessing Massive Satellite Imagery with Efficient Masked Image Modeling").

Encode only a selected ~15% of the patches and reconstruct only a selected 25% of the rest: half of the encoded set is
sampled by a HOG informativeness score, the other half is added by Progressive Semantic Token Selection (PSTS: by
cosine similarity of patch embeddings to the chosen set, near -> far -> random over training); the reconstruction set
is sampled from the unselected patches by the same score. A cross-attention decoder (CrossMAE-like) predicts just the
reconstruction set, so both encoder and decoder cost shrink.

Slots: HOG energy score (targets.hog.HOG gradients) -> Gumbel-top-k seeding + PSTS expansion -> VisionTransformer
(selected tokens only) -> CrossDecoder (queries at the reconstruction set; or MAEDecoder on visible + those queries)
-> PixelTarget -> MSE on the reconstruction set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from mimkit import rng
from mimkit.config import MethodSection, ModelConfig
from mimkit.masking import Mask
from mimkit.methods.base import Method, Reconstruction
from mimkit.models import DECODER_PRESETS, MAEDecoder, VisionTransformer
from mimkit.models.cross_decoder import CrossDecoder
from mimkit.targets import HOG, PixelTarget

# distinct rng streams per random draw (rng.uniform's `stream`)
_SEED_STREAM, _TARGET_STREAM, _EXPAND_STREAM = 11, 12, 20


class SelectiveMAEConfig(MethodSection):
    name: Literal["selective_mae"] = "selective_mae"
    mask_ratio: float = Field(0.85, gt=0.0, lt=1.0, description="the encoder sees int(N * (1 - mask_ratio)) patches")
    kept_mask_ratio: float = Field(0.25, gt=0.0, lt=1.0,
                                   description="reconstruction set: int(N * kept_mask_ratio) of the unselected patches")
    seed_frac: float = Field(0.5, gt=0.0, le=1.0,
                             description="share of the encoded set sampled by score; PSTS adds the rest")
    expansion_steps: int = Field(2, ge=1, description="PSTS sub-steps (similarities recomputed after each)")
    score: Literal["hog", "random"] = Field(
        "hog", description="hog: per-patch HOG gradient energy; random: uniform, what the released code amounts to")
    temperature: float = Field(1.0, gt=0.0, description="softmax temperature on the per-image standardised energy")
    psts_stages: tuple[float, float, float, float] = Field(
        (0.35, 0.375, 0.725, 0.75),
        description="fractions of training where PSTS goes near->far (start, end), then far->random (start, end)",
    )
    norm_pix: bool = True
    decoder: Literal["cross", "mae"] = Field(
        "cross", description="cross: CrossMAE decoder (reference); mae: MAE decoder on visible + queried tokens")

    @model_validator(mode="after")
    def _check(self):
        if self.kept_mask_ratio > self.mask_ratio:
            raise ValueError("kept_mask_ratio cannot exceed mask_ratio: only hidden patches can be reconstructed")
        s = self.psts_stages
        if not all(0.0 <= a <= b <= 1.0 for a, b in zip((0.0, *s), (*s, 1.0))):
            raise ValueError(f"psts_stages must be non-decreasing fractions in [0, 1], got {s}")
        return self


@dataclass
class Selection:
    """Which patches SelectiveMAE encodes and reconstructs for each image of a batch."""

    mask: Mask                  # masked = not encoded; ids_keep = encoded patches (raster order)
    seeded: torch.Tensor        # Bool[B, N]: the score-sampled part of the encoded set
    targets: torch.Tensor       # Bool[B, N]: the reconstruction set (a subset of mask.masked)
    ids_target: torch.Tensor    # Long[B, R]: the same, raster order
    logits: torch.Tensor        # Float[B, N]: log-probabilities (up to a constant) the score assigns


def _pick(keys: torch.Tensor, available: torch.Tensor, k: int) -> torch.Tensor:
    """Bool[B, N]: the k available positions with the largest keys (all rows have at least k available)."""
    picked = torch.zeros_like(available)
    if k > 0:
        idx = keys.masked_fill(~available, float("-inf")).topk(k, dim=1).indices
        picked.scatter_(1, idx, True)
    return picked


def _gumbel(seeds: torch.Tensor, n: int, stream: int) -> torch.Tensor:
    u = rng.uniform(seeds, n, stream).clamp_min(2.0**-25)  # no log(0)
    return -torch.log(-torch.log(u))


def _ids(flags: torch.Tensor, k: int) -> torch.Tensor:
    """Long[B, k]: positions of the k True entries per row, in raster order."""
    return torch.argsort((~flags).to(torch.int8), dim=1, stable=True)[:, :k]


class SelectiveMAE(Method):
    config_class = SelectiveMAEConfig

    def __init__(self, encoder: VisionTransformer, decoder: CrossDecoder | MAEDecoder, cfg: SelectiveMAEConfig):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.cfg = cfg
        self.grid = encoder.grid
        n = self.grid.num_patches
        self.num_encoded = int(n * (1 - cfg.mask_ratio))
        self.num_seed = min(self.num_encoded, max(1, int(self.num_encoded * cfg.seed_frac)))
        self.num_targets = int(n * cfg.kept_mask_ratio)
        if self.num_encoded < 1 or self.num_targets < 1 or self.num_encoded + self.num_targets > n:
            raise ValueError(
                f"{n} patches cannot hold {self.num_encoded} encoded and {self.num_targets} target patches")
        self.hog = HOG(nbins=9)
        self.target = PixelTarget(self.grid, norm=cfg.norm_pix)

    @classmethod
    def from_config(cls, method: SelectiveMAEConfig, model: ModelConfig, img_size, in_chans: int, data=None) -> "SelectiveMAE":
        encoder = VisionTransformer.from_config(model, img_size, in_chans)
        if method.decoder == "mae":
            return cls(encoder, MAEDecoder.from_config(model, encoder), method)
        spec = DECODER_PRESETS[model.decoder]
        depth = model.decoder_depth or spec.depth
        # cross-attention only (the reference's self_attn=False); keys/values map the encoder width directly
        decoder = CrossDecoder(encoder.grid.shape, [encoder.embed_dim] * depth, encoder.grid.patch_dim,
                               dim=model.decoder_dim or spec.dim, num_heads=model.decoder_heads or spec.num_heads)
        return cls(encoder, decoder, method)

    # ---- scoring -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def energy(self, images: torch.Tensor) -> torch.Tensor:
        """HOG energy per patch [B, N]: the mean Sobel gradient magnitude over the patch's pixels and channels,
        i.e. the total mass of its (un-normalised) HOG histograms per pixel."""
        magnitude, _ = self.hog.gradients(images)
        pooled = F.avg_pool2d(magnitude.mean(dim=1, keepdim=True), self.grid.patch_size)
        return pooled.flatten(1)

    @torch.no_grad()
    def score_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of p = softmax(.) [B, N]. The released code standardises each HOG vector before averaging it, so
        its score is ~0 everywhere and p ~ uniform ("random"); "hog" standardises the energy across an image's
        patches instead, so the temperature does not depend on the image scale."""
        if self.cfg.score == "random":
            return torch.zeros(images.shape[0], self.grid.num_patches, device=images.device)
        return self.standard_energy(images) / self.cfg.temperature

    @torch.no_grad()
    def standard_energy(self, images: torch.Tensor) -> torch.Tensor:
        """HOG energy standardised across each image's patches [B, N]."""
        e = self.energy(images)
        return (e - e.mean(dim=1, keepdim=True)) / (e.std(dim=1, keepdim=True) + 1e-6)

    # ---- PSTS ----------------------------------------------------------------------------------------------
    def psts_stage(self, progress: float | None = None) -> tuple[int, str, str, float]:
        """(stage 1-5, primary rule, secondary rule, share of a sub-step picked by the primary rule).

        Reference stages (epochs 0-280 near, 280-300 near->far, 300-580 far, 580-600 far->random, then random, of
        800 epochs in train.sh; main_pretrain.py overrides TokenSelect's 200/220/1180/1200 defaults) as fractions."""
        p = self.progress if progress is None else progress
        s1, s2, s3, s4 = self.cfg.psts_stages
        if p < s1:
            return 1, "near", "near", 1.0
        if p < s2:
            return 2, "near", "far", 1.0 - (p - s1) / (s2 - s1)
        if p < s3:
            return 3, "far", "far", 1.0
        if p < s4:
            return 4, "far", "random", 1.0 - (p - s3) / (s4 - s3)
        return 5, "random", "random", 1.0

    @torch.no_grad()
    def expand(self, tokens: torch.Tensor, selected: torch.Tensor, k: int, noise: torch.Tensor,
               progress: float | None = None) -> torch.Tensor:
        """Bool[B, N]: k more patches (not in `selected`) chosen by the PSTS rule for this point of training.
        near/far: highest/lowest max cosine similarity of a patch's embedding (`tokens` [B, N, D]) to the selected
        set; random: highest `noise` [B, N]."""
        _, first, second, share = self.psts_stage(progress)
        t = F.normalize(tokens.float(), dim=-1)
        sim = (t @ t.transpose(1, 2)).masked_fill(~selected[:, None, :], float("-inf")).amax(dim=-1)
        keys = {"near": sim, "far": -sim, "random": noise}
        n_first = int(share * k)  # int(), as the reference's near/far counts
        added = _pick(keys[first], ~selected, n_first)
        return added | _pick(keys[second], ~(selected | added), k - n_first)

    @torch.no_grad()
    def select(self, batch: dict) -> Selection:
        images, seeds = batch["image"], batch["seed"]
        n = self.grid.num_patches
        logits = self.score_logits(images)
        # multinomial(p) without replacement == top-k of logits + Gumbel noise, here keyed by each image's seed
        everywhere = torch.ones_like(logits, dtype=torch.bool)
        seeded = _pick(logits + _gumbel(seeds, n, _SEED_STREAM).to(logits.device), everywhere, self.num_seed)
        selected = seeded
        tokens = self.encoder.embed(images)  # patch embeddings + positions, as the reference's similarity input
        rest, steps = self.num_encoded - self.num_seed, self.cfg.expansion_steps
        for j in range(steps):
            k = rest // steps if j < steps - 1 else rest - (steps - 1) * (rest // steps)
            noise = rng.uniform(seeds, n, _EXPAND_STREAM + j).to(tokens.device)
            selected = selected | self.expand(tokens, selected, k, noise)
        targets = _pick(logits + _gumbel(seeds, n, _TARGET_STREAM).to(logits.device), ~selected, self.num_targets)
        ids_keep = _ids(selected, self.num_encoded)
        ids_restore = torch.argsort(torch.cat([ids_keep, _ids(~selected, n - self.num_encoded)], dim=1), dim=1)
        mask = Mask(masked=~selected, ids_keep=ids_keep, ids_restore=ids_restore)
        return Selection(mask, seeded, targets, _ids(targets, self.num_targets), logits)

    # ---- model ---------------------------------------------------------------------------------------------
    def predict(self, images: torch.Tensor, sel: Selection, ids_query: torch.Tensor | None = None) -> torch.Tensor:
        """Predictions [B, Q, patch_dim] for the patches `ids_query` (default: the reconstruction set)."""
        ids_query = sel.ids_target if ids_query is None else ids_query
        latent = self.encoder(images, ids_keep=sel.mask.ids_keep)  # [B, 1 + V, D], only the selected patches
        dec = self.decoder
        if isinstance(dec, CrossDecoder):
            return dec(dec.queries(ids_query), [latent] * len(dec.cross_blocks))
        # MAE decoder on [class; visible; queries] only: the unqueried hidden patches are left out entirely
        x = dec.embed(latent)
        pos = dec.pos_embed[0].to(x.dtype)
        v = x.shape[1] - 1
        visible = x[:, 1:] + pos[1:][sel.mask.ids_keep]
        queries = dec.mask_token.to(x.dtype) + pos[1:][ids_query]
        h = torch.cat([x[:, :1] + pos[:1], visible, queries], dim=1)
        return dec.pred(dec.norm(dec.blocks(h))[:, 1 + v:])

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["image"]
        sel = self.select(batch)
        pred = self.predict(images, sel)
        with torch.no_grad():
            target = self.target(images)
            target = torch.gather(target, 1, sel.ids_target.unsqueeze(-1).expand(-1, -1, target.shape[-1]))
        loss = (pred.float() - target.float()).pow(2).mean()
        n = self.grid.num_patches
        with torch.no_grad():
            z = self.standard_energy(images)
            enc_energy = (z * (~sel.mask.masked)).sum() / (~sel.mask.masked).sum()
            tgt_energy = (z * sel.targets).sum() / sel.targets.sum()
        dev = loss.device
        return {
            "loss": loss,
            "encoded_frac": torch.tensor(self.num_encoded / n, device=dev),
            "recon_frac": torch.tensor(self.num_targets / n, device=dev),
            "psts_stage": torch.tensor(float(self.psts_stage()[0]), device=dev),
            # mean standardised HOG energy of the encoded / reconstructed patches (0 = an average patch)
            "encoded_energy": enc_energy, "target_energy": tgt_energy,
        }

    @torch.no_grad()
    def reconstruct(self, batch: dict) -> Reconstruction:
        images = batch["image"]
        sel = self.select(batch)
        everywhere = torch.arange(self.grid.num_patches, device=images.device).expand(images.shape[0], -1)
        pred = self.target.to_pixels(self.predict(images, sel, everywhere).float(), images.float())
        hidden = self.grid.expand_mask(sel.mask.masked)
        return Reconstruction.from_mask(images, pred, hidden)
