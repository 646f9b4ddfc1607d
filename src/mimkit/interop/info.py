"""What a mimkit checkpoint holds, without building the model: `checkpoint_info` and its text form."""

from __future__ import annotations

from pathlib import Path

import torch

from mimkit.engine.checkpoint import load_checkpoint

_STEP_KEYS = ("step", "global_step", "optimizer_step")
_EPOCH_KEYS = ("epoch", "epochs_done", "current_epoch")
_METRIC_KEYS = ("metrics", "last_metrics")


def _count(state: dict, prefix: str = "") -> int:
    return int(sum(v.numel() for k, v in state.items() if isinstance(v, torch.Tensor) and k.startswith(prefix)))


def _first(d: dict, keys) -> object:
    for k in keys:
        if k in d and d[k] is not None:
            return d[k]
    return None


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def checkpoint_info(path: str | Path) -> dict:
    """A plain dict describing a mimkit checkpoint: method, architecture, parameter counts, data, progress."""
    path = Path(path)
    ckpt = load_checkpoint(path)
    cfg = ckpt.get("config") or {}
    model_cfg, method_cfg = cfg.get("model") or {}, cfg.get("method") or {}
    data = ckpt.get("data") or {}
    state = ckpt.get("model") or {}
    enc_w = state.get("encoder.patch_embed.proj.weight")
    patch = list(enc_w.shape[2:]) if isinstance(enc_w, torch.Tensor) else [model_cfg.get("patch_size")] * 2
    encoder = _count(state, "encoder.")
    total = _count(state)
    fixed = _count({k: v for k, v in state.items() if k.endswith("pos_embed")})

    progress = ckpt.get("progress") if isinstance(ckpt.get("progress"), dict) else {}
    step = _first(progress, _STEP_KEYS)
    if step is None:
        step = _first(ckpt, _STEP_KEYS)
    epoch = _first(progress, _EPOCH_KEYS)
    if epoch is None:
        epoch = _first(ckpt, _EPOCH_KEYS)
    metrics = _first(ckpt, _METRIC_KEYS)  # the trainer stores the last logged scalars at the top level
    if metrics is None:
        metrics = _first(progress, _METRIC_KEYS)
    total_steps = progress.get("total_steps")

    info = {
        "path": str(path),
        "file_size": path.stat().st_size,
        "format_version": ckpt.get("version"),
        "method": method_cfg.get("name"),
        "method_config": {k: v for k, v in method_cfg.items() if k != "name"},
        "encoder": model_cfg.get("encoder"),
        "decoder": {k: model_cfg.get(k) for k in ("decoder", "decoder_depth", "decoder_dim", "decoder_heads")},
        "params": {
            "encoder": encoder,
            "decoder": _count(state, "decoder."),
            "other": total - encoder - _count(state, "decoder."),
            "total": total,
            "fixed": fixed,
        },
        "img_size": list(data.get("img_size") or []),
        "channels": data.get("channels"),
        "patch_size": patch,
        "mean": data.get("mean"),
        "std": data.get("std"),
        "step": _plain(step),
        "total_steps": _plain(total_steps),
        "epoch": _plain(epoch),
        "metrics": _plain(metrics) if isinstance(metrics, dict) else None,
        "has_optimizer_state": "optimizer" in ckpt,
        "source": _plain(ckpt.get("source")) if isinstance(ckpt.get("source"), dict) else None,
    }
    return info


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M ({n:,})"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def format_info(info: dict) -> str:
    """`checkpoint_info`'s dict as aligned lines for a terminal."""
    p = info["params"]
    dec = info.get("decoder") or {}
    dec_text = dec.get("decoder") or "-"
    overrides = [f"{k.split('_')[1]}={v}" for k, v in dec.items() if k != "decoder" and v is not None]
    if overrides:
        dec_text += " (" + ", ".join(overrides) + ")"
    method = info.get("method") or "?"
    if info.get("method_config"):
        method += " (" + ", ".join(f"{k}={_fmt(v)}" for k, v in info["method_config"].items()) + ")"
    h_w = "x".join(str(v) for v in info.get("img_size") or []) or "?"
    rows = [
        ("checkpoint", info["path"]),
        ("file size", _size(info["file_size"])),
        ("method", method),
        ("encoder", info.get("encoder") or "?"),
        ("decoder", dec_text),
        ("params encoder", _millions(p["encoder"])),
        ("params decoder", _millions(p["decoder"])),
        ("params total", _millions(p["total"]) + (f", of which fixed pos-embed {p['fixed']:,}" if p.get("fixed") else "")),
        ("image size", f"{h_w}, {info.get('channels')} channel(s)"),
        ("patch size", "x".join(str(v) for v in info.get("patch_size") or [])),
        ("mean", _fmt(info.get("mean"))),
        ("std", _fmt(info.get("std"))),
    ]
    if info.get("step") is not None or info.get("epoch") is not None:
        prog = []
        if info.get("step") is not None:
            total = f"/{info['total_steps']}" if info.get("total_steps") is not None else ""
            prog.append(f"step {info['step']}{total}")
        if info.get("epoch") is not None:
            prog.append(f"epoch {_fmt(info['epoch'])}")
        rows.append(("progress", ", ".join(prog)))
    else:
        rows.append(("progress", "none recorded (not a training checkpoint)"))
    if info.get("metrics"):
        rows.append(("last metrics", ", ".join(f"{k}={_fmt(v)}" for k, v in info["metrics"].items())))
    if info.get("has_optimizer_state"):
        rows.append(("optimizer state", "yes (resumable)"))
    if info.get("source"):
        src = info["source"]
        rows.append(("imported from", f"{src.get('kind', '?')}: {src.get('path', '?')} (decoder {src.get('decoder', '?')})"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
