"""What a ViT encoder does inside: attention distance and entropy, Fourier amplitude and feature spectra.

The metrics of "What Do Self-Supervised Vision Transformers Learn?" (Park et al., ICLR'23; card E2) and the
feature-spectrum analyses used to compare MIM and contrastive encoders. Every function takes a mimkit
`VisionTransformer` (or any module with `blocks` of timm `Block`s, `grid` and `patch_embed`) and a batch of
normalised images [B, C, H, W]; nothing in the model is changed.

Attention is read with forward pre-hooks on each block's `attn` module: from the module's input and its own
`qkv` weights (and q/k norms, scale, and any `attn_mask` passed to it) the hooks recompute
softmax(q k^T * scale), so fused attention kernels stay in use for the forward pass itself.

Shapes: L layers (blocks), H heads, T = 1 + N tokens (class token first), N = h * w patches.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn as nn

from mimkit.backends.attention import read_attention, timm_attention_reader

# ----------------------------------------------------------------------------------------------------------
# reading attention and layer features


def _blocks(encoder: nn.Module) -> list[nn.Module]:
    blocks = getattr(encoder, "blocks", None)
    if blocks is None:
        raise TypeError(f"{type(encoder).__name__} has no `blocks`; pass a mimkit VisionTransformer")
    return list(blocks)


def _layer_indices(depth: int, layers) -> list[int]:
    if layers is None:
        return list(range(depth))
    out = []
    for i in ([layers] if isinstance(layers, int) else layers):
        j = i + depth if i < 0 else i
        if not 0 <= j < depth:
            raise ValueError(f"layer {i} out of range for an encoder with {depth} blocks")
        out.append(j)
    return out


@contextmanager
def _eval_mode(module: nn.Module):
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)


def _on_device(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    p = next(encoder.parameters(), None)
    return images.to(p.device) if p is not None else images


@torch.no_grad()
def attention_maps(encoder: nn.Module, images: torch.Tensor, layers=None) -> list[torch.Tensor]:
    """Attention probabilities per requested layer (default: all), each [B, H, T, T], float32 on the CPU.

    Rows are queries, columns keys; token 0 is the class token. An `attn_mask` that a block receives (for
    example from another pre-hook) is applied as `scaled_dot_product_attention` would. Read with the same
    pre-hooks as a frozen teacher's attention (backends.attention)."""
    blocks = _blocks(encoder)
    idx = _layer_indices(len(blocks), layers)
    readers = [timm_attention_reader(b.attn, type(encoder).__name__) for b in blocks]
    with _eval_mode(encoder):
        _, maps = read_attention(readers, idx, lambda: encoder(_on_device(encoder, images)), type(encoder).__name__)
    return [m.cpu() for m in maps]


@torch.no_grad()
def layer_features(encoder: nn.Module, images: torch.Tensor, layers=None) -> list[torch.Tensor]:
    """Output tokens of each requested block (default: all), each [B, T, D] float32 on the CPU (before the
    final norm), from the encoder's own `forward_layers`."""
    idx = _layer_indices(len(_blocks(encoder)), layers)
    with _eval_mode(encoder):
        outs = encoder.forward_layers(_on_device(encoder, images), idx)
    return [o.detach().float().cpu() for o in outs]


def _grid(encoder: nn.Module) -> tuple[int, int, float, float]:
    """(h, w, patch height px, patch width px) of the encoder's patch grid."""
    grid = getattr(encoder, "grid", None)
    if grid is not None:
        (h, w), (ph, pw) = tuple(grid.shape), _pair(grid.patch_size)
        return int(h), int(w), float(ph), float(pw)
    pe = encoder.patch_embed
    h, w = pe.grid_size
    ph, pw = _pair(pe.patch_size)
    return int(h), int(w), float(ph), float(pw)


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


# ----------------------------------------------------------------------------------------------------------
# attention metrics


def patch_distances(h: int, w: int, patch_size=1.0) -> torch.Tensor:
    """Euclidean distances in pixels between patch centres of an h x w grid: [h*w, h*w]."""
    ph, pw = (float(x) for x in _pair(patch_size))
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    pos = torch.stack([ys.reshape(-1) * ph, xs.reshape(-1) * pw], dim=1)
    return torch.cdist(pos, pos)


