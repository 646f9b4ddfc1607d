"""Reading attention probabilities out of a ViT while it runs its own (fused) attention kernel.

An `AttentionReader` is, for one block, the module whose input holds the block's queries and keys and a function
recomputing softmax(q k^T * scale) from that input; `read_attention` puts forward pre-hooks on the chosen
blocks' modules for one pass. Readers exist for timm's `Attention` (mimkit and timm ViTs), transformers
ViT/ViTMAE/CLIP/SigLIP/DINOv2 layers and open_clip blocks; `mimkit.backends` adapters list them per block,
`eval.analysis` reads mimkit ViTs through the same path, and `timm_attention_logits` is the student-side
(differentiable) version Hybrid Distillation imitates its teacher with.
"""

from __future__ import annotations

import inspect
from typing import Callable, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F

T = TypeVar("T")

AttentionReader = tuple[nn.Module, Callable[[tuple, dict], torch.Tensor]]


def attention_from_qk(q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None = None,
                      true_blocks: bool = False) -> torch.Tensor:
    """softmax(q k^T * scale (+ mask)) -> [B, H, T_q, T_k] float32, from q [B, H, T_q, Dh] and k [B, H, T_k, Dh].

    A float mask is added to the logits; a boolean one marks the keys a query may see (scaled_dot_product_attention,
    transformers) or, with `true_blocks`, those it may not (nn.MultiheadAttention, open_clip). A 3-D mask is
    [B * H, T_q, T_k] (nn.MultiheadAttention's layout)."""
    return masked_logits(qk_logits(q, k, scale), mask, true_blocks).softmax(dim=-1)


def qk_logits(q: torch.Tensor, k: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """q k^T * scale in float32, also inside an autocast region (which would run the product in half precision)."""
    with torch.autocast(q.device.type, enabled=False):
        return (q.float() * scale) @ k.float().transpose(-2, -1)


def masked_logits(logits: torch.Tensor, mask: torch.Tensor | None, true_blocks: bool = False) -> torch.Tensor:
    """Logits with a mask applied (see attention_from_qk for its kinds)."""
    if mask is None:
        return logits
    m = mask.to(logits.device)
    if m.ndim == 3:
        m = m.reshape(logits.shape)
    if m.dtype == torch.bool:
        return logits.masked_fill(m if true_blocks else ~m, float("-inf"))
    return logits + m.float()


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, T, H * Dh] -> [B, H, T, Dh]."""
    return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def _binder(module: nn.Module) -> Callable[[tuple, dict], dict]:
    """fn(args, kwargs) -> a call's arguments by parameter name (positional ones included); the signature is
    read once, not on every call of the hook."""
    signature = inspect.signature(module.forward)
    return lambda args, kwargs: signature.bind_partial(*args, **kwargs).arguments


def timm_attention_reader(attn: nn.Module, who: str) -> AttentionReader:
    """timm's `Attention` (mimkit and timm ViTs: fused `qkv`, optional q/k norms): probabilities from its input x."""
    from timm.layers import Attention

    if not isinstance(attn, Attention):
        raise ValueError(f"cannot read the attention of teacher {who}: its blocks use {type(attn).__name__} "
                         "(relative position bias, rope or another variant); attention is read from timm's "
                         "plain `Attention`, transformers ViT/ViTMAE/CLIP/SigLIP/DINOv2 and open_clip towers")

    def read(args: tuple, kwargs: dict) -> torch.Tensor:
        x = args[0] if args else kwargs["x"]
        if kwargs.get("is_causal"):
            raise ValueError(f"teacher {who}: causal attention is not read")
        return timm_attention_probs(attn, x, kwargs.get("attn_mask"))

    return attn, read


