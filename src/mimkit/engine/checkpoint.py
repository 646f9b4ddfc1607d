"""Checkpoint files: written atomically, read without executing code, turned back into a method.

Layout of a mimkit checkpoint (a dict saved with torch.save, holding only tensors and plain values):
  format: "mimkit-checkpoint", version: 1
  config: PretrainConfig as a plain dict
  data:   {"img_size": [H, W], "channels": C, "mean": [...], "std": [...]}
  model:  the method's state dict (encoder.* are timm-compatible ViT weights)
  optimizer, progress, ... : training state, present in checkpoints written by the engine:
    optimizer: AdamW state dict; scaler: GradScaler state (16-mixed only);
    progress: {"global_step", "epoch", "position" (samples of `epoch` consumed, all ranks), "total_steps"};
    rng: {"torch": ByteTensor, "cuda": [ByteTensor, ...], "python": random.getstate()} of rank 0;
    metrics: the last logged scalars;
    nan_guard: {"lr_scale": product of trainer.nan_lr_factor so far, "rollbacks": NaN rollbacks so far}
    (absent in older files: 1.0 and 0);
    callbacks: {state_key: state} of the run's callbacks that keep state (engine.callbacks)
  checksum: "crc32:XXXXXXXX" over every tensor's bytes, dtype, shape and place (absent in
    files written before it existed, which still load); verified on every load, so a file damaged on disk
    is reported instead of trained on.

Crash safety: a file is written under a temporary name in its own folder (`.NAME.tmp`, or `.NAME.<random>.tmp`
for `atomic_write`), fsynced, then renamed over the final name and the folder fsynced. A process killed at any
moment leaves either the old file or the new one under the final name, never a partial one; the temporary
leftovers are ignored by readers and deleted by `remove_stale_temps` when the next run starts.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zlib
from pathlib import Path

import torch

FORMAT = "mimkit-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the reason."""


def commit_file(tmp: str | Path, path: str | Path) -> None:
    """Make the finished file `tmp` durable, then rename it onto `path` (atomic on POSIX) and sync the folder."""
    path = Path(path)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def temp_path(path: str | Path) -> Path:
    """The temporary name a file is written under before `commit_file` (hidden, same folder, `.tmp` suffix).

    Deterministic, so that every process of a distributed run agrees on it.
    """
    path = Path(path)
    return path.parent / f".{path.name}.tmp"


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete temporary files a killed run left behind in `folder` (never a finished checkpoint)."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for p in folder.glob(".*.tmp"):
            if p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write) -> None:
    """Call `write(tmp_path)`, then rename into place: readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets the modes open() would give it
    try:
        write(tmp)
        commit_file(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_torch_save(obj, path: str | Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _walk(obj, path: str, crc: int) -> int:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        crc = zlib.crc32(f"{path}|{t.dtype}|{tuple(t.shape)}|".encode(), crc)
        return zlib.crc32(t.reshape(-1).view(torch.uint8).numpy().data, crc) if t.numel() else crc
    if isinstance(obj, dict):
        for key in sorted(obj, key=str):
            crc = _walk(obj[key], f"{path}/{key}", crc)
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            crc = _walk(item, f"{path}/{i}", crc)
    return crc


def checksum(ckpt: dict) -> str:
    """CRC-32 of a checkpoint's tensor data: every tensor's bytes, dtype, shape and place in the checkpoint.
    Plain values (settings, progress) are left out, so a hand-edited config (a teacher that moved) still
    loads; damage there fails the unpickling or the settings' validation instead."""
    return f"crc32:{_walk({k: v for k, v in ckpt.items() if k != 'checksum'}, '', 0):08x}"


def with_checksum(ckpt: dict) -> dict:
    return {**ckpt, "checksum": checksum(ckpt)}


def save_checkpoint_file(ckpt: dict, path: str | Path) -> None:
    """Write a mimkit checkpoint dict atomically, with its checksum."""
    atomic_torch_save(with_checksum(ckpt), path)


