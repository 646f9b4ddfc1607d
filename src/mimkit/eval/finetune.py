"""End-to-end fine-tuning, from the pretrained weights or from random initialisation.

Recipe (timm utilities): AdamW over `timm.optim.param_groups_layer_decay` groups (layer-wise lr decay, no
weight decay on biases / norms / class token), lr = blr * batch / 256 with warmup + cosine
(`timm.scheduler.CosineLRScheduler`, per step), stochastic depth (`timm.layers.DropPath` in every block),
`timm.data.Mixup` (mixup + cutmix + label smoothing) with `timm.loss.SoftTargetCrossEntropy`, flips and small
translations, and a mean-pooled patch feature with LayerNorm + Linear head (MAE's `global_pool`).
`RECIPES` names two settings of these knobs: "imagenet" (MAE's) and "small" (a few CPU minutes);
`finetune_sweep` trains one model per base lr and keeps the one with the best validation accuracy.
"""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

from mimkit.eval.features import _collate


class Classifier(nn.Module):
    """encoder tokens [B, 1 + N, D] -> pooled ("mean" patches or "cls") -> LayerNorm -> Linear."""

    def __init__(self, encoder: nn.Module, num_classes: int, pool: str = "mean"):
        super().__init__()
        self.encoder, self.pool = encoder, pool
        self.fc_norm = nn.LayerNorm(encoder.embed_dim, eps=1e-6)
        self.head = nn.Linear(encoder.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.encoder(images)
        x = x[:, 1:].mean(1) if self.pool == "mean" else x[:, 0]
        return self.head(self.fc_norm(x))

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer ids for timm's layer decay: embeddings first, one per block, the final norm (and a CLIP
        projection) with the last block, the classifier last. Names of every encoder kind mimkit.backends loads:
        mimkit and timm ViTs (`blocks.i`), transformers ViT (`layers.i`; `encoder.layer.i` before transformers 5),
        DINOv2 (`encoder.layer.i`), CLIP / SigLIP
        (`encoder.layers.i`, under `vision_model.` in a CLIP with projection), open_clip (`visual.transformer.
        resblocks.i`). tests/eval/test_finetune_layer_decay.py checks each against the model's own blocks."""
        tower = r"^encoder\.model\.(?:vision_model\.|visual\.)?"
        return dict(
            stem=tower + r"(?:cls_token|reg_token|pos_embed|patch_embed|embeddings|pre_layrnorm|class_embedding|"
                         r"positional_embedding|conv1|ln_pre)",
            blocks=[(tower + r"(?:blocks|layers|encoder\.layers?|transformer\.resblocks)\.(\d+)\.", None),
                    (tower + r"(?:norm|layernorm|post_layernorm|ln_post|proj|head)\b", (99999,)),
                    (r"^encoder\.model\.visual_projection\.", (99999,))],
        )


# tokens and position tables (biases and norms are 1-D, which timm already spares): timm and mimkit, DINOv2,
# transformers CLIP / SigLIP (an nn.Embedding), open_clip
NO_WEIGHT_DECAY = ("cls_token", "pos_embed", "reg_token", "mask_token", "position_embeddings",
                   "position_embedding.weight", "class_embedding", "positional_embedding")


def set_drop_path(encoder: nn.Module, rate: float) -> int:
    """Stochastic depth rising linearly to `rate` over the timm Blocks; returns how many blocks got it."""
    from timm.layers import DropPath

    blocks = [m for m in encoder.modules() if hasattr(m, "drop_path1") and hasattr(m, "drop_path2")]
    for i, b in enumerate(blocks):
        p = rate * i / max(1, len(blocks) - 1)
        b.drop_path1 = DropPath(p) if p > 0 else nn.Identity()
        b.drop_path2 = DropPath(p) if p > 0 else nn.Identity()
    return len(blocks)


def random_init(encoder: nn.Module) -> nn.Module:
    """A copy of the (wrapped) encoder with the same architecture and freshly initialised weights."""
    from mimkit.backends import HFEncoder, MimkitEncoder, OpenClipEncoder, TimmEncoder
    from mimkit.models.vit import VisionTransformer

    enc = copy.deepcopy(encoder)
    if isinstance(enc, MimkitEncoder):
        m = enc.model
        enc.model = VisionTransformer(m.grid.img_size, m.grid.patch_size, m.grid.in_chans, m.embed_dim, m.depth,
                                      m.num_heads, m.mlp_ratio, timm_name=m.timm_name)
    elif isinstance(enc, TimmEncoder):
        enc.model.init_weights()
    elif isinstance(enc, HFEncoder):
        enc.model.apply(enc.model._init_weights)
    elif isinstance(enc, OpenClipEncoder):
        _reinit_open_clip(enc.model.visual)
    else:
        raise TypeError(f"cannot re-initialise a {type(enc).__name__}")
    return enc


