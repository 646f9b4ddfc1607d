"""The training state in a checkpoint: written atomically with a checksum and never with non-finite values,
read back into the loop exactly (weights, optimizer, scaler, RNG, progress, NaN guard, callbacks)."""

from __future__ import annotations

import shutil

import torch

from mimkit.engine import checkpoint as ckpt_io
from mimkit.engine.errors import TrainingDiverged
from mimkit.engine.resume import rng_state, set_rng_state


def nonfinite(tensors, loop) -> bool:
    """True when any floating tensor holds a NaN or an inf, on any rank (one decision for every rank)."""
    checks = [torch.isfinite(t).all() for t in tensors if t is not None and t.is_floating_point() and t.numel()]
    bad = torch.zeros((), device=loop.fabric.device)
    if checks:
        bad = (~torch.stack([c.to(bad.device) for c in checks]).all()).to(bad.dtype)
    if loop.world > 1:
        bad = loop.fabric.all_reduce(bad, reduce_op="sum")
    return bool(bad.item() > 0)


def optimizer_tensors(optimizer):
    """This rank's optimizer state tensors, read from the torch optimizer itself (Fabric's state_dict() would
    gather the full state under FSDP, a collective)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    for state in inner.state.values():
        yield from (v for v in state.values() if torch.is_tensor(v))


def nonfinite_state_names(loop) -> list[str]:
    """Names of the method's weights and buffers (and "optimizer state") holding NaN/inf, on this rank."""
    bad = [n for n, t in loop.method.state_dict().items()
           if t.is_floating_point() and t.numel() and not torch.isfinite(t).all()]
    if any(not torch.isfinite(t).all() for t in optimizer_tensors(loop.optimizer) if t.is_floating_point()):
        bad.append("optimizer state")
    return bad


def save(loop, keep_copy: bool = False) -> None:
    """Write checkpoints/last.ckpt atomically (all ranks call; rank 0 renames the finished temp file), refusing
    non-finite weights or optimizer state."""
    fabric = loop.fabric
    # this rank's parameters and buffers (shards under FSDP) and optimizer state
    tensors = [*loop.model.parameters(), *loop.model.buffers(), *optimizer_tensors(loop.optimizer)]
    if nonfinite(tensors, loop):
        names = nonfinite_state_names(loop)
        raise TrainingDiverged(
            f"refusing to write {loop.last_ckpt} at step {loop.step}: non-finite values in "
            f"{', '.join(names[:8]) or 'another rank'}{' ...' if len(names) > 8 else ''}; the last checkpoint "
            f"(step {loop.saved_step}) is left as it was")
    if loop.rank0:
        loop.ckpt_dir.mkdir(parents=True, exist_ok=True)
    fabric.barrier()
    tmp = ckpt_io.temp_path(loop.last_ckpt)
    state = {
        "format": ckpt_io.FORMAT, "version": ckpt_io.VERSION,
        "config": loop.resolved.model_dump(mode="json"), "data": loop.data_meta,
        "progress": {"global_step": loop.step, "epoch": loop.epoch, "position": loop.position,
                     "total_steps": loop.total_steps},
        "rng": rng_state(), "metrics": {k: float(v) for k, v in loop.last_metrics.items()},
        "nan_guard": {"lr_scale": float(loop.lr_scale), "rollbacks": int(loop.nan_rollbacks)},
    }
    if loop.scaler is not None:
        state["scaler"] = loop.scaler.state_dict()
    callback_states = loop.callbacks.state_dicts()
    if callback_states:
        state["callbacks"] = callback_states
    loop.callbacks.call("on_save_checkpoint", state)
    try:
        if loop.is_fsdp:  # FSDP gathers the full state dicts inside fabric.save; the checksum is added after
            fabric.save(tmp, {**state, "model": loop.model, "optimizer": loop.optimizer})
            if loop.rank0:
                torch.save(ckpt_io.with_checksum(torch.load(tmp, map_location="cpu", weights_only=True)), tmp)
        else:
            state["model"] = loop.method.state_dict()
            state["optimizer"] = loop.optimizer.optimizer.state_dict()
            fabric.save(tmp, ckpt_io.with_checksum(state) if loop.rank0 else state)
        if loop.rank0:
            ckpt_io.commit_file(tmp, loop.last_ckpt)
            if keep_copy:
                copy = loop.ckpt_dir / f"epoch_{loop.epoch:04d}.ckpt"
                ckpt_io.atomic_write(copy, lambda t: shutil.copyfile(loop.last_ckpt, t))
    finally:
        if loop.rank0 and tmp.exists():
            tmp.unlink()
    fabric.barrier()
    loop.saved_step = loop.step


def restore(loop, ckpt_path, ckpt: dict, weights_loaded: bool = False) -> None:
    """Load weights (unless `weights_loaded`), optimizer, scaler, RNG states, progress, NaN-guard state and
    callback states from a checkpoint (every rank reads the same file)."""
    if loop.is_fsdp:
        loop.fabric.load(ckpt_path, {"model": loop.model, "optimizer": loop.optimizer}, strict=False)
    else:
        if not weights_loaded:
            ckpt_io.load_state_strict(loop.method, ckpt["model"], str(ckpt_path))
        loop.optimizer.optimizer.load_state_dict(ckpt["optimizer"])
    if loop.scaler is not None and ckpt.get("scaler"):
        loop.scaler.load_state_dict(ckpt["scaler"])
    if ckpt.get("rng"):
        set_rng_state(ckpt["rng"])
    progress = {"global_step": 0, "epoch": 0, "position": 0}
    progress.update({k: int(v) for k, v in ckpt["progress"].items() if k in progress})
    loop.step, loop.epoch, loop.position = progress["global_step"], progress["epoch"], progress["position"]
    loop.last_metrics = dict(ckpt.get("metrics") or {})
    guard = ckpt.get("nan_guard") or {}
    loop.lr_scale = float(guard.get("lr_scale", 1.0))
    loop.nan_rollbacks = int(guard.get("rollbacks", 0))
    loop.history = [h for h in loop.history if h["step"] <= loop.step]
    loop.callbacks.load_state_dicts(ckpt.get("callbacks") or {})
    loop.callbacks.call("on_load_checkpoint", ckpt)
