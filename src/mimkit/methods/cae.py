"""CAE, Context Autoencoder (Chen et al., IJCV 2023; Atten4Vis/CAE `models/modeling_cae.py`).

The idea is to keep representation learning apart from the pretext completion. The encoder sees only the
visible patches. A cross-attention regressor predicts the latents of the masked patches from them. Those
predictions are aligned (MSE, weight 2) with what the same encoder gives when it is shown only the masked
patches. A decoder then maps the predicted latents to the reconstruction targets. The decoder sees only the
predictions (plus position embeddings) and never the visible tokens, so the completion has to go through the
latent space the encoder defines.

Slots: BlockMasking (BEiT blocks, exact count, 50% of N) -> VisionTransformer (visible tokens only) ->
CAERegressor (queries = mask tokens + pos; keys = [visible; queries] + pos; values without pos) ->
alignment target = encoder(masked patches only), no grad -> MaskedOnlyDecoder -> PixelTarget (norm-pix MSE;
stands in for the DALL-E tokens, which need an external tokenizer) or HOGTarget.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from mimkit.collapse import mean_pairwise_cosine
from mimkit.config import MethodSection, ModelConfig
from mimkit.eval.analysis import effective_rank
from mimkit.masking import BlockMasking, Mask
from mimkit.methods.base import Method, Reconstruction
from mimkit.models import VisionTransformer
from mimkit.models.cae_regressor import CAERegressor, MaskedOnlyDecoder
from mimkit.targets import HOGTarget, PixelTarget


@torch.no_grad()
def target_rank(targets: torch.Tensor, max_items: int = 1024) -> torch.Tensor:
    """Effective rank of the centred alignment targets [..., D] (at most `max_items` evenly spaced rows).

    target_sim alone cannot tell collapse from a shared offset. A small encoder trained briefly has patch latents
    with a large common component (pairwise cosine ~0.99, with or without the alignment). Centring removes the
    offset, and the rank then shows whether the latents still vary along many directions (collapse: -> 1)."""
    x = targets.detach().float().reshape(-1, targets.shape[-1])
    if x.shape[0] > max_items:
        x = x[torch.linspace(0, x.shape[0] - 1, max_items, device=x.device).long()]
    return torch.tensor(effective_rank(x.cpu()), device=targets.device)


class CAEConfig(MethodSection):
    name: Literal["cae"] = "cae"
    mask_ratio: float = Field(0.5, gt=0.0, lt=1.0,
                              description="BEiT block mask hiding exactly round(mask_ratio * N) patches "
                                          "(reference: 98 of 196)")
    block_min_area: float = Field(0.08, gt=0.0,
                                  description="smallest mask block: below 1 a fraction of N (16/196 ~= 0.08N), "
                                              "else a patch count")
    target: Literal["pixel", "hog"] = Field(
        "pixel", description="decoder target. pixel: norm-pix MSE (the card's stand-in for the DALL-E tokens); "
                             "hog: MaskFeat HOG MSE")
    norm_pix: bool = Field(True, description="per-patch normalised pixel targets (target=pixel)")
    hog_nbins: int = Field(9, ge=1, description="HOG orientation bins (target=hog)")
    hog_cells: int = Field(2, ge=1, description="HOG cells per patch side, cell = patch / hog_cells (target=hog)")
    align_weight: float = Field(2.0, ge=0.0, description="weight of the latent alignment MSE (reference 2; 0 "
                                                         "switches the alignment off, for the ablation)")
    regressor_depth: int = Field(4, ge=1, description="cross-attention regressor blocks")
    decoder_depth: int = Field(4, ge=1, description="masked-only decoder blocks")
    layer_scale: float = Field(0.1, gt=0.0, description="layer-scale init of regressor and decoder blocks "
                                                         "(reference 0.1; 1e-5 for ViT-L)")


class CAE(Method):
    config_class = CAEConfig

    def __init__(self, encoder: VisionTransformer, cfg: CAEConfig | None = None):
        super().__init__()
        cfg = cfg or CAEConfig()
        self.cfg = cfg
        self.encoder = encoder
        self.grid = encoder.grid
        dim, heads = encoder.embed_dim, encoder.num_heads
        # regressor and decoder run at the encoder's width (the reference's decoder_embed_dim = embed_dim),
        # so the predictions and the alignment targets live in the same space without a projection
        self.regressor = CAERegressor(self.grid.shape, dim, cfg.regressor_depth, heads, encoder.mlp_ratio,
                                      cfg.layer_scale)
        if cfg.target == "pixel":
            self.target = PixelTarget(self.grid, norm=cfg.norm_pix)
            out_dim = self.grid.patch_dim
        else:
            ph, pw = self.grid.patch_size
            cell = min(ph, pw) // cfg.hog_cells
            if cell < 1 or ph % cell or pw % cell:
                raise ValueError(f"hog_cells={cfg.hog_cells} does not split the patch {self.grid.patch_size} "
                                 "into square cells")
            self.target = HOGTarget(self.grid, cell=cell, nbins=cfg.hog_nbins)
            out_dim = self.target.dim
        self.decoder = MaskedOnlyDecoder(dim, out_dim, cfg.decoder_depth, heads, encoder.mlp_ratio, cfg.layer_scale)
        self.masking = BlockMasking(cfg.mask_ratio, min_area=cfg.block_min_area, exact=True)

    @classmethod
    def from_config(cls, method: CAEConfig, model: ModelConfig, img_size, in_chans: int, data=None) -> "CAE":
        return cls(VisionTransformer.from_config(model, img_size, in_chans), method)

    def make_mask(self, batch: dict) -> Mask:
        return self.masking(batch["seed"], self.grid.shape)

    @staticmethod
    def masked_ids(mask: Mask) -> torch.Tensor:
        """Long[B, M]: the hidden patches in raster order (BlockMasking sorts visible first, then hidden)."""
        return torch.argsort(mask.ids_restore, dim=1)[:, mask.ids_keep.shape[1]:]

    @torch.no_grad()
    def alignment_target(self, images: torch.Tensor, ids_masked: torch.Tensor) -> torch.Tensor:
        """Z̄_m [B, M, D]: the encoder run on the masked patches alone (class token dropped from its output).

        The reference keeps a second encoder whose weights are copied from the online one at every step
        (momentum 0: its `.data` is the encoder's own after the first copy), and runs it under no_grad. That is the
        online encoder's current weights without a gradient, so this calls `self.encoder` under no_grad. The
        target stops gradients; the encoder is pulled toward it only through the visible-patch path."""
        return self.encoder(images, ids_keep=ids_masked)[:, 1:]

    def predict(self, images: torch.Tensor, mask: Mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(predicted latents Ẑ_m [B, M, D], decoder predictions [B, M, out], ids_masked Long[B, M])."""
        ids_masked = self.masked_ids(mask)
        visible = self.encoder(images, ids_keep=mask.ids_keep)[:, 1:]  # the class token is not a key (reference)
        latents = self.regressor(visible, mask.ids_keep, ids_masked)
        return latents, self.decoder(latents, self.regressor.positions(ids_masked)), ids_masked

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["image"]
        mask = self.make_mask(batch)
        latents, pred, ids_masked = self.predict(images, mask)
        # computed even with align_weight = 0, so the ablation costs the same and logs the same diagnostics
        aligned = self.alignment_target(images, ids_masked)
        with torch.no_grad():
            target = self.target(images)
        target = torch.gather(target, 1, ids_masked.unsqueeze(-1).expand(-1, -1, target.shape[-1]))
        rec = (pred.float() - target.float()).pow(2).mean()  # masked patches only: pred holds nothing else
        align = (latents.float() - aligned.float()).pow(2).mean()
        return {
            "loss": rec + self.cfg.align_weight * align,
            "rec_loss": rec.detach(),
            "align_loss": align.detach(),
            "target_sim": mean_pairwise_cosine(aligned),
            "pred_sim": mean_pairwise_cosine(latents),
            "target_rank": target_rank(aligned),
        }

    @torch.no_grad()
    def reconstruct(self, batch: dict) -> Reconstruction | None:
        """Pixel pictures when the target is pixels; the visible patches have no prediction and stay blank
        (zero, the dataset mean) in the prediction column. None for HOG targets (the CLI then draws masks)."""
        if not isinstance(self.target, PixelTarget):
            return None
        images = batch["image"]
        mask = self.make_mask(batch)
        _, pred, ids_masked = self.predict(images, mask)
        b, n = mask.masked.shape
        full = torch.zeros(b, n, pred.shape[-1], dtype=torch.float32, device=images.device)
        full.scatter_(1, ids_masked.unsqueeze(-1).expand(-1, -1, pred.shape[-1]), pred.float())
        hidden = self.grid.expand_mask(mask.masked)
        pixels = self.target.to_pixels(full, images.float())
        return Reconstruction.from_mask(images, torch.where(hidden, pixels, torch.zeros_like(pixels)), hidden)
