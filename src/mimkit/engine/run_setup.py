"""Getting a run ready on every rank: its folder, its settings (the stored ones on resume), data, method,
optimizer and, on resume, the restored training state; then the Loop that trains it."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from mimkit.config import ConfigError, PretrainConfig, to_yaml
from mimkit.data.build import fit_batch_to_data
from mimkit.engine import checkpoint as ckpt_io
from mimkit.engine import state as train_state
from mimkit.engine.callbacks import default_callbacks
from mimkit.engine.loop import Loop
from mimkit.engine.optim import build_optimizer, no_decay_names, warmup_steps
from mimkit.engine.resume import reconcile, resolved_config
from mimkit.engine.setup import new_run_dir, resolve_resume


def _run_folder(loop: Loop, cfg: PretrainConfig, resume, allow_change: bool):
    """(run_dir, checkpoint path or None, loaded checkpoint or None, the settings to train with)."""
    fabric = loop.fabric
    ckpt_path = resolve_resume(resume, cfg)
    if resume is not None and ckpt_path is None:
        loop.print(f"resume={resume!r}: no checkpoint found, starting a new run")
    if ckpt_path is not None:
        ckpt = ckpt_io.load_checkpoint(ckpt_path)
        if not isinstance(ckpt.get("config"), dict):
            raise ckpt_io.CheckpointError(f"{ckpt_path} has no config section (a truncated or hand-made checkpoint?)")
        cfg, changes = reconcile(ckpt["config"], cfg, ckpt_path, allow_change)
        if changes:
            loop.print(f"resuming {ckpt_path} with changed settings: " + "; ".join(changes))
        return ckpt_io.run_dir_of(ckpt_path), ckpt_path, ckpt, cfg
    run_dir = new_run_dir(cfg) if loop.rank0 else None
    run_dir = Path(fabric.broadcast(str(run_dir) if run_dir else None, src=0))
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        raise ConfigError(f"run directory {run_dir} already holds {last}; pass resume='auto' (or the path) to "
                          f"continue it, or choose another trainer.run_name")
    return run_dir, None, None, cfg


def prepare(fabric, cfg: PretrainConfig, resume, data, method, callbacks, allow_change: bool = False) -> Loop:
    loop = Loop(fabric, cfg, default_callbacks(list(callbacks or ())))
    tc, oc = cfg.trainer, cfg.optim
    run_dir, ckpt_path, ckpt, cfg = _run_folder(loop, cfg, resume, allow_change)
    loop.cfg, tc, oc = cfg, cfg.trainer, cfg.optim
    world, acc = loop.world, oc.accumulate
    if oc.batch_size % (world * acc):
        raise ConfigError(
            f"optim.batch_size={oc.batch_size} (the global batch per optimizer step) must be divisible by "
            f"world size x optim.accumulate = {world} x {acc} = {world * acc} "
            f"(world size = trainer.devices x trainer.num_nodes); per-device batch = batch_size / that")
    loop.micro = oc.batch_size // (world * acc)
    loop.run_dir, loop.ckpt_dir = run_dir, run_dir / "checkpoints"
    loop.last_ckpt = loop.ckpt_dir / "last.ckpt"
    created = loop.rank0 and not run_dir.exists()
    try:
        _prepare_in(loop, cfg, ckpt_path, ckpt, data, method)
    except BaseException:
        # a failed start leaves no empty run folder behind (checkpoints/ is only made by the first save)
        if created and run_dir.is_dir() and not any(p.is_file() for p in run_dir.rglob("*")):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return loop


def _prepare_in(loop: Loop, cfg: PretrainConfig, ckpt_path, ckpt, data, method) -> None:
    fabric, tc, oc, run_dir = loop.fabric, cfg.trainer, cfg.optim, loop.run_dir
    if loop.rank0:
        ckpt_io.remove_stale_temps(loop.ckpt_dir)
        ckpt_io.remove_stale_temps(run_dir)  # config.yaml's, if a run was killed while writing it
    fabric.barrier()

    # data and method, identically initialised on every rank
    from lightning.fabric.utilities.seed import seed_everything

    seed_everything(tc.seed, verbose=False)
    if data is None:
        from mimkit.data import build_pretrain_data

        with fabric.rank_zero_first():
            data = build_pretrain_data(cfg.data, report_dir=run_dir)
    from mimkit.methods import build_method, method_class

    specs = method_class(cfg.method.name).view_specs(cfg.method)
    if specs:  # methods that compare augmented views get them from the loader
        data = data.with_views(specs, cfg.data.crop_ratio)
    loop.data = data
    n_train = len(data.train)
    if ckpt is None and n_train < oc.batch_size:
        # a small folder of photos just trains: one step per epoch of every image there is, and the run says so
        # (the lowered batch is what config.yaml and the checkpoint record, so a resume keeps it)
        fitted, note = fit_batch_to_data(oc.batch_size, n_train, loop.world * oc.accumulate)
        if fitted is not None:
            cfg = cfg.model_copy(update={"optim": oc.model_copy(update={"batch_size": fitted})})
            loop.cfg, oc = cfg, cfg.optim
            loop.micro = fitted // (loop.world * oc.accumulate)
            loop.print(note)
    loop.resolved = resolved = resolved_config(cfg, run_dir, data)
    loop.steps_per_epoch = n_train // oc.batch_size
    if loop.steps_per_epoch < 1:
        raise ConfigError(
            f"the training split has {n_train} images, fewer than one global batch "
            f"(optim.batch_size={oc.batch_size}); lower optim.batch_size or use more data (data.limit)")
    loop.total_steps = oc.max_steps if oc.max_steps else max(1, round(oc.epochs * loop.steps_per_epoch))
    loop.warmup = warmup_steps(loop.total_steps, oc.warmup_fraction)
    if method is None:
        torch.manual_seed(tc.seed)
        method = build_method(resolved, tuple(data.img_size), int(data.channels))
    loop.method = method
    if ckpt is not None and not loop.is_fsdp:
        ckpt_io.load_state_strict(method, ckpt["model"], str(ckpt_path))

    if loop.rank0:
        ckpt_io.atomic_write(run_dir / "config.yaml", lambda tmp: Path(tmp).write_text(to_yaml(resolved)))
        report = getattr(data, "report", None)
        if report is not None:
            try:
                report.write(run_dir)
                loop.print(report.summary())
            except Exception as err:  # the report is informative only; never fail a run on it
                loop.print(f"warning: could not write the data report: {err}")
    fabric.barrier()
    if ckpt is None:  # data-fitted state (CCViT's k-means tokenizer); a resumed run has it in the checkpoint
        method.prepare(data.train, tc.seed)

    no_decay = no_decay_names(method)
    # a method may scale the base-lr rule (DMJD: pred_ratio / mask_ratio); an explicit optim.lr is used as given
    scale = getattr(method, "lr_scale", None)
    loop.peak_lr = oc.peak_lr * (scale(resolved) if scale is not None and oc.lr is None else 1.0)
    if tc.compile:
        # Fabric unwraps the OptimizedModule, wraps the plain module (DDP / FSDP) and compiles the wrapper;
        # state dicts come from the plain module, so checkpoints carry no `_orig_mod.` prefix
        method = torch.compile(method)
    loop.model = fabric.setup_module(method)
    loop.optimizer = fabric.setup_optimizers(build_optimizer(loop.model, oc, no_decay, lr=loop.peak_lr))
    loop.scaler = getattr(fabric.strategy.precision, "scaler", None)
    loop.data_meta = {
        "img_size": [int(x) for x in data.img_size], "channels": int(data.channels),
        "mean": [float(x) for x in data.mean], "std": [float(x) for x in data.std],
    }
    if ckpt is not None:
        train_state.restore(loop, ckpt_path, ckpt, weights_loaded=not loop.is_fsdp)
        loop.resumed = True
        loop.print(
            f"resumed from {ckpt_path}: step {loop.step}/{loop.total_steps}, epoch {loop.epoch}, sample "
            f"{loop.position} of the epoch"
            + (f"; lr scale {loop.lr_scale:g} after {loop.nan_rollbacks} NaN rollback(s)" if loop.nan_rollbacks
               else ""))
    B, A = oc.batch_size, oc.accumulate
    loop.print(
        f"run dir: {run_dir}\n{loop.total_steps} optimizer steps ({loop.steps_per_epoch}/epoch) of "
        f"{B} images = {loop.world} device(s) x {loop.micro} x {A} accumulation; peak lr {loop.peak_lr:.3g}, "
        f"{loop.warmup} warmup steps"
        + (f" (x {loop.lr_scale:g} after {loop.nan_rollbacks} NaN rollback(s))" if loop.lr_scale != 1.0 else ""))
