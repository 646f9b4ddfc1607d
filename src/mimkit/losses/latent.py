"""Losses between predicted and target patch latents (LatentMIM, Wei et al. ECCV 2024; yibingwei-1/LatentMIM).

Regressing latents with L2 invites collapse: a constant prediction matches a constant target. LatentMIM's patch
InfoNCE instead asks each predicted patch to pick out its own target among the other target patches of the same
image, which a collapsed target space cannot satisfy. The similarity regulariser keeps the patch tokens of an
image from all pointing the same way (or from being forced apart too early), pulling their average cosine to a
scheduled value.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def standardize_patches(pred: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Per image and dimension, over its patches: (x - mean) / (std + eps), x [B, M, D], std unbiased (as the
    reference's torch.std). It removes what all predicted patches of an image share, which carries no
    information about which target is which, before the cosine."""
    return (pred - pred.mean(dim=1, keepdim=True)) / (pred.std(dim=1, keepdim=True) + eps)


def patch_infonce(pred: torch.Tensor, target: torch.Tensor, tau: float = 0.2, standardize: bool = True
                  ) -> torch.Tensor:
    """Intra-image patch InfoNCE: pred, target [B, M, D] with pred[:, j] and target[:, j] at the same patch.

    Predictions standardised over the M patches (`standardize_patches`), both sides L2-normalised,
    logits[b, i, j] = <pred_bi, target_bj> / tau, cross-entropy with the diagonal (i = j) as the positive,
    averaged over all B*M rows and multiplied by 2*tau (the reference's scale, which keeps the gradient size
    roughly independent of tau). Negatives are only the other patches of the same image."""
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(f"pred and target must both be [B, M, D], got {list(pred.shape)} and {list(target.shape)}")
    if pred.shape[1] < 2:
        raise ValueError("patch InfoNCE needs at least 2 target patches per image")
    pred = pred.float()
    if standardize:
        pred = standardize_patches(pred)
    p = F.normalize(pred, dim=-1)
    t = F.normalize(target.float(), dim=-1)
    logits = p @ t.transpose(1, 2) / tau
    b, m, _ = logits.shape
    labels = torch.arange(m, device=logits.device).expand(b, m)
    return F.cross_entropy(logits.reshape(b * m, m), labels.reshape(-1)) * (2 * tau)


@torch.no_grad()
def patch_retrieval_accuracy(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Share of predicted patches whose most similar target (cosine, same image) is their own: a readable
    companion of the InfoNCE value (chance is 1/M)."""
    p = F.normalize(standardize_patches(pred.float()), dim=-1)
    t = F.normalize(target.float(), dim=-1)
    best = (p @ t.transpose(1, 2)).argmax(dim=-1)
    return (best == torch.arange(pred.shape[1], device=pred.device)).float().mean()


def normalized_l2(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The L2 ablation (the reference's `norm_l2`): MSE to targets standardised per token over D."""
    target = target.float()
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    return F.mse_loss(pred.float(), target)


def within_image_cosine(x: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over the distinct pairs of tokens of each image, x [B, T, D] (T >= 2), averaged
    over images; differentiable (it is regularised, not only logged). Self-pairs are left out: the reference
    averages over all T*T pairs including the T self-similarities of 1, a 1/T bias that is small at T = 20 but
    would dominate at the handful of visible tokens of a small grid."""
    t = x.shape[1]
    if t < 2:
        raise ValueError("pairwise similarity needs at least 2 tokens per image")
    z = F.normalize(x.float(), dim=-1)
    total = z.sum(dim=1).pow(2).sum(dim=-1) - z.pow(2).sum(dim=(1, 2))  # sum over i != j of z_i . z_j
    return (total / (t * (t - 1))).mean()


def similarity_target(progress: float, start: float = 0.75, end: float = 0.25) -> float:
    """s_t: start -> end along a half cosine over training (progress in [0, 1])."""
    progress = min(max(float(progress), 0.0), 1.0)
    return end + (start - end) * (1 + math.cos(math.pi * progress)) / 2


def similarity_regulariser(token_sets: list[torch.Tensor], s_t: float, weight: float) -> torch.Tensor:
    """weight * sum over the token sets ([B, T, D] each) of (within_image_cosine - s_t)^2."""
    return weight * sum((within_image_cosine(x) - s_t).pow(2) for x in token_sets)