# what a file that is not a torch.save file usually is, by its first bytes
_KNOWN_KINDS = (
    (b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
    (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"), (b"\x1f\x8b", "a gzip file"),
    (b"BM", "a BMP image"), (b"RIFF", "a RIFF (WebP/WAV) file"), (b"%PDF", "a PDF file"),
)


def _not_torch_file(path: Path, head: bytes) -> str | None:
    """Why `path` cannot be a torch.save file, from its first bytes (None when it may be one)."""
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return None  # torch's zip format, or the legacy pickle format
    if not head:
        return "it is empty"
    for magic, kind in _KNOWN_KINDS:
        if head.startswith(magic):
            return f"it is {kind}"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 28:
        return "it is a safetensors file (weights only, no run settings; import it with `mimkit import-mae`)"
    try:
        head.decode("utf-8")
        return "it is a text file"
    except UnicodeDecodeError:
        return "its first bytes are not those of a file written by torch.save"


def torch_load_file(path: str | Path, what: str = "checkpoint", safe_globals=()):
    """`torch.load(weights_only=True)` on the CPU, with one CheckpointError for anything that is not a whole,
    readable torch file: not found, another kind of file, truncated, damaged, or holding objects whose
    unpickling could execute code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    with open(path, "rb") as fh:
        head = fh.read(16)
    reason = _not_torch_file(path, head)
    if reason is not None:
        raise CheckpointError(f"{path} is not a {what}: {reason}")
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        reasons = [ln for ln in lines if "GLOBAL" in ln or "Unsupported global" in ln]
        if reasons:
            raise CheckpointError(
                f"refusing to load {path}: it holds objects other than tensors and plain values, and loading it "
                f"could execute code ({reasons[0]})") from None
        raise CheckpointError(f"cannot read {what} {path}: the file is damaged ({lines[-1] if lines else err!r})"
                              ) from None
    except MemoryError:
        raise
    except Exception as err:  # truncated or damaged files fail in many ways inside torch.load
        first = (str(err).splitlines() or [""])[0][:200]
        raise CheckpointError(f"cannot read {what} {path}: the file is damaged or truncated "
                              f"({type(err).__name__}: {first})") from None


def load_checkpoint(path: str | Path) -> dict:
    """Read a mimkit checkpoint on the CPU with `weights_only=True` (a file whose pickle would run code is
    refused) and verify its checksum; every kind of unusable file gives one CheckpointError naming it."""
    path = Path(path)
    ckpt = torch_load_file(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a mimkit checkpoint (no format={FORMAT!r} marker); "
            f"to import facebookresearch/mae weights use `mimkit.interop` (mimkit import-mae)"
        )
    version = ckpt.get("version", 0)
    if not isinstance(version, int):
        raise CheckpointError(f"{path} is damaged: its format version is {version!r}")
    if version > VERSION:
        raise CheckpointError(f"{path} was written by a newer mimkit (format version {version} > {VERSION})")
    stored = ckpt.get("checksum")
    if stored is not None:
        try:
            actual = checksum(ckpt)
        except Exception as err:  # a damaged tensor can fail to be read back as bytes
            raise CheckpointError(f"{path} is damaged: its content cannot be checksummed ({err})") from None
        if actual != stored:
            raise CheckpointError(
                f"{path} is damaged: its content does not match the checksum stored when it was written "
                f"({actual} != {stored!r}); use an earlier checkpoint (e.g. checkpoints/epoch_*.ckpt)")
    return ckpt


def load_state_strict(module: torch.nn.Module, state: dict, source: str) -> None:
    """load_state_dict that explains a mismatch: missing, unexpected and wrongly shaped keys, by name."""
    if not isinstance(state, dict):
        raise CheckpointError(f"weights in {source} are not a state dict (name -> tensor) but a {type(state).__name__}")
    not_tensors = sorted(str(k) for k, v in state.items() if not torch.is_tensor(v))
    if not_tensors:
        raise CheckpointError(f"weights in {source} hold {len(not_tensors)} value(s) that are not tensors: "
                              + ", ".join(not_tensors[:12]) + (" ..." if len(not_tensors) > 12 else ""))
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if tuple(own[k].shape) != tuple(state[k].shape)
    )
    if missing or unexpected or shapes:
        def show(items):
            return f"({len(items)}): " + ", ".join(items[:12]) + (
                f" ... (+{len(items) - 12} more)" if len(items) > 12 else "")
        parts = []
        if missing:
            parts.append(f"missing keys {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {show(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches {show(shapes)}")
        raise CheckpointError(f"weights in {source} do not fit this architecture; " + "; ".join(parts))
    module.load_state_dict(state)


def method_from_checkpoint(path: str | Path):
    """(method, config, checkpoint dict) with the method's weights loaded, on the CPU, in eval mode."""
    from mimkit.methods import build_method

    ckpt, cfg, img_size, channels = read_run(path)
    method = build_method(cfg, img_size, channels)
    load_state_strict(method, ckpt["model"], str(path))
    method.eval()
    return method, cfg, ckpt


def encoder_from_checkpoint(path: str | Path):
    """(encoder, config, checkpoint dict): the encoder alone, built from the model section and loaded from the
    `encoder.` weights, on the CPU, in eval mode. What evaluation and frozen teachers need: a distillation
    run's own teachers and tokenizers (rebuilt with its method, from paths that may have moved) are not
    loaded. Falls back to the whole method when its encoder is not the model section's plain one."""
    from mimkit.models.cnn import build_encoder

    ckpt, cfg, img_size, channels = read_run(path)
    encoder = build_encoder(cfg.model, img_size, channels)
    state = {k[len("encoder."):]: v for k, v in ckpt["model"].items() if k.startswith("encoder.")}
    try:
        load_state_strict(encoder, state, str(path))
    except CheckpointError:
        return method_from_checkpoint(path)[0].encoder, cfg, ckpt
    return encoder.eval(), cfg, ckpt


def read_run(path: str | Path):
    """(checkpoint, PretrainConfig, img_size, channels) of a mimkit checkpoint, with clear errors."""
    from mimkit.config import ConfigError, PretrainConfig, build_config

    ckpt = load_checkpoint(find_checkpoint(path))  # a run folder or a checkpoint file
    absent = [k for k in ("config", "data", "model") if not isinstance(ckpt.get(k), dict)]
    if absent:
        raise CheckpointError(f"{path} has no {', '.join(absent)} section (a truncated or hand-made checkpoint?)")
    try:
        cfg = build_config(PretrainConfig, ckpt["config"])
    except ConfigError as err:
        raise CheckpointError(f"the settings stored in {path} are not valid for this mimkit: {err}") from None
    data = ckpt["data"]
    try:
        img_size, channels = tuple(int(v) for v in data["img_size"]), int(data["channels"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: its data section lacks a valid img_size/channels ({err!r})") from None
    return ckpt, cfg, img_size, channels


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file from a file path, a run directory (its checkpoints/last.ckpt) or a checkpoints folder."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"no checkpoints/last.ckpt in run directory {path}")
    raise CheckpointError(f"checkpoint not found: {path} (give a .ckpt file, a run directory, or 'auto')")


def run_dir_of(checkpoint: str | Path) -> Path:
    """The run directory a checkpoint belongs to (the parent of its checkpoints/ folder)."""
    checkpoint = Path(checkpoint)
    parent = checkpoint.parent
    return parent.parent if parent.name == "checkpoints" else parent