def _reinit_open_clip(visual: nn.Module) -> None:
    """open_clip's image tower as its constructor leaves it: each layer's own default init, and the class token,
    position table and projection drawn from N(0, width^-1)."""
    for m in visual.modules():
        if isinstance(m, nn.MultiheadAttention):
            m._reset_parameters()  # its public name is missing; in_proj_weight is the MHA's own
        elif m is not visual and hasattr(m, "reset_parameters"):
            m.reset_parameters()
    with torch.no_grad():
        scale = visual.class_embedding.shape[-1] ** -0.5
        for name in ("class_embedding", "positional_embedding", "proj"):
            p = getattr(visual, name, None)
            if isinstance(p, nn.Parameter):
                p.copy_(torch.randn_like(p) * scale)


def _accuracy(model: nn.Module, loader, device) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in loader:
            pred = model(batch["image"].to(device)).argmax(-1).cpu()
            correct += int((pred == batch["label"]).sum())
            total += batch["label"].numel()
    return correct / max(1, total)


def _shift(x: torch.Tensor, pixels: int) -> torch.Tensor:
    """Each image translated by up to `pixels` in x and y (zero padding, i.e. the normalised mean)."""
    h, w = x.shape[-2:]
    padded = nn.functional.pad(x, (pixels,) * 4)
    dy, dx = torch.randint(0, 2 * pixels + 1, (2, x.shape[0]), device=x.device).tolist()
    return torch.stack([padded[i, :, a:a + h, b:b + w] for i, (a, b) in enumerate(zip(dy, dx))])


# Named recipes (`eval.finetune_recipe`); `eval.finetune_*` fields left at None take the recipe's value.
# "imagenet": MAE's fine-tuning regularisation (mixup 0.8, cutmix 1.0, smoothing 0.1, drop path 0.1, layer decay
# 0.75), which needs hundreds of epochs. "small": chosen on a validation split carved from Fashion-MNIST's
# training images for a budget of a few CPU minutes (benchmarks/finetune_search.py,
# benchmarks/results/finetune_search.json), the same for from-pretrained and from-scratch runs.
RECIPES: dict[str, dict] = {
    "imagenet": dict(epochs=5, max_steps=0, batch_size=128, blrs=[1e-3], weight_decay=0.05, layer_decay=0.75,
                     drop_path=0.1, mixup=0.8, cutmix=1.0, smoothing=0.1, shift=0),
    "small": dict(epochs=50, max_steps=200, batch_size=64, blrs=[3e-3, 1e-2], weight_decay=0.05, layer_decay=0.75,
                  drop_path=0.0, mixup=0.0, cutmix=0.0, smoothing=0.0, shift=0),
}
RECIPE_FIELDS = {"epochs": "finetune_epochs", "max_steps": "finetune_max_steps", "batch_size": "finetune_batch_size",
                 "blrs": "finetune_blrs", "weight_decay": "finetune_weight_decay", "layer_decay": "layer_decay",
                 "drop_path": "drop_path", "mixup": "mixup", "cutmix": "cutmix", "smoothing": "smoothing",
                 "shift": "finetune_shift"}


def recipe_settings(cfg) -> dict:
    """The fine-tuning settings an `EvalConfig` asks for: its recipe's values, overridden by every eval.* field
    that is set (not None). max_steps 0 means no cap (epochs alone)."""
    if cfg.finetune_recipe not in RECIPES:
        raise ValueError(f"eval.finetune_recipe={cfg.finetune_recipe!r}: choose one of {', '.join(RECIPES)}")
    out = dict(RECIPES[cfg.finetune_recipe])
    for key, field in RECIPE_FIELDS.items():
        value = getattr(cfg, field)
        if value is not None:
            out[key] = list(value) if key == "blrs" else value
    out["max_steps"] = out["max_steps"] or None
    return out