def _patch_attention(attn: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Drop the class-token row and column (and any other leading prefix tokens) and renormalise rows."""
    a = attn[..., -num_patches:, -num_patches:].double()
    return a / a.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def mean_attention_distance_from_maps(attn: torch.Tensor, h: int, w: int, patch_size=1.0) -> torch.Tensor:
    """Mean attention distance per head [H] of attention [B, H, T, T] over an h x w grid: for every patch
    query sum_k A[q, k] d(q, k) with the class token removed and rows renormalised, averaged over queries
    and images. In pixels when `patch_size` is the patch size in pixels."""
    n = h * w
    if attn.shape[-1] < n:
        raise ValueError(f"attention over {attn.shape[-1]} tokens cannot cover a {h}x{w} grid")
    a = _patch_attention(attn, n)
    d = patch_distances(h, w, patch_size).to(a.device)
    return (a * d).sum(dim=-1).mean(dim=(0, 2)).float()


def mean_attention_distance(encoder: nn.Module, images: torch.Tensor, layers=None) -> torch.Tensor:
    """[L, H]: mean attention distance in pixels per layer and head (see `mean_attention_distance_from_maps`)."""
    h, w, ph, pw = _grid(encoder)
    maps = attention_maps(encoder, images, layers)
    return torch.stack([mean_attention_distance_from_maps(a, h, w, (ph, pw)) for a in maps])


def attention_entropy_from_maps(attn: torch.Tensor, drop_cls: bool = False,
                                num_patches: int | None = None) -> torch.Tensor:
    """Entropy (nats) of the attention rows per head [H], averaged over queries and images. Uniform attention
    over T keys gives log(T). `drop_cls`: only patch queries and keys (the last `num_patches`), renormalised."""
    a = attn.double()
    if drop_cls:
        n = num_patches if num_patches is not None else attn.shape[-1] - 1
        a = _patch_attention(attn, n)
    ent = -(a * a.clamp_min(1e-30).log()).sum(dim=-1)
    return ent.mean(dim=(0, 2)).float()


def attention_entropy(encoder: nn.Module, images: torch.Tensor, layers=None, drop_cls: bool = False) -> torch.Tensor:
    """[L, H]: attention entropy in nats per layer and head."""
    h, w, _, _ = _grid(encoder)
    maps = attention_maps(encoder, images, layers)
    return torch.stack([attention_entropy_from_maps(a, drop_cls, h * w) for a in maps])


def attention_nmi_from_maps(attn: torch.Tensor) -> torch.Tensor:
    """Normalised mutual information between queries and keys per head [H] (card E2), averaged over images:
    p(q) uniform, p(k) = mean_q A[q, k], NMI = I(q; k) / sqrt(H(q) H(k)). Near 0: every query attends alike
    (attention collapse); near 1: every query attends to its own keys."""
    a = attn.double()
    t_q = a.shape[-2]
    pk = a.mean(dim=-2, keepdim=True)  # [B, H, 1, T]
    mi = (a * (a.clamp_min(1e-30).log() - pk.clamp_min(1e-30).log())).sum(dim=-1).mean(dim=-1)  # [B, H]
    hq = math.log(t_q)
    hk = -(pk * pk.clamp_min(1e-30).log()).sum(dim=-1).squeeze(-1)
    nmi = mi / (hq * hk).clamp_min(1e-12).sqrt()
    return nmi.mean(dim=0).float()


def attention_nmi(encoder: nn.Module, images: torch.Tensor, layers=None) -> torch.Tensor:
    """[L, H]: attention NMI per layer and head."""
    return torch.stack([attention_nmi_from_maps(a) for a in attention_maps(encoder, images, layers)])


def cls_attention(encoder: nn.Module, images: torch.Tensor, layers=None) -> torch.Tensor:
    """[L, B, H, h, w]: attention of the class token to every patch (renormalised over patches)."""
    h, w, _, _ = _grid(encoder)
    out = []
    for a in attention_maps(encoder, images, layers):
        row = a[:, :, 0, -h * w:]
        row = row / row.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        out.append(row.reshape(a.shape[0], a.shape[1], h, w))
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------------------
# Fourier analysis of feature maps


def fourier_rel_logamp_curve(tokens: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Relative log amplitude of the patch-token feature maps along the half diagonal of the shifted 2-D
    spectrum, from the DC component (0) out to the highest frequency.

    tokens: [B, T, C] with the last h*w tokens the patches (class token, if any, first and ignored).
    The maps [B, C, h, w] are Fourier transformed, log |F| is averaged over images and channels, and the
    half diagonal is read from the centre; values are relative to DC (first entry 0).
    Returns (frequencies in units of pi along the row axis, relative log amplitudes), each [m + 1]."""
    b, _, c = tokens.shape
    x = tokens[:, -h * w:].float().reshape(b, h, w, c).permute(0, 3, 1, 2)
    amp = torch.fft.fftshift(torch.fft.fft2(x.double()).abs().add(1e-6).log(), dim=(-2, -1)).mean(dim=(0, 1))
    ch, cw = h // 2, w // 2
    m = max(1, min(ch, cw))
    r = torch.arange(m + 1, dtype=torch.float64)
    iy = (ch - torch.round(r * ch / m)).long()  # towards negative frequencies: reaches Nyquist for even sizes
    ix = (cw - torch.round(r * cw / m)).long()
    curve = amp[iy, ix]
    freqs = 2.0 * (ch - iy).double() / h
    return freqs.float(), (curve - curve[0]).float()


def fourier_rel_logamp(encoder: nn.Module, images: torch.Tensor, layers=None) -> torch.Tensor:
    """[L]: per layer, the log amplitude of the highest frequency on the half diagonal relative to DC (E2's
    "fourier_rel_logamp"; larger = more high-frequency content in that layer's feature maps)."""
    h, w, _, _ = _grid(encoder)
    return torch.stack([fourier_rel_logamp_curve(f, h, w)[1][-1] for f in layer_features(encoder, images, layers)])


# ----------------------------------------------------------------------------------------------------------
# spectra


def singular_spectrum(features: torch.Tensor, center: bool = True) -> torch.Tensor:
    """Singular values (descending) of a feature matrix [N, D] (more dims are flattened into N)."""
    f = features.reshape(-1, features.shape[-1]).double()
    if center:
        f = f - f.mean(dim=0, keepdim=True)
    return torch.linalg.svdvals(f).float()


def effective_rank_from_spectrum(s: torch.Tensor) -> float:
    """exp(entropy of s / sum(s)) (Roy & Vetterli): k for k equal non-zero singular values."""
    s = s.double().clamp_min(0)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def effective_rank(features: torch.Tensor, center: bool = True) -> float:
    """Effective rank of a feature matrix [N, D]."""
    return effective_rank_from_spectrum(singular_spectrum(features, center))


def _pooled(feats: torch.Tensor, pool: str, num_patches: int) -> torch.Tensor:
    if pool == "cls":
        return feats[:, 0]
    if pool == "mean":
        return feats[:, -num_patches:].mean(dim=1)
    if pool == "tokens":
        return feats[:, -num_patches:].reshape(-1, feats.shape[-1])
    raise ValueError(f"unknown pool {pool!r}; choose cls, mean or tokens")


@torch.no_grad()
def feature_spectrum(encoder: nn.Module, images: torch.Tensor, pool: str = "cls", center: bool = True) -> dict:
    """Singular values and effective rank of the encoder's output features (after the final norm).
    pool: "cls" (one vector per image), "mean" (mean patch token) or "tokens" (every patch token)."""
    h, w, _, _ = _grid(encoder)
    with _eval_mode(encoder):
        out = encoder(_on_device(encoder, images)).float().cpu()
    s = singular_spectrum(_pooled(out, pool, h * w), center)
    return {"singular_values": s, "effective_rank": effective_rank_from_spectrum(s), "pool": pool}


def layer_effective_rank(encoder: nn.Module, images: torch.Tensor, layers=None, pool: str = "tokens",
                         center: bool = True) -> torch.Tensor:
    """[L]: effective rank of each block's output features."""
    h, w, _, _ = _grid(encoder)
    return torch.tensor([effective_rank(_pooled(f, pool, h * w), center)
                         for f in layer_features(encoder, images, layers)])


# ----------------------------------------------------------------------------------------------------------
# everything at once


@torch.no_grad()
def analyze(encoder: nn.Module, images: torch.Tensor, pool: str = "cls") -> dict:
    """All metrics in one pass over `images`, as plain lists (JSON-ready):
    attention_distance [L][H] (pixels), attention_entropy [L][H] (nats), attention_nmi [L][H],
    fourier_rel_logamp [L], fourier_curves {"freqs": [m+1], "curves": [L][m+1]}, layer_effective_rank [L]
    (patch tokens), singular_values and effective_rank of the output features pooled by `pool`."""
    h, w, ph, pw = _grid(encoder)
    maps = attention_maps(encoder, images)
    feats = layer_features(encoder, images)
    curves = [fourier_rel_logamp_curve(f, h, w) for f in feats]
    spec = feature_spectrum(encoder, images, pool=pool)
    return {
        "num_images": int(images.shape[0]), "grid": [h, w], "patch_size": [ph, pw],
        "attention_distance": torch.stack(
            [mean_attention_distance_from_maps(a, h, w, (ph, pw)) for a in maps]).tolist(),
        "attention_entropy": torch.stack([attention_entropy_from_maps(a) for a in maps]).tolist(),
        "attention_nmi": torch.stack([attention_nmi_from_maps(a) for a in maps]).tolist(),
        "fourier_rel_logamp": [float(c[1][-1]) for c in curves],
        "fourier_curves": {"freqs": curves[0][0].tolist(), "curves": [c[1].tolist() for c in curves]},
        "layer_effective_rank": [effective_rank(_pooled(f, "tokens", h * w)) for f in feats],
        "singular_values": spec["singular_values"].tolist(),
        "effective_rank": spec["effective_rank"],
        "pool": pool,
    }
