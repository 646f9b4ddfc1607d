"""CCViT, centroid-centered modeling (Yan et al., 2023; Cakeyan/CCViT_Public `engine_for_pretraining.py`).

BEiT v2-style masked image modeling whose tokenizer is no network: k-means centroids of raw pixel patches,
fitted once before training (`prepare`). Each patch's code is its nearest centroid in the ORIGINAL image. The
encoder sees a BEiT block mask (mask token) and, besides, a few more random non-masked patches replaced at
pixel level by their own centroid's pixels, so those look plausible yet lose their detail. Both kinds are
predicted: R = masked | replaced.

Slots: BlockMasking (BEiT v2: exactly round(0.38 N) patches) + centroid replacement (round(replace_ratio * N)
of the non-masked patches, per image from its seed) -> VisionTransformer.embed_masked -> last layer, norm,
lm_head -> CE on the k-means codes at R (KMeansTokenizer, in the state_dict); and the BEiT v2 patch-aggregation
branch (class token after the last block + patch tokens after an early block -> head blocks -> own norm and
Linear to pixels; shared_lm_head False) -> MSE on norm-pix targets (PixelTarget) at R. L = L_code + w L_pixel.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from mimkit import rng
from mimkit.config import MethodSection, ModelConfig
from mimkit.masking import BlockMasking, Mask
from mimkit.methods.base import Method, Reconstruction
from mimkit.models import VisionTransformer
from mimkit.models.aggregation_head import PatchAggregationHead, early_layer_index
from mimkit.targets.kmeans import KMeansTokenizer
from mimkit.targets.pixel import PixelTarget

REPLACE_STREAM = 0x43435654  # "CCVT": per-image draws of the replaced patches (the block mask uses stream 3)


class CCViTConfig(MethodSection):
    name: Literal["ccvit"] = "ccvit"
    mask_ratio: float = Field(0.38, gt=0.0, lt=1.0, description="BEiT block mask hiding exactly round(mask_ratio "
                              "* N) patches behind the mask token (reference: 75 of 196)")
    block_min_area: float = Field(0.08, gt=0.0, description="smallest mask block: below 1 a fraction of N "
                                  "(16/196 ~= 0.08N), else a patch count")
    replace_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="round(replace_ratio * N) further non-masked "
                                 "patches per image replaced by their centroid's pixels (reference: 20 of 196; "
                                 "0 switches replacement off, for the ablation)")
    num_codes: int = Field(1024, ge=2, description="k-means centroids = vocabulary of the code head "
                           "(reference 8192 for 16x16x3 patches)")
    kmeans_images: int = Field(500, ge=1, description="training images the tokenizer is fitted on before the run "
                               "(reference: 50 per class, ImageNet; 500 = 50 per class of a 10-class set)")
    kmeans_iters: int = Field(20, ge=1, description="Lloyd iterations of the k-means fit (reference 20)")
    early_layers: int | None = Field(None, ge=1, description="the aggregation branch reads the patch tokens after "
                                     "this many blocks (reference 9 of 12); None = three quarters of the depth")
    head_layers: int = Field(2, ge=1, description="blocks of the aggregation branch (reference 2)")
    pixel_weight: float = Field(1.0, ge=0.0, description="weight of the aggregation branch's norm-pix MSE "
                                "(reference use_dual_loss: 1)")


class CCViT(Method):
    config_class = CCViTConfig

    def __init__(self, encoder: VisionTransformer, cfg: CCViTConfig | None = None):
        super().__init__()
        cfg = cfg or CCViTConfig()
        self.cfg = cfg
        self.encoder = encoder
        self.grid = encoder.grid
        dim = encoder.embed_dim
        self.early = early_layer_index(cfg.early_layers, encoder.depth)
        self.masking = BlockMasking(cfg.mask_ratio, cfg.block_min_area)
        n = self.grid.num_patches
        self.num_replaced = min(math.floor(cfg.replace_ratio * n + 0.5), n - self.masking.num_masked(n))
        self.tokenizer = KMeansTokenizer(self.grid, cfg.num_codes)
        self.pixel_target = PixelTarget(self.grid, norm=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.lm_head = nn.Linear(dim, cfg.num_codes)
        self.aggregation = PatchAggregationHead.for_encoder(encoder, cfg.head_layers)
        # shared_lm_head False: the branch has its own norm and a Linear to the patch's pixels
        self.pixel_norm = nn.LayerNorm(dim, eps=1e-6)
        self.pixel_head = nn.Linear(dim, self.grid.patch_dim)
        for p in (self.mask_token, self.lm_head.weight, self.pixel_head.weight):
            nn.init.trunc_normal_(p, std=0.02)  # BEiT's init of the mask token and the heads
        nn.init.zeros_(self.lm_head.bias)
        nn.init.zeros_(self.pixel_head.bias)

    @classmethod
    def from_config(cls, method: CCViTConfig, model: ModelConfig, img_size, in_chans: int, data=None) -> "CCViT":
        return cls(VisionTransformer.from_config(model, img_size, in_chans), method)

    def prepare(self, dataset, seed: int) -> None:
        """Fit the k-means tokenizer on `kmeans_images` training images (a fresh run only: a resumed run loads
        the centroids from its checkpoint)."""
        self.tokenizer.fit_dataset(dataset, self.cfg.kmeans_images, seed, self.cfg.kmeans_iters)

    # ---------------------------------------------------------------- corruption

    def make_mask(self, batch: dict) -> Mask:
        """The BEiT block mask (mask-token patches) alone."""
        return self.masking(batch["seed"], self.grid.shape)

    def replaced_patches(self, seeds: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """Bool[B, N]: `num_replaced` patches per image, uniform among those `masked` leaves visible."""
        replaced = torch.zeros_like(masked)
        if self.num_replaced == 0:
            return replaced
        noise = rng.uniform(seeds, self.grid.num_patches, stream=REPLACE_STREAM).to(masked.device)
        noise = noise.masked_fill(masked, 2.0)  # above every draw in [0, 1): masked patches are never picked
        return replaced.scatter_(1, noise.argsort(dim=1)[:, : self.num_replaced], True)

    def corrupt(self, images: torch.Tensor, codes: torch.Tensor, replaced: torch.Tensor) -> torch.Tensor:
        """`images` with the `replaced` patches set to the pixels of their own code's centroid.

        The centroids live in the images' normalised space, so this equals the reference's replacement before
        normalisation (a per-channel affine map)."""
        patches = self.grid.patchify(images)
        centroids = self.tokenizer.centroid_patches(codes).to(patches.dtype)
        return self.grid.unpatchify(torch.where(replaced.unsqueeze(-1), centroids, patches))

    # ---------------------------------------------------------------- model

    def predict(self, corrupted: torch.Tensor, masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(last layer's normed patch tokens, aggregation branch's normed patch tokens), both [B, N, D]."""
        tokens = self.encoder.embed_masked(corrupted, masked, self.mask_token)
        out, taps = self.encoder.run_blocks(tokens, taps=(self.early, -1))
        branch = self.aggregation(taps[-1][:, :1], taps[self.early][:, 1:])
        return out[:, 1:], self.pixel_norm(branch[:, 1:])

    def losses(self, last: torch.Tensor, branch: torch.Tensor, codes: torch.Tensor, norm_pix: torch.Tensor,
               where: torch.Tensor) -> dict[str, torch.Tensor]:
        """Code CE on the last layer and norm-pix MSE on the branch, both over the patches `where` (R) only:
        the heads run on those rows alone, so nothing else reaches the loss or its gradient."""
        logits = self.lm_head(last[where]).float()          # [|R|, K]
        labels = codes[where]
        l_code = F.cross_entropy(logits, labels)
        l_pixel = F.mse_loss(self.pixel_head(branch[where]).float(), norm_pix[where].float())
        return {
            "loss": l_code + self.cfg.pixel_weight * l_pixel,
            "l_code": l_code.detach(),
            "l_pixel": l_pixel.detach(),
            "mlm_acc": (logits.detach().argmax(-1) == labels).float().mean(),
        }

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["image"]
        masked = self.make_mask(batch).masked
        replaced = self.replaced_patches(batch["seed"], masked)
        codes = self.tokenizer.codes(images)  # of the ORIGINAL image, as the targets
        last, branch = self.predict(self.corrupt(images, codes, replaced), masked)
        out = self.losses(last, branch, codes, self.pixel_target(images), masked | replaced)
        # how much of the codebook this batch's targets use (a tokenizer with dead codes wastes vocabulary)
        out["code_usage"] = torch.tensor(self.tokenizer.usage(codes), device=images.device)
        return out

    @torch.no_grad()
    def reconstruct(self, batch: dict) -> Reconstruction:
        """The branch's norm-pix predictions in pixels (each patch's own mean/std) pasted at R; the masked
        column is the encoder's input: centroid pixels at replaced patches, blanks at mask-token ones."""
        images = batch["image"]
        masked = self.make_mask(batch).masked
        replaced = self.replaced_patches(batch["seed"], masked)
        corrupted = self.corrupt(images, self.tokenizer.codes(images), replaced)
        _, branch = self.predict(corrupted, masked)
        pred = self.pixel_target.to_pixels(self.pixel_head(branch).float(), images.float())
        return Reconstruction.from_mask(images, pred, self.grid.expand_mask(masked | replaced),
                                        masked=corrupted.masked_fill(self.grid.expand_mask(masked), 0.0))