def train_classifier(encoder: nn.Module, train_data, num_classes: int, *, from_scratch: bool = False,
                     epochs: float = 5, max_steps: int | None = None, batch_size: int = 128, blr: float = 1e-3,
                     weight_decay: float = 0.05, layer_decay: float = 0.75, drop_path: float = 0.1,
                     mixup: float = 0.8, cutmix: float = 1.0, smoothing: float = 0.1, shift: int = 0,
                     warmup_fraction: float = 0.1, hflip: bool = True, pool: str = "mean",
                     device: str | torch.device = "cpu", seed: int = 0) -> tuple[Classifier, dict]:
    """Fine-tune a copy of `encoder` (the caller's stays untouched) on `train_data` alone: (model, record)."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import param_groups_layer_decay
    from timm.scheduler import CosineLRScheduler

    start = time.perf_counter()
    torch.manual_seed(seed)
    np.random.seed(seed)  # timm's Mixup draws its lambdas and mixup/cutmix choice from numpy's global RNG
    enc = random_init(encoder) if from_scratch else copy.deepcopy(encoder)
    drop_blocks = set_drop_path(enc, drop_path)
    model = Classifier(enc, num_classes, pool).to(device)
    # requires_grad is the encoder's own: mimkit's fixed sin-cos position table stays frozen, as in MAE

    bs = min(batch_size, len(train_data)) // 2 * 2  # Mixup needs an even batch
    loader = DataLoader(train_data, batch_size=bs, shuffle=True, drop_last=True, collate_fn=_collate,
                        generator=torch.Generator().manual_seed(seed))
    full = int(math.ceil(epochs * len(loader)))
    steps = full if max_steps is None else min(max_steps, full)

    lr = blr * bs / 256
    no_wd = [n for n, _ in model.named_parameters() if n.endswith(NO_WEIGHT_DECAY)]
    groups = param_groups_layer_decay(model, weight_decay, no_weight_decay_list=no_wd, layer_decay=layer_decay)
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))
    sched = CosineLRScheduler(opt, t_initial=steps, lr_min=1e-6, warmup_t=max(1, int(warmup_fraction * steps)),
                              warmup_lr_init=1e-6, t_in_epochs=False)
    mix = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=smoothing, num_classes=num_classes) \
        if (mixup > 0 or cutmix > 0) else None
    criterion = SoftTargetCrossEntropy() if mix else (
        LabelSmoothingCrossEntropy(smoothing) if smoothing > 0 else nn.CrossEntropyLoss())

    step, losses = 0, []
    while step < steps:
        model.train()
        for batch in loader:
            if step >= steps:
                break
            x, y = batch["image"].to(device), batch["label"].to(device)
            if hflip:
                flip = torch.rand(x.shape[0], device=device) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            if shift:
                x = _shift(x, shift)
            if mix:
                x, y = mix(x, y)
            loss = criterion(model(x), y)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"fine-tuning loss is {loss.item()} at step {step}; lower the lr (blr={blr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            sched.step_update(step)
            losses.append(loss.item())
    k = max(1, min(10, len(losses) // 5))
    return model, {
        "from_scratch": from_scratch, "steps": step, "epochs": step / max(1, len(loader)), "batch_size": bs,
        "lr": lr, "blr": blr, "weight_decay": weight_decay, "layer_decay": layer_decay, "drop_path": drop_path,
        "drop_path_blocks": drop_blocks, "mixup": mixup, "cutmix": cutmix, "smoothing": smoothing, "shift": shift,
        "loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k, "train_size": len(train_data),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad), "seed": seed,
        "seconds": time.perf_counter() - start,
    }


def _loader(data):
    return DataLoader(data, batch_size=256, collate_fn=_collate)


def finetune(encoder: nn.Module, train_data, test_data, num_classes: int, *, train_limit: int | None = None,
             test_limit: int | None = None, device: str | torch.device = "cpu", seed: int = 0, **recipe) -> dict:
    """Fine-tune a copy of `encoder` with one setting (`train_classifier`'s keywords) and score it on `test_data`
    at the end. Nothing is chosen, so the test split only gives the final figure. Returns the training record
    with "test_acc" and "test_size"."""
    if train_limit is not None and train_limit < len(train_data):
        g = torch.Generator().manual_seed(seed)
        train_data = Subset(train_data, torch.randperm(len(train_data), generator=g)[:train_limit].tolist())
    if test_limit is not None and test_limit < len(test_data):
        test_data = Subset(test_data, range(test_limit))
    model, record = train_classifier(encoder, train_data, num_classes, device=device, seed=seed, **recipe)
    return {"test_acc": _accuracy(model, _loader(test_data), device), **record, "test_size": len(test_data)}


def finetune_sweep(encoder: nn.Module, train_data, val_data, test_data, num_classes: int, blrs, *,
                   device: str | torch.device = "cpu", seed: int = 0, **recipe) -> dict:
    """One fine-tune per base lr on `train_data`; the lr with the best `val_data` accuracy (ties: the first)
    is chosen and only its model is scored on `test_data`, so nothing about the test split affects the
    choice. `val_data` may be None with a single lr (then "val_acc" is None). Returns {"test_acc", "blr", "val_acc", "sweep": [{"blr",
    "val_acc", ...record}], "chosen": record, "val_size", "test_size", "seconds"}."""
    blrs = [float(b) for b in blrs]
    if not blrs:
        raise ValueError("no fine-tuning learning rate given (eval.finetune_blrs)")
    if val_data is None and len(blrs) > 1:
        raise ValueError(f"choosing among {len(blrs)} learning rates needs a validation split")
    start = time.perf_counter()
    best, sweep = None, []
    for blr in blrs:
        model, record = train_classifier(encoder, train_data, num_classes, blr=blr, device=device, seed=seed,
                                         **recipe)
        val_acc = _accuracy(model, _loader(val_data), device) if val_data is not None else None
        sweep.append({"val_acc": val_acc, **record})
        if best is None or val_acc > best[0]:  # val_acc is None only when there is one lr
            best = (val_acc, model, record)
        del model
    val_acc, model, record = best
    return {"test_acc": _accuracy(model, _loader(test_data), device), "blr": record["blr"], "val_acc": val_acc,
            "from_scratch": record["from_scratch"], "steps": record["steps"], "sweep": sweep, "chosen": record,
            "val_size": len(val_data) if val_data is not None else 0, "test_size": len(test_data),
            "seconds": time.perf_counter() - start}
