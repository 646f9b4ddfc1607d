"""ViT encoder on timm blocks, with timm's parameter names so weights load into `timm.create_model`.

Differences from timm's VisionTransformer are only in what `forward` accepts: the encoder can run on a
subset of patch tokens (MAE's visible-only encoding). Position embeddings are fixed 2-D sin-cos, stored
as a frozen `pos_embed` parameter of shape [1, 1 + N, D] (class-token row zero), exactly timm's layout.

Activation checkpointing (`model.grad_checkpointing`, or `encoder.set_grad_checkpointing()` as in timm):
each block then keeps only its input for the backward pass and recomputes its activations there. It is
decided inside the block (`CheckpointBlock`), so every path through the blocks gets it: `forward`,
`forward_tokens`, `run_blocks`, `forward_layers` and methods that loop over `encoder.blocks` themselves.
It applies in training mode with autograd on; evaluation and `torch.no_grad()` run the blocks plainly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed
from torch.utils.checkpoint import checkpoint
from timm.models.vision_transformer import Block

from mimkit.models.patch import PatchGrid, to_2tuple
from mimkit.models.pos_embed import sincos_2d


@dataclass(frozen=True)
class ViTSpec:
    embed_dim: int
    depth: int
    num_heads: int
    timm_name: str  # a registered timm architecture with these widths; size/patch/channels are overridden


VIT_PRESETS: dict[str, ViTSpec] = {
    # below ViT-Tiny, for small images on a CPU (Fashion-MNIST at patch 4 trains in minutes on 2 cores)
    "vit_nano": ViTSpec(96, 6, 3, "vit_tiny_patch16_224"),
    "vit_micro": ViTSpec(128, 6, 4, "vit_tiny_patch16_224"),
    "vit_tiny": ViTSpec(192, 12, 3, "vit_tiny_patch16_224"),
    "vit_small": ViTSpec(384, 12, 6, "vit_small_patch16_224"),
    "vit_base": ViTSpec(768, 12, 12, "vit_base_patch16_224"),
    "vit_large": ViTSpec(1024, 24, 16, "vit_large_patch16_224"),
    "vit_huge": ViTSpec(1280, 32, 16, "vit_huge_patch14_224"),
}


def init_mae_weights(module: nn.Module) -> None:
    """MAE's initialisation: xavier-uniform Linear weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class CheckpointBlock(Block):
    """timm's Block (same parameters and names) that recomputes itself in the backward pass when
    `grad_checkpointing` is set, in training mode with grad enabled (torch.utils.checkpoint, non-reentrant,
    RNG state preserved, so drop path draws the same paths in the recomputation)."""

    grad_checkpointing: bool = False

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(super().forward, x, *args, use_reentrant=False, **kwargs)
        return super().forward(x, *args, **kwargs)


