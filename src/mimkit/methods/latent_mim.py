"""Latent MIM (Wei et al., ECCV 2024; yibingwei-1/LatentMIM `models_lmim.py`): predict the latents of hidden patches.

An EMA target encoder (plus its projector) embeds the target patches, seeing only those patches, so a target
cannot be copied from the visible context. The online encoder sees a small visible set (~10% of the patches);
a cross-attention decoder turns queries at the target positions (mask token + a position-weighted average of
the visible tokens + position embedding) into predictions, and an intra-image patch InfoNCE asks each prediction
to find its own target among the image's other targets. A regulariser pulls the average within-image cosine of
the predictions and of the visible tokens to a target that decays 0.75 -> 0.25. The "patch gap" takes every
patch as a jittered window of a larger cell, so neighbouring patches share no border pixels.

Slots: gapped patchify -> seeded split (visible | targets) -> VisionTransformer + MLP projector on the visible
patches -> CrossDecoder (position-weighted queries) ; EMATeacher(encoder + projector) on the target patches ->
patch InfoNCE (or normalised L2, the ablation) + similarity regulariser.

The patch gap and evaluation. The reference trains on 280 px crops (14 cells of 16 + 4 px) and evaluates on
224 px images (14 plain 16 px patches), so its patches cover 16/20 of a cell in training. Here the encoder is a
plain VisionTransformer of `data.img_size` (evaluation and export call `method.encoder` on normal images), so the
gap lives only in this method's forward: the batch image (grid * p px) is resized (bilinear) to
grid * (p + gap) px, one p x p window is cut from each (p + gap) cell at an offset drawn from the image's seed,
and the windows are put back side by side into a grid * p image that the encoder embeds as usual. Same
geometry as the reference, no change to the encoder, and gap = 0 is the plain image (and patchify) exactly.
Offsets are drawn in [0, gap] inclusive (the reference's randint(0, gap) never reaches the last one, which
at the small-image gap of 1 px would mean no jitter at all).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from mimkit import rng
from mimkit.collapse import mean_pairwise_cosine
from mimkit.config import MethodSection, ModelConfig
from mimkit.losses.latent import (normalized_l2, patch_infonce, patch_retrieval_accuracy, similarity_regulariser,
                                  similarity_target, within_image_cosine)
from mimkit.masking import Mask
from mimkit.methods.base import EMATeacherMixin, Method
from mimkit.models import VisionTransformer
from mimkit.models.cross_decoder import CrossDecoder
from mimkit.models.decoder import DECODER_PRESETS
from mimkit.models.ema import EMASchedule, schedule_field
from mimkit.models.patch import to_2tuple
from mimkit.models.vit import init_mae_weights

_SPLIT_STREAM = 41  # which patches are visible
_GAP_STREAM = 42    # window offsets inside the gap cells


class LatentMIMConfig(MethodSection):
    name: Literal["latent_mim"] = "latent_mim"
    vis_fraction: float = Field(
        0.1, gt=0.0, lt=1.0,
        description="visible patches as a share of N, rounded, at least 1 and leaving at least 2 targets "
                    "(reference num_vis = 20 of 196; the ablation is 49 = 0.25)")
    patch_gap: int = Field(1, ge=0, description="pixels between patch cells: cells of patch_size + gap px with a "
                                                "random patch_size window each (reference 4 at p = 16, i.e. p/4)")
    loss: Literal["infonce", "l2"] = Field("infonce", description="intra-image patch InfoNCE, or the normalised-L2 "
                                                                  "ablation")
    tau: float = Field(0.2, gt=0.0, description="InfoNCE temperature")
    sim_weight: float = Field(0.1, ge=0.0, description="weight of the similarity regulariser (0 turns it off)")
    sim_start: float = Field(0.75, ge=-1.0, le=1.0, description="regulariser target s_t at the start")
    sim_end: float = Field(0.25, ge=-1.0, le=1.0, description="s_t at the end (cosine decay)")
    teacher: EMASchedule = schedule_field("cosine", 0.99, 1.0)
    proj_hidden: int = Field(1024, ge=1, description="projector hidden width (reference 4096 for ViT-B)")
    proj_depth: int = Field(3, ge=1, description="projector Linear layers (reference 3)")


def projector(dim: int, hidden: int, depth: int) -> nn.Sequential:
    """LatentMIM's MLP head: bias-free Linear layers, LayerNorm + GELU between them, LayerNorm on the output."""
    layers: list[nn.Module] = []
    for i in range(depth):
        d_in, d_out = dim if i == 0 else hidden, dim if i == depth - 1 else hidden
        layers += [nn.Linear(d_in, d_out, bias=False), nn.LayerNorm(d_out, eps=1e-6)]
        if i < depth - 1:
            layers.append(nn.GELU())
    head = nn.Sequential(*layers)
    init_mae_weights(head)
    return head


