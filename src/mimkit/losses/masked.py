"""Losses that apply only where a mask says so."""

from __future__ import annotations

import torch


def masked_mse(pred: torch.Tensor, target: torch.Tensor, where: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean squared error per patch [B, N], averaged over the patches where `where` (Bool[B, N]) is True.

    Returns (scalar loss, per-patch loss). Predictions at other positions get no gradient.
    """
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
    weight = where.to(per_patch.dtype)
    loss = (per_patch * weight).sum() / weight.sum().clamp_min(1.0)
    return loss, per_patch


def masked_l1(pred: torch.Tensor, target: torch.Tensor, where: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean absolute error per patch [B, N], averaged over the patches where `where` is True (as masked_mse)."""
    per_patch = (pred.float() - target.float()).abs().mean(dim=-1)
    weight = where.to(per_patch.dtype)
    loss = (per_patch * weight).sum() / weight.sum().clamp_min(1.0)
    return loss, per_patch