class VisionTransformer(nn.Module):
    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        timm_name: str = "vit_base_patch16_224",
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        self.grid = PatchGrid.make(img_size, patch_size, in_chans)
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.timm_name = timm_name
        self.mlp_ratio = mlp_ratio
        self.patch_embed = PatchEmbed(self.grid.img_size, self.grid.patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        pos = sincos_2d(embed_dim, self.grid.shape, cls_token=True)[None]
        self.pos_embed = nn.Parameter(pos, requires_grad=False)
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.Sequential(
            *[
                CheckpointBlock(embed_dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=dpr[i],
                                norm_layer=norm_layer)
                for i in range(depth)
            ]
        )
        self.norm = norm_layer(embed_dim)
        init_mae_weights(self)
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # like a Linear layer, as in MAE
        nn.init.normal_(self.cls_token, std=0.02)
        self.set_grad_checkpointing(grad_checkpointing)

    @classmethod
    def from_preset(cls, name: str, img_size, patch_size, in_chans: int, drop_path_rate: float = 0.0,
                    depth: int | None = None, grad_checkpointing: bool = False, embed_dim: int | None = None,
                    num_heads: int | None = None):
        """A preset's architecture; `depth`, `embed_dim` and `num_heads` override the preset's own."""
        if name not in VIT_PRESETS:
            raise ValueError(f"encoder {name!r} is not a ViT; this method needs one of {sorted(VIT_PRESETS)}")
        s = VIT_PRESETS[name]
        dim, heads = embed_dim or s.embed_dim, num_heads or s.num_heads
        if dim % heads:
            raise ValueError(f"model.embed_dim={dim} is not divisible by model.num_heads={heads}")
        return cls(img_size, patch_size, in_chans, dim, depth or s.depth, heads,
                   drop_path_rate=drop_path_rate, timm_name=s.timm_name, grad_checkpointing=grad_checkpointing)

    @classmethod
    def from_config(cls, model, img_size, in_chans: int) -> "VisionTransformer":
        """The encoder a config's `model` section describes (a ModelConfig)."""
        return cls.from_preset(model.encoder, img_size, model.patch_size, in_chans, model.drop_path, model.depth,
                               grad_checkpointing=bool(getattr(model, "grad_checkpointing", False)),
                               embed_dim=getattr(model, "embed_dim", None), num_heads=getattr(model, "num_heads", None))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every block in the backward pass instead of storing its activations (timm's name)."""
        for block in self.blocks:
            if isinstance(block, CheckpointBlock):
                block.grad_checkpointing = bool(enable)

    @property
    def grad_checkpointing(self) -> bool:
        return any(getattr(b, "grad_checkpointing", False) for b in self.blocks)

    @grad_checkpointing.setter
    def grad_checkpointing(self, enable: bool) -> None:
        self.set_grad_checkpointing(enable)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def timm_kwargs(self) -> dict:
        """Arguments that make `timm.create_model(self.timm_name, **kwargs)` this architecture."""
        return dict(
            img_size=list(self.grid.img_size), patch_size=list(to_2tuple(self.grid.patch_size)),
            in_chans=self.grid.in_chans, embed_dim=self.embed_dim, depth=self.depth,
            num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, num_classes=0, global_pool="token",
        )

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens with position embeddings: [B, N, D]. Images of another size (a multiple of the patch
        size: DINO/iBOT's local crops) get the position table resampled bicubically to their grid, as DINO's
        interpolate_pos_encoding, so a small view spans the same positions as the full image."""
        if tuple(images.shape[-2:]) == self.grid.img_size:
            return self.patch_embed(images) + self.pos_embed[:, 1:, :]
        return self.embed_resized(images)

    def embed_resized(self, images: torch.Tensor) -> torch.Tensor:
        """`embed` for images of any size that the patch size divides: [B, h * w, D] for an h x w patch grid."""
        (ph, pw), (gh, gw) = self.grid.patch_size, self.grid.shape
        height, width = images.shape[-2:]
        if height % ph or width % pw:
            raise ValueError(f"image size {(height, width)} is not divisible by patch size {(ph, pw)}")
        h, w = height // ph, width // pw
        tokens = self.patch_embed.norm(self.patch_embed.proj(images).flatten(2).transpose(1, 2))
        table = self.pos_embed[:, 1:, :].reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
        if (h, w) != (gh, gw):
            table = F.interpolate(table.float(), size=(h, w), mode="bicubic", align_corners=False).to(table.dtype)
        return tokens + table.permute(0, 2, 3, 1).reshape(1, h * w, -1)

    def _with_cls(self, tokens: torch.Tensor) -> torch.Tensor:
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1)

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Prepend the class token to already-embedded patch tokens [B, T, D], run blocks and norm."""
        return self.norm(self.blocks(self._with_cls(tokens)))

    def forward(self, images: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """[B, 1 + T, D]: all patches (T = N, as timm's forward_features) or only `ids_keep` (Long[B, V])."""
        tokens = self.embed(images)
        if ids_keep is not None:
            tokens = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        return self.forward_tokens(tokens)

    forward_features = forward

    def embed_masked(self, images: torch.Tensor, masked: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
        """All N patch tokens with position embeddings, hidden ones (`masked` Bool[B, N]) replaced by
        `mask_token` [1, 1, D] before the position embedding is added (SimMIM/BEiT corruption): [B, N, D]."""
        tokens = self.patch_embed(images)
        w = masked.unsqueeze(-1).to(tokens.dtype)
        tokens = tokens * (1 - w) + mask_token.to(tokens.dtype) * w
        return tokens + self.pos_embed[:, 1:, :]

    def run_blocks(self, tokens: torch.Tensor, taps=()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Class token + embedded patch tokens [B, T, D] through every block and the final norm.

        Returns (normed output [B, 1 + T, D], {i: tokens right after block i, before the norm}) for the
        0-based block indices in `taps` (negative indices count from the end; keys are as given)."""
        want = {(i + self.depth if i < 0 else i): i for i in taps}
        if any(not 0 <= i < self.depth for i in want):
            raise ValueError(f"taps {list(taps)} out of range for {self.depth} blocks")
        x = self._with_cls(tokens)
        out = {}
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in want:
                out[want[i]] = x
        return self.norm(x), out

    def forward_layers(self, images: torch.Tensor, layers) -> list[torch.Tensor]:
        """Tokens [B, 1 + N, D] right after each chosen block (0-based indices; negative count from the end),
        before the final norm, in the order given. Runs only as many blocks as the deepest layer needs."""
        idx = [i + self.depth if i < 0 else i for i in layers]
        if any(not 0 <= i < self.depth for i in idx):
            raise ValueError(f"layers {list(layers)} out of range for {self.depth} blocks")
        x = self._with_cls(self.embed(images))
        out = {}
        for i, block in enumerate(self.blocks[: max(idx) + 1]):
            x = block(x)
            out[i] = x
        return [out[i] for i in idx]


    def forward_with_cls_attention(self, images: torch.Tensor, ids_keep: torch.Tensor | None = None
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` plus the score AttMask-style masking reads: the last block's class-token attention to each
        patch token, averaged over heads, [B, T] (rows sum to 1 minus the class token's self-attention)."""
        tokens = self.embed(images)
        if ids_keep is not None:
            tokens = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        x = self._with_cls(tokens)
        for block in self.blocks[:-1]:
            x = block(x)
        last = self.blocks[-1]
        scores = cls_attention_row(last.attn, last.norm1(x))[:, 1:]
        return self.norm(last(x)), scores


def cls_attention_row(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Class-token (row 0) attention of a timm Attention module over its input x [B, T, D], mean over heads:
    [B, T] in float32. Only the class token's query is formed; keys are all tokens."""
    b, t, d = x.shape
    heads = attn.num_heads
    head_dim = d // heads
    qkv = attn.qkv(x).reshape(b, t, 3, heads, head_dim)
    q = attn.q_norm(qkv[:, :1, 0].transpose(1, 2))   # [B, H, 1, hd]
    k = attn.k_norm(qkv[:, :, 1].transpose(1, 2))    # [B, H, T, hd]
    logits = (q.float() * attn.scale) @ k.float().transpose(-2, -1)
    return logits.softmax(-1).mean(1).squeeze(1)


def block_at(fraction: float, depth: int) -> int:
    """0-based index of the block at `fraction` of the depth: 1-based block round-half-up(f * depth), clamped to
    [1, depth] (ViT-12: 0.25 -> block 3, 0.75 -> block 9). Layer knobs are fractions so recipes fit any depth."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"layer fractions must be in (0, 1], got {fraction}")
    return min(depth, max(1, math.floor(fraction * depth + 0.5))) - 1


def pool(features: torch.Tensor, kind: str = "cls") -> torch.Tensor:
    """Image features from encoder output [B, 1 + N, D]: class token, or mean of patch tokens."""
    if kind == "cls":
        return features[:, 0]
    if kind == "mean":
        return features[:, 1:].mean(dim=1)
    raise ValueError(f"unknown pooling {kind!r}; choose 'cls' or 'mean'")