def hf_attention_reader(layer: nn.Module, who: str) -> AttentionReader:
    """A transformers encoder layer's self-attention (ViT/ViTMAE/DINOv2 `attention`, CLIP/SigLIP `self_attn`):
    the first submodule with q/k projections (`q_proj`/`k_proj`, or `query`/`key` in older versions), read from
    its `hidden_states` (already through the layer's pre-norm) with its `attention_mask`, if any."""
    for attn in layer.modules():
        names = next(((q, k) for q, k in (("q_proj", "k_proj"), ("query", "key"))
                      if all(isinstance(getattr(attn, n, None), nn.Linear) for n in (q, k))), None)
        if names is not None:
            break
    else:
        raise ValueError(f"cannot read the attention of teacher {who}: no q/k projections in {type(layer).__name__}")
    q_proj, k_proj = getattr(attn, names[0]), getattr(attn, names[1])
    heads = int(getattr(attn, "num_heads", None) or getattr(attn, "num_attention_heads"))
    head_dim = int(getattr(attn, "head_dim", None) or getattr(attn, "attention_head_size", None)
                   or q_proj.out_features // heads)
    scale = next((float(v) for v in (getattr(attn, "scaling", None), getattr(attn, "scale", None))
                  if isinstance(v, (int, float))), head_dim ** -0.5)
    bind = _binder(attn)

    def read(args: tuple, kwargs: dict) -> torch.Tensor:
        bound = bind(args, kwargs)
        x = bound.get("hidden_states", args[0] if args else None)
        q, k = split_heads(q_proj(x), heads), split_heads(k_proj(x), heads)
        return attention_from_qk(q, k, scale, bound.get("attention_mask"))

    return attn, read


def open_clip_attention_reader(attn: nn.Module, who: str) -> AttentionReader:
    """An open_clip residual block's `attn`: torch's nn.MultiheadAttention (`in_proj_weight`/`in_proj_bias`,
    batch-first or sequence-first) or open_clip's own `Attention` (batch-first; optional q/k LayerNorms or scaled
    cosine attention)."""
    if isinstance(attn, nn.MultiheadAttention):
        if attn.bias_k is not None:
            raise ValueError(f"cannot read the attention of teacher {who}: nn.MultiheadAttention with add_bias_kv")
        heads = attn.num_heads
        scale = attn.head_dim ** -0.5
        bind = _binder(attn)

        def read(args: tuple, kwargs: dict) -> torch.Tensor:
            bound = bind(args, kwargs)
            query, key = bound["query"], bound["key"]
            if not attn.batch_first:
                query, key = query.transpose(0, 1), key.transpose(0, 1)
            if attn._qkv_same_embed_dim:
                w_q, w_k, _ = attn.in_proj_weight.chunk(3)
            else:
                w_q, w_k = attn.q_proj_weight, attn.k_proj_weight
            b_q, b_k = attn.in_proj_bias.chunk(3)[:2] if attn.in_proj_bias is not None else (None, None)
            q, k = split_heads(F.linear(query, w_q, b_q), heads), split_heads(F.linear(key, w_k, b_k), heads)
            logits = masked_logits(qk_logits(q, k, scale), bound.get("attn_mask"), true_blocks=True)
            pad = bound.get("key_padding_mask")
            if pad is not None:
                pad = pad[:, None, None, :].expand(logits.shape)
                logits = masked_logits(logits, pad, true_blocks=pad.dtype == torch.bool)
            return logits.softmax(dim=-1)

        return attn, read
    if all(hasattr(attn, a) for a in ("in_proj_weight", "num_heads", "head_dim", "scale", "ln_q", "ln_k")):
        heads = attn.num_heads

        def read(args: tuple, kwargs: dict) -> torch.Tensor:
            x = args[0] if args else kwargs["x"]
            q, k, _ = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
            q, k = split_heads(q, heads), split_heads(k, heads)
            mask = args[1] if len(args) > 1 else kwargs.get("attn_mask")
            if getattr(attn, "logit_scale", None) is not None:  # scaled cosine attention
                scale = torch.clamp(attn.logit_scale.float(), max=attn.logit_scale_max).exp()
                logits = qk_logits(F.normalize(q.float(), dim=-1), F.normalize(k.float(), dim=-1), scale)
                return masked_logits(logits, mask, true_blocks=True).softmax(dim=-1)
            return attention_from_qk(attn.ln_q(q), attn.ln_k(k), attn.scale, mask, true_blocks=True)

        return attn, read
    raise ValueError(f"cannot read the attention of teacher {who}: its blocks' attention is a "
                     f"{type(attn).__name__}, neither nn.MultiheadAttention nor open_clip's Attention")


def timm_attention_logits(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """q k^T * scale [B, H, T, T] (float32, with gradients) of a timm `Attention` for its input x [B, T, D]: the
    fused qkv projection, then the module's q/k norms when it has them."""
    b, t, _ = x.shape
    heads = attn.num_heads
    head_dim = getattr(attn, "head_dim", None) or attn.qkv.out_features // (3 * heads)
    qkv = attn.qkv(x).reshape(b, t, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    q = q_norm(q) if q_norm is not None else q
    k = k_norm(k) if k_norm is not None else k
    return qk_logits(q, k, getattr(attn, "scale", head_dim ** -0.5))


def timm_attention_probs(attn: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax of `timm_attention_logits` -> [B, H, T, T] float32; `attn_mask` as scaled_dot_product_attention
    takes it (bool: may attend; float: added)."""
    return masked_logits(timm_attention_logits(attn, x), attn_mask).softmax(dim=-1)


def read_attention(readers: list[AttentionReader], block_ids: list[int], run: Callable[[], T], who: str
                   ) -> tuple[T, list[torch.Tensor]]:
    """(run(), the attention probabilities of blocks `block_ids` during that call), read by forward pre-hooks on
    the readers' modules (removed afterwards, also on error)."""
    found: dict[int, torch.Tensor] = {}

    def make_hook(i, read):
        def hook(module, args, kwargs):
            found[i] = read(args, kwargs)
        return hook

    handles = [readers[i][0].register_forward_pre_hook(make_hook(i, readers[i][1]), with_kwargs=True)
               for i in sorted(set(block_ids))]
    try:
        out = run()
    finally:
        for h in handles:
            h.remove()
    missing = [i for i in block_ids if i not in found]
    if missing:
        raise RuntimeError(f"{who}: blocks {missing} ran without calling their attention module")
    return out, [found[i] for i in block_ids]
