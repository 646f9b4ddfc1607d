"""Optimizer and schedules: AdamW with MAE's weight-decay exclusions; lr warmup then cosine; optionally a cosine
weight-decay schedule (DINO/iBOT: 0.04 -> 0.4)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn

# parameters that are never decayed, by name (besides every parameter with ndim <= 1: biases, norm weights)
NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token")
# name segments that wrappers (Fabric, DDP, FSDP, activation checkpointing, torch.compile) add to parameter names
_WRAPPER_SEGMENTS = {"_forward_module", "_original_module", "module", "_fsdp_wrapped_module",
                     "_checkpoint_wrapped_module", "_orig_mod"}


def clean_name(name: str) -> str:
    """`_forward_module.module.encoder.norm.weight` -> `encoder.norm.weight`."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    """Biases, norm weights (any parameter with ndim <= 1) and position/class/mask tokens get no weight decay."""
    if param.ndim <= 1:
        return True
    return any(part in NO_DECAY_NAMES for part in clean_name(name).split("."))


def param_groups(module: nn.Module, weight_decay: float, no_decay: Iterable[str] | None = None) -> list[dict]:
    """Two AdamW groups: "decay" (weights) and "no_decay"; frozen parameters are left out.

    `no_decay`: names (wrapper prefixes removed) to exclude, computed on the unwrapped module; needed after
    FSDP flattening, where a parameter's ndim no longer tells a bias from a weight.
    """
    skip = None if no_decay is None else set(no_decay)
    decay, plain, matched = [], [], set()
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if skip is None:
            excluded = is_no_decay(name, p)
        else:
            excluded = clean_name(name) in skip
            if excluded:
                matched.add(clean_name(name))
        (plain if excluded else decay).append(p)
    if skip is not None and matched != skip:
        missing = sorted(skip - matched)[:5]
        raise RuntimeError(f"no-decay parameters not found in the wrapped module: {missing}")
    return [
        {"params": decay, "weight_decay": weight_decay, "group": "decay"},
        {"params": plain, "weight_decay": 0.0, "group": "no_decay"},
    ]


def no_decay_names(module: nn.Module) -> set[str]:
    return {clean_name(n) for n, p in module.named_parameters() if p.requires_grad and is_no_decay(n, p)}


def build_optimizer(module: nn.Module, optim_cfg, no_decay: Iterable[str] | None = None,
                    lr: float | None = None) -> torch.optim.AdamW:
    groups = param_groups(module, optim_cfg.weight_decay, no_decay)
    return torch.optim.AdamW(groups, lr=optim_cfg.peak_lr if lr is None else lr, betas=tuple(optim_cfg.betas))


def warmup_steps(total_steps: int, warmup_fraction: float) -> int:
    return int(round(total_steps * warmup_fraction))


def lr_at(step: int, total_steps: int, warmup: int, peak_lr: float, min_lr: float = 0.0) -> float:
    """The lr of optimizer step `step` (0-based): linear warmup to `peak_lr` over `warmup` steps (the first
    step already uses peak/warmup, not 0), then half a cosine from `peak_lr` down to `min_lr` at `total_steps`."""
    if warmup > 0 and step < warmup:
        return peak_lr * (step + 1) / warmup
    span = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def weight_decay_at(step: int, total_steps: int, start: float, end: float | None = None) -> float:
    """The weight decay of optimizer step `step` (0-based): `start` throughout when `end` is None, else half a
    cosine from `start` at step 0 towards `end`, without warmup, as DINO/iBOT's wd schedule (their per-iteration
    table: end + (start - end) * (1 + cos(pi * step / total_steps)) / 2, so the last step is just short of `end`)."""
    if end is None:
        return start
    progress = min(1.0, max(0, step) / max(1, total_steps))
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_weight_decay(optimizer: torch.optim.Optimizer, weight_decay: float) -> None:
    """Set the decayed groups' weight decay; the no-decay group (biases, norms, tokens) stays at 0."""
    for group in optimizer.param_groups:
        if group.get("group") != "no_decay":
            group["weight_decay"] = weight_decay
