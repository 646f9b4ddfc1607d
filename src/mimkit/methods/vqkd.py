"""VQ-KD, BEiT v2's tokenizer (Peng et al., 2022; card C4 stage 1): a ViT whose quantised patch codes must be
enough for a small decoder to reproduce a frozen teacher's patch features.

    z   = task(encoder(x)[patches])            Linear-Tanh-Linear to `code_dim` (32)
    z_q = quantizer(z)                         unit codebook, nearest by cosine, EMA-updated (targets.vq)
    rec = task'(decoder(z_q))                  a shallow ViT at the encoder's width, Linear-Tanh-Linear to D_t
    L   = mean(1 - cos(rec, teacher patch features)) + beta * MSE(sg(z_q), z)

Trained like any method (`mimkit pretrain method=vqkd method.teacher.source=RUN`, or `mimkit tokenizer fit`,
which also reports the codebook usage on the validation split); its `encoder` is the tokenizer's ViT, so kNN and
the other protocols run on it. BEiT v2 (methods/beit_v2.py, `method.tokenizer=<this run>`) predicts its codes.

Small-scale port: K = 1024 codes (card: 8192) - Fashion-MNIST at patch 4 gives 49 patches per image, so a
256-image batch has 12.5k vectors for the first-batch k-means, and 1024 codes still leave ~12 vectors per code
per batch for the EMA (with 8192 most codes would be chosen by 0-1 vectors per batch and drift on noise). The
teacher's features are standardised per dimension over the batch's tokens (`teacher.norm` defaults to
`standardize` here): a small MAE's patch features share one direction (mean pairwise cosine ~0.99, per-token
LayerNorm keeps it), so the cosine target is nearly constant and the codebook collapses onto a few codes.
Dead-code restart (`dead_after`) is an option BEiT v2 does not have: off by default, on in the recipe, since a
short small-scale run's encoder drifts away from the k-means codes (128 codes, 16 steps: 85% used with
dead_after=2, 19% without).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator

from mimkit.collapse import mean_pairwise_cosine
from mimkit.config import MethodSection, ModelConfig
from mimkit.methods.base import Method
from mimkit.models import VisionTransformer
from mimkit.models.vit import init_mae_weights
from mimkit.targets.teacher import FrozenTeacher, TeacherConfig
from mimkit.targets.vq import EMACosineQuantizer


class VQKDConfig(MethodSection):
    name: Literal["vqkd"] = "vqkd"
    teacher: TeacherConfig
    num_codes: int = Field(1024, ge=2, description="codebook size K (BEiT v2: 8192; 1024 at small scale)")
    code_dim: int = Field(32, ge=1, description="width of the codes (BEiT v2: 32)")
    decay: float = Field(0.99, ge=0.0, lt=1.0, description="EMA decay of the codebook")
    beta: float = Field(1.0, ge=0.0, description="weight of the commitment loss MSE(sg(z_q), z)")
    kmeans_iters: int = Field(10, ge=0, description="cosine k-means iterations initialising the codebook on the "
                                                    "first training batch")
    decoder_depth: int | None = Field(None, ge=1, description="blocks of the decoder ViT (encoder width); None: "
                                                              "model.decoder_depth when set, else 3 (BEiT v2)")
    usage_window: int = Field(20, ge=1, description="training batches the logged `code_usage` counts codes over")
    dead_after: int | None = Field(None, ge=1, description="not in BEiT v2: re-seed a code unused for this many "
                                                           "training batches onto the batch's worst-served vector")

    @model_validator(mode="before")
    @classmethod
    def _standardized_teacher_by_default(cls, data):
        """teacher.norm defaults to `standardize` here (not TeacherConfig's layernorm): see the module docstring."""
        if isinstance(data, dict) and isinstance(data.get("teacher"), dict) and "norm" not in data["teacher"]:
            data = {**data, "teacher": {**data["teacher"], "norm": "standardize"}}
        return data


def task_layer(dim_in: int, dim_out: int) -> nn.Sequential:
    """BEiT v2's Linear-Tanh-Linear between a ViT and the code / teacher space."""
    return nn.Sequential(nn.Linear(dim_in, dim_in), nn.Tanh(), nn.Linear(dim_in, dim_out))


def make_quantizer(cfg: VQKDConfig) -> EMACosineQuantizer:
    return EMACosineQuantizer(cfg.num_codes, cfg.code_dim, cfg.decay, cfg.beta, cfg.kmeans_iters, cfg.usage_window,
                              dead_after=cfg.dead_after)


class PatchCoding:
    """The tokenizer half of VQ-KD: images -> code-space vectors -> codes. Shared by the trainable method (VQKD)
    and the frozen tokenizer a later run loads (VQKDTokenizer), which needs neither decoder nor teacher."""

    encoder: VisionTransformer
    encode_task: nn.Module
    quantizer: EMACosineQuantizer

    @property
    def num_codes(self) -> int:
        return self.quantizer.num_codes

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Unnormalised code-space vectors z [B, N, code_dim] of the patches (the quantiser normalises)."""
        return self.encode_task(self.encoder(images)[:, 1:])

    @torch.no_grad()
    def tokenize(self, images: torch.Tensor) -> torch.Tensor:
        """Long[B, N]: each patch's code (nearest by cosine; the codebook does not move)."""
        return self.quantizer.codes(self.encode(images))


class VQKD(PatchCoding, Method):
    config_class = VQKDConfig

    def __init__(self, encoder: VisionTransformer, teacher: FrozenTeacher, cfg: VQKDConfig, decoder_depth: int = 3):
        super().__init__()
        self.encoder = encoder
        self.grid = encoder.grid
        self.teacher = teacher  # frozen, outside the state_dict (targets.teacher)
        d = encoder.embed_dim
        self.encode_task = task_layer(d, cfg.code_dim)
        self.quantizer = make_quantizer(cfg)
        # BEiT v2's decoder: a ViT whose "image" is the [code_dim, gh, gw] map of quantised codes (patch size 1)
        self.decoder = VisionTransformer(self.grid.shape, 1, cfg.code_dim, d, decoder_depth, encoder.num_heads,
                                         encoder.mlp_ratio, timm_name=encoder.timm_name)
        self.decode_task = task_layer(d, teacher.embed_dim)
        init_mae_weights(self.encode_task)
        init_mae_weights(self.decode_task)

    @classmethod
    def from_config(cls, method: VQKDConfig, model: ModelConfig, img_size, in_chans: int, data=None) -> "VQKD":
        encoder = VisionTransformer.from_config(model, img_size, in_chans)
        teacher = FrozenTeacher.for_method(method.teacher, encoder.grid.shape, data, "VQ-KD", one_layer=True)
        depth = method.decoder_depth or model.decoder_depth or 3
        return cls(encoder, teacher, method, depth)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """Teacher-width reconstructions [B, N, D_t] from quantised codes [B, N, code_dim]."""
        b, n, c = z_q.shape
        gh, gw = self.grid.shape
        maps = z_q.transpose(1, 2).reshape(b, c, gh, gw)
        return self.decode_task(self.decoder(maps)[:, 1:])

    @torch.no_grad()
    def targets(self, images: torch.Tensor, seeds: torch.Tensor | None = None) -> torch.Tensor:
        feats = self.teacher(images, seeds)[0].float()
        return feats if self.teacher.drop_cls else feats[:, 1:]

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["image"]
        z_q, codes, commitment = self.quantizer(self.encode(images))
        rec = self.decode(z_q).float()
        target = self.targets(images, batch.get("seed"))
        rec_loss = (1.0 - F.cosine_similarity(rec, target, dim=-1)).mean()
        q = self.quantizer
        batch_counts = torch.bincount(codes.flatten(), minlength=q.num_codes)
        # training: the window of the last `usage_window` batches (all ranks); evaluation: this batch
        usage = q.usage() if self.training else q.usage(batch_counts)
        return {
            "loss": rec_loss + commitment,
            "rec_loss": rec_loss.detach(),
            "commit_loss": commitment.detach(),
            "code_usage": usage,
            "batch_code_usage": q.usage(batch_counts),
            "code_perplexity": q.perplexity() if self.training else q.perplexity(batch_counts),
            "target_sim": mean_pairwise_cosine(target),  # teacher collapse (all patches alike -> 1)
        }


# ---- loading a trained tokenizer (BEiT v2's stage 2) -----------------------------------------------------------

class VQKDTokenizer(PatchCoding, nn.Module):
    """A trained VQ-KD's encoder, code projection and codebook, frozen: what BEiT v2 predicts. `data_mean` /
    `data_std` are the normalisation of the run it was trained on (to convert another run's images)."""

    def __init__(self, encoder: VisionTransformer, cfg: VQKDConfig, data_mean, data_std):
        super().__init__()
        self.encoder = encoder
        self.grid = encoder.grid
        self.encode_task = task_layer(encoder.embed_dim, cfg.code_dim)
        self.quantizer = make_quantizer(cfg)
        self.data_mean, self.data_std = list(data_mean), list(data_std)


TOKENIZER_PARTS = ("encoder.", "encode_task.", "quantizer.")


def load_tokenizer(path: str | Path) -> VQKDTokenizer:
    """The tokenizer of a vqkd run folder or checkpoint, in eval mode, frozen, with its codebook fitted. Only the
    parts that turn images into codes are built and loaded: the run's teacher and decoder were needed to train
    it, not to use it, so the teacher may have moved or be gone."""
    from mimkit.backends.runs import find_checkpoint, load_state_strict, read_run

    ckpt_path = find_checkpoint(path)
    ckpt, cfg, img_size, channels = read_run(ckpt_path)
    if cfg.method.name != "vqkd":
        raise ValueError(f"method.tokenizer={str(path)!r}: {ckpt_path} is a {cfg.method.name!r} run, not a VQ-KD "
                         "tokenizer; train one with `mimkit tokenizer fit method.teacher.source=<teacher run>`")
    tokenizer = VQKDTokenizer(VisionTransformer.from_config(cfg.model, img_size, channels), cfg.method,
                              ckpt["data"]["mean"], ckpt["data"]["std"])
    state = {k: v for k, v in ckpt["model"].items() if k.startswith(TOKENIZER_PARTS)}
    load_state_strict(tokenizer, state, str(ckpt_path))
    if not bool(tokenizer.quantizer.initialised):
        raise ValueError(f"method.tokenizer={str(path)!r}: the codebook in {ckpt_path} was never initialised "
                         "(a run saved before its first training step)")
    return tokenizer.eval().requires_grad_(False)


@torch.no_grad()
def codebook_usage(method: PatchCoding, dataset, batch_size: int = 256, device: str | torch.device = "cpu") -> dict:
    """Codes of every patch of `dataset` (items {"image": ...}): fraction of the codebook used and perplexity."""
    from torch.utils.data import DataLoader

    method = method.to(device).eval()
    counts = torch.zeros(method.num_codes, dtype=torch.long, device=device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    images = 0
    for batch in loader:
        x = batch["image"].to(device)
        counts += torch.bincount(method.tokenize(x).flatten(), minlength=method.num_codes)
        images += x.shape[0]
    q = method.quantizer
    return {"codebook_usage": float(q.usage(counts)), "codebook_perplexity": float(q.perplexity(counts)),
            "codebook_size": method.num_codes, "codebook_images": images}