def window_offsets(seeds: torch.Tensor, grid_shape: tuple[int, int], gap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and cell, (row, col) offsets of the window inside its cell, Long[B, gh, gw] each, uniform in
    [0, gap], from the images' seeds."""
    gh, gw = grid_shape
    u = rng.uniform(seeds, 2 * gh * gw, stream=_GAP_STREAM)
    off = (u * (gap + 1)).long().clamp_max(gap).view(-1, 2, gh, gw)
    return off[:, 0], off[:, 1]


def gapped_windows(cells: torch.Tensor, patch_size, gap: int, seeds: torch.Tensor) -> torch.Tensor:
    """Images laid out as a grid of (p + gap)-px cells, [B, C, gh*(ph+gap), gw*(pw+gap)], -> the grid * p image
    [B, C, gh*ph, gw*pw] whose patch (r, c) is the p x p window of cell (r, c) at the seed's offset."""
    ph, pw = to_2tuple(patch_size)
    b, c, h, w = cells.shape
    if h % (ph + gap) or w % (pw + gap):
        raise ValueError(f"image {h}x{w} is not a grid of ({ph}+{gap})x({pw}+{gap}) cells")
    gh, gw = h // (ph + gap), w // (pw + gap)
    oy, ox = window_offsets(seeds.to(cells.device), (gh, gw), gap)
    # source row of output row r*ph + i: r*(ph+gap) + oy[r, c] + i, which depends on the column's cell c too
    rows = (torch.arange(gh, device=cells.device) * (ph + gap)).view(1, gh, 1, 1) + oy.unsqueeze(-1) \
        + torch.arange(ph, device=cells.device)                                    # [B, gh, gw, ph]
    cols = (torch.arange(gw, device=cells.device) * (pw + gap)).view(1, 1, gw, 1) + ox.unsqueeze(-1) \
        + torch.arange(pw, device=cells.device)                                    # [B, gh, gw, pw]
    flat = rows.unsqueeze(-1) * w + cols.unsqueeze(-2)                             # [B, gh, gw, ph, pw]
    flat = flat.permute(0, 1, 3, 2, 4).reshape(b, 1, gh * ph * gw * pw)            # raster order of the output
    out = cells.reshape(b, c, h * w).gather(2, flat.expand(b, c, -1))
    return out.view(b, c, gh * ph, gw * pw)


def gapped_images(images: torch.Tensor, patch_size, gap: int, seeds: torch.Tensor) -> torch.Tensor:
    """The training input: `images` [B, C, gh*ph, gw*pw] resized to cells of p + gap px, then one jittered
    window per cell (`gapped_windows`). gap = 0 returns the images themselves."""
    if gap == 0:
        return images
    ph, pw = to_2tuple(patch_size)
    gh, gw = images.shape[-2] // ph, images.shape[-1] // pw
    cells = F.interpolate(images, size=(gh * (ph + gap), gw * (pw + gap)), mode="bilinear", align_corners=False)
    return gapped_windows(cells, (ph, pw), gap, seeds)


def visible_count(fraction: float, num_patches: int) -> int:
    if num_patches < 3:
        raise ValueError(f"LatentMIM needs at least 3 patches (1 visible, 2 targets), the grid has {num_patches}")
    return min(max(1, round(fraction * num_patches)), num_patches - 2)


class LatentMIM(EMATeacherMixin, Method):
    config_class = LatentMIMConfig

    def __init__(self, encoder: VisionTransformer, cfg: LatentMIMConfig, decoder_dim: int = 128,
                 decoder_depth: int = 2, decoder_heads: int = 4):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.grid = encoder.grid
        d = encoder.embed_dim
        self.num_visible = visible_count(cfg.vis_fraction, self.grid.num_patches)
        self.projector = projector(d, cfg.proj_hidden, cfg.proj_depth)
        self.decoder_embed = nn.Linear(d, decoder_dim)
        init_mae_weights(self.decoder_embed)
        # every block: self-attention among the queries, cross-attention to the (normalised) visible tokens
        self.decoder = CrossDecoder(self.grid.shape, [decoder_dim] * decoder_depth, d, dim=decoder_dim,
                                    num_heads=decoder_heads, cross_self_attn=True, memory_norm=True)
        with torch.no_grad():
            self.decoder.mask_token.zero_()  # the reference starts the mask token at zero
        self.init_teacher(cfg.teacher)

    @classmethod
    def from_config(cls, method: LatentMIMConfig, model: ModelConfig, img_size, in_chans: int, data=None) -> "LatentMIM":
        encoder = VisionTransformer.from_config(model, img_size, in_chans)
        spec = DECODER_PRESETS[model.decoder]
        return cls(encoder, method, decoder_dim=model.decoder_dim or spec.dim,
                   decoder_depth=model.decoder_depth or spec.depth, decoder_heads=model.decoder_heads or spec.num_heads)

    def student(self) -> dict[str, nn.Module]:
        """What the target encoder is an EMA of: the online encoder and its projector."""
        return {"encoder": self.encoder, "projector": self.projector}

    def split(self, seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(visible ids Long[B, V], target ids Long[B, N - V]) from a seeded random permutation per image."""
        n = self.grid.num_patches
        order = torch.argsort(rng.uniform(seeds, n, stream=_SPLIT_STREAM), dim=1)
        return order[:, : self.num_visible], order[:, self.num_visible:]

    def make_mask(self, batch: dict) -> Mask:
        """The split as a Mask: True at the target patches (hidden from the online encoder)."""
        visible, targets = self.split(batch["seed"])
        order = torch.cat([visible, targets], dim=1)
        masked = torch.ones(order.shape, dtype=torch.bool, device=order.device).scatter(1, visible, False)
        return Mask(masked=masked, ids_keep=visible, ids_restore=torch.argsort(order, dim=1))

    def training_input(self, batch: dict) -> torch.Tensor:
        """The batch image with the patch gap applied (see the module docstring)."""
        return gapped_images(batch["image"], self.grid.patch_size, self.cfg.patch_gap, batch["seed"])

    @torch.no_grad()
    def targets(self, images: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
        """The EMA encoder + projector on the target patches alone (its class token and those patches, no
        visible patch): [B, M, D] in the order of `target_ids`."""
        t = self.teacher.module
        return t["projector"](t["encoder"](images, ids_keep=target_ids))[:, 1:]

    def predict(self, images: torch.Tensor, visible_ids: torch.Tensor, target_ids: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(predictions at `target_ids` [B, M, D], projected online tokens of the visible patches [B, 1 + V, D])."""
        online = self.projector(self.encoder(images, ids_keep=visible_ids))
        memory = self.decoder_embed(online)
        table = self.decoder.pos_embed[0]  # [1 + N, Dd], row 0 (class token) zero
        queries = self.decoder.position_weighted_queries(target_ids, visible_ids, memory[:, 1:])
        memory = memory + torch.cat([table[:1].expand(len(memory), 1, -1), table[1:][visible_ids]], dim=1)
        pred = self.decoder(queries, [memory] * len(self.decoder.cross_blocks))
        return pred, online

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        images = self.training_input(batch)
        visible_ids, target_ids = self.split(batch["seed"].to(images.device))
        target = self.targets(images, target_ids)
        pred, online = self.predict(images, visible_ids, target_ids)
        if self.cfg.loss == "infonce":
            main = patch_infonce(pred, target, self.cfg.tau)
        else:
            main = normalized_l2(pred, target)
        s_t = similarity_target(self.progress, self.cfg.sim_start, self.cfg.sim_end)
        sets = [pred] + ([online[:, 1:]] if self.num_visible >= 2 else [])
        reg = similarity_regulariser(sets, s_t, self.cfg.sim_weight) if self.cfg.sim_weight > 0 else main.new_zeros(())
        out = {
            "loss": main + reg,
            "pred_loss": main.detach(),
            "sim_reg": reg.detach(),
            "patch_acc": patch_retrieval_accuracy(pred.detach(), target),
            "target_sim": mean_pairwise_cosine(target),
            "pred_sim": within_image_cosine(pred.detach()),
            "sim_target": main.new_tensor(s_t),
        }
        if self.num_visible >= 2:
            out["vis_sim"] = within_image_cosine(online[:, 1:].detach())
        return out
