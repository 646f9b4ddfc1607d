"""Weights from local files only: the Hugging Face cache without network requests, tensors without code."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from mimkit.backends.runs import CheckpointError


@contextlib.contextmanager
def hub_offline():
    """Only files already in the local Hugging Face cache: no network requests while creating a timm model."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


@contextlib.contextmanager
def quiet_root_logger():
    import logging

    before = logging.root.level
    logging.root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logging.root.setLevel(before)


def hf_folder(name: str) -> Path:
    """A local folder, or a hub name's snapshot in the local Hugging Face cache (never downloaded)."""
    folder = Path(name).expanduser()
    if folder.exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1:
        return folder
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception as err:  # noqa: BLE001 - not cached / invalid repo id, reported the same way
        raise CheckpointError(
            f"hf:{name}: no folder {name!r} and no cached Hugging Face model {name!r} ({type(err).__name__}); "
            f"weights are read locally only: fetch it once (e.g. `hf download {name}`) or give "
            "hf:<folder> (config.json + weights)") from err


def torch_weights(path: Path, spec: str) -> dict[str, torch.Tensor]:
    """Tensors only: safetensors, or torch.load(weights_only=True) (a pickle that needs code is refused)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unreadable / code-carrying files, reported the same way
        raise CheckpointError(
            f"{spec}: cannot read weights from {path} ({type(err).__name__}: {err}); only tensors are loaded "
            "(safetensors or a plain state_dict; OpenAI's TorchScript .pt archives need converting)") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # open_clip training checkpoints
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{spec}: {path} holds a {type(state).__name__}, not a state_dict")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
