"""Reading and writing weight files without executing code, and the mimkit checkpoint a method is saved as.

Everything that reads weights goes through `read_state_file`: safetensors, or `torch.load(weights_only=True)`
whose restricted unpickler refuses any object that is not a tensor or a plain value.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mimkit.engine.checkpoint import FORMAT, VERSION, CheckpointError, atomic_write, save_checkpoint_file, torch_load_file

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def save_method_checkpoint(method, cfg, data_meta: dict, path: str | Path, **extra) -> Path:
    """Write `method` as a mimkit checkpoint (the layout of `mimkit.engine.checkpoint`) at `path`, atomically.

    `cfg` is a PretrainConfig (or its plain dict); `data_meta` is {"img_size": [H, W], "channels": C,
    "mean": [...], "std": [...]}. `extra` entries (e.g. progress, source) are stored beside them.
    """
    config = cfg.model_dump(mode="json") if hasattr(cfg, "model_dump") else dict(cfg)
    img_size = data_meta["img_size"]
    img_size = [int(img_size), int(img_size)] if isinstance(img_size, int) else [int(v) for v in img_size]
    data = {
        "img_size": img_size,
        "channels": int(data_meta["channels"]),
        "mean": [float(v) for v in data_meta["mean"]],
        "std": [float(v) for v in data_meta["std"]],
    }
    if len(data["mean"]) != data["channels"] or len(data["std"]) != data["channels"]:
        raise ValueError(f"mean/std need one value per channel ({data['channels']}), got {data['mean']} / {data['std']}")
    state = {k: v.detach().cpu().contiguous() for k, v in method.state_dict().items()}
    ckpt = {"format": FORMAT, "version": VERSION, "config": config, "data": data, "model": state, **extra}
    path = Path(path)
    save_checkpoint_file(ckpt, path)  # with the checksum `load_checkpoint` verifies
    return path


def torch_load_safe(path: str | Path):
    """`torch.load(weights_only=True)` on the CPU with one clear error for any unusable file (engine.checkpoint.
    torch_load_file: not a torch file, truncated, damaged, or holding objects that could execute code).

    `argparse.Namespace` is also allowed (facebookresearch/mae stores its run arguments in training
    checkpoints); it only carries plain values and runs no code when rebuilt.
    """
    return torch_load_file(path, what="weights file", safe_globals=[argparse.Namespace])


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"file not found: {path}")
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read safetensors file {path}: {err}") from None


def read_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} dict from .safetensors or a torch file (a state dict, or {"model"/"state_dict": ...})."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    obj = torch_load_safe(path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        raise CheckpointError(f"{path} is already a mimkit checkpoint: use it as it is (this reader is for foreign weights)")
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state dict (expected {{name: tensor}} or {{'model': {{name: tensor}}}})")
    return dict(obj)


def write_safetensors(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}  # no shared storage
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata or {"format": "pt"}))


def write_json(obj: dict, path: str | Path) -> None:
    text = json.dumps(obj, indent=2) + "\n"

    def write(tmp):
        with open(tmp, "w") as fh:
            fh.write(text)

    atomic_write(path, write)


def read_json(path: str | Path) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None
