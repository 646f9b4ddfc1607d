"""Supervised training + MIM ("Improve Supervised Representation Learning with Masked Image Modeling", Google
2023, card S8; no code released, details unverified): one run, one encoder, two losses,

    L = CE(cls_head(enc(x)), y) + w * L_MIM(dec(enc(mask(x))), target)

The MIM decoder is an auxiliary head used only in training; the encoder is what evaluation keeps.

Slots: labels from batch["label"] -> VisionTransformer on the full image -> class token -> Linear classifier ->
cross-entropy; RandomMasking -> the same encoder on the visible patches (MAE-style) -> MAEDecoder ->
  target=pixel  norm-pix patches (PixelTarget), MSE on hidden patches (MAE's loss), or
  target=codes  k-means codes of the patches (targets.kmeans.KMeansTokenizer, fitted in `prepare` on the
                training split and kept in the state_dict), cross-entropy on hidden patches. The paper predicts
                MaskGIT VQ tokens; k-means codes (CCViT's tokenizer) stand in for a trained VQ tokenizer.
Which pass classifies is unverified in the paper: the full (unmasked) image by default, a second encoder pass;
classify_masked=true reads the class token of the masked pass instead (one encoder pass per step, the classifier
then sees only 1 - mask_ratio of the patches in training but all of them at test time).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from mimkit.config import ConfigError, MethodSection, ModelConfig
from mimkit.losses import masked_mse
from mimkit.masking import Mask, RandomMasking, mask_from_noise
from mimkit.methods.base import Method, Reconstruction
from mimkit.models import MAEDecoder, VisionTransformer
from mimkit.targets import PixelTarget
from mimkit.targets.kmeans import KMeansTokenizer


class SupMIMConfig(MethodSection):
    name: Literal["sup_mim"] = "sup_mim"
    num_classes: int = Field(..., ge=2, description="classes of the labelled training data (Fashion-MNIST: 10); "
                                                    "batch labels must lie in [0, num_classes)")
    mim_weight: float = Field(1.0, ge=0.0, description="w, weight of the MIM loss (0: plain supervised training)")
    target: Literal["pixel", "codes"] = Field("pixel", description="pixel: MAE's norm-pix MSE; codes: CE on the "
                                                                   "k-means code ids of the hidden patches")
    classify_masked: bool = Field(False, description="classify from the masked pass's class token instead of a "
                                                     "full-image pass (the paper's choice is unverified)")
    mask_ratio: float = Field(0.75, gt=0.0, lt=1.0, description="share of patches hidden from the MIM pass (MAE)")
    norm_pix: bool = Field(True, description="target=pixel: per-patch normalised pixels (MAE's norm_pix_loss)")
    num_codes: int = Field(512, ge=2, description="target=codes: k-means centroids = the decoder's vocabulary")
    kmeans_images: int = Field(1000, ge=1, description="target=codes: training images the tokenizer is fitted on")
    kmeans_iters: int = Field(20, ge=1, description="target=codes: Lloyd iterations of the k-means fit")


def check_labels(labels: torch.Tensor | None, num_classes: int, source: str | None) -> torch.Tensor:
    """The batch's labels, Long[B] (-1 = unlabelled, ignored by the loss), or a ConfigError (a ValueError the CLI
    prints as a one-line error) that names the setting to change."""
    where = f"data.source={source}" if source else "the data"
    if labels is None or labels.numel() == 0 or bool((labels < 0).all()):
        raise ConfigError(f"sup_mim trains a classifier and needs labels, but {where} gives none (every label is -1): "
                         f"use a labelled source (fashion_mnist, imagefolder, torchvision, shards with .cls members, "
                         f"hf with a label column)")
    top = int(labels.max())
    if top >= num_classes:
        raise ConfigError(f"{where} has label {top}, but method.num_classes={num_classes}: set method.num_classes "
                         f"to the number of classes (labels 0..{top} need at least {top + 1})")
    return labels


class SupMIM(Method):
    config_class = SupMIMConfig

    def __init__(self, encoder: VisionTransformer, decoder: MAEDecoder, cfg: SupMIMConfig,
                 data_source: str | None = None):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.decoder = decoder
        self.grid = encoder.grid
        self.data_source = data_source
        self.masking = RandomMasking(cfg.mask_ratio)
        self.classifier = nn.Linear(encoder.embed_dim, cfg.num_classes)
        nn.init.trunc_normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)
        self.pixel_target = PixelTarget(self.grid, norm=cfg.norm_pix)
        self.tokenizer = KMeansTokenizer(self.grid, cfg.num_codes) if cfg.target == "codes" else None

    @classmethod
    def from_config(cls, method: SupMIMConfig, model: ModelConfig, img_size, in_chans: int, data=None) -> "SupMIM":
        encoder = VisionTransformer.from_config(model, img_size, in_chans)
        out = method.num_codes if method.target == "codes" else encoder.grid.patch_dim
        return cls(encoder, MAEDecoder.from_config(model, encoder, out_dim=out), method,
                   getattr(data, "source", None))

    def prepare(self, dataset, seed: int) -> None:
        """Stop before step 0 if the training split's first items carry no labels (sources are labelled or not as
        a whole); target=codes: fit the k-means tokenizer on `kmeans_images` training images (fresh runs only: a
        resumed run loads the centroids from its checkpoint)."""
        first = [int(dataset[i].get("label", -1)) for i in range(min(8, len(dataset)))]
        check_labels(torch.tensor(first), self.cfg.num_classes, self.data_source)
        if self.tokenizer is not None:
            self.tokenizer.fit_dataset(dataset, self.cfg.kmeans_images, seed, self.cfg.kmeans_iters)

    def make_mask(self, batch: dict) -> Mask:
        if "mask_noise" in batch:
            return mask_from_noise(batch["mask_noise"], self.masking.ratio)
        return self.masking(batch["seed"], self.grid.num_patches)

    def mim_loss(self, pred: torch.Tensor, images: torch.Tensor, mask: Mask) -> tuple[torch.Tensor, dict]:
        """The MIM term over the hidden patches only, and its diagnostics. pred [B, N, out] from the decoder."""
        if self.tokenizer is None:
            with torch.no_grad():
                target = self.pixel_target(images)
            return masked_mse(pred, target, mask.masked)[0], {}
        codes = self.tokenizer.codes(images)
        logits = pred[mask.masked].float()  # [hidden patches, K]: visible rows never reach the loss
        labels = codes[mask.masked]
        loss = F.cross_entropy(logits, labels)
        return loss, {"mim_acc": (logits.detach().argmax(-1) == labels).float().mean(),
                      "code_usage": torch.tensor(self.tokenizer.usage(codes), device=pred.device)}

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        c = self.cfg
        images = batch["image"]
        labels = check_labels(batch.get("label"), c.num_classes, self.data_source).to(images.device)
        mask = self.make_mask(batch)
        latent = self.encoder(images, ids_keep=mask.ids_keep.to(images.device))
        mim, extra = self.mim_loss(self.decoder(latent, mask.ids_restore.to(images.device)), images, mask)
        features = latent[:, 0] if c.classify_masked else self.encoder(images)[:, 0]
        logits = self.classifier(features).float()
        ce = F.cross_entropy(logits, labels, ignore_index=-1)
        labelled = labels >= 0
        acc = (logits.detach().argmax(-1) == labels)[labelled].float().mean()
        return {"loss": ce + c.mim_weight * mim, "ce_loss": ce.detach(), "mim_loss": mim.detach(),
                "train_acc": acc, **extra}

    @torch.no_grad()
    def reconstruct(self, batch: dict) -> Reconstruction:
        """Hidden patches predicted: pixels (target=pixel), or the centroid of each patch's predicted code."""
        images = batch["image"]
        mask = self.make_mask(batch)
        pred = self.decoder(self.encoder(images, ids_keep=mask.ids_keep), mask.ids_restore).float()
        if self.tokenizer is None:
            pixels = self.pixel_target.to_pixels(pred, images.float())
        else:
            pixels = self.grid.unpatchify(self.tokenizer.centroid_patches(pred.argmax(-1)).float())
        return Reconstruction.from_mask(images, pixels, self.grid.expand_mask(mask.masked))
