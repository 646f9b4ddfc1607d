"""`train(cfg)`: pretraining on Lightning Fabric. The pieces: engine.setup (Fabric, FSDP, launchers, run
folders), engine.run_setup (a run made ready on every rank), engine.loop (the step loop), engine.callbacks
(validation, pictures, logging, progress bar, NaN guard, checkpointing, and yours), engine.state (checkpoint
contents), engine.resume (the run's own settings and RNG state on resume).

Crash safety: every checkpoint is written under a temporary name and renamed into place (a killed run leaves
the previous checkpoint whole, plus a temp file the next start deletes), after the step's work is complete: at
the end of an epoch only after its validation, so a run resumed after a kill at any moment (SIGKILL included)
repeats exactly what the uninterrupted run did. A checkpoint is never written with NaN/inf values
(engine.callbacks.nan_guard) and carries a checksum verified on every load.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mimkit.config import PretrainConfig
from mimkit.engine import checkpoint as ckpt_io
from mimkit.engine.callbacks import VAL_STREAM
from mimkit.engine.errors import TrainingDiverged, TrainingInterrupted
from mimkit.engine.loggers import check_available
from mimkit.engine.setup import _under_srun, _under_torchrun, default_run_prefix, make_fabric, resolve_resume

__all__ = ["VAL_STREAM", "TrainResult", "TrainingDiverged", "TrainingInterrupted", "default_run_prefix",
           "make_fabric", "resolve_resume", "train"]


@dataclass
class TrainResult:
    run_dir: Path
    method: torch.nn.Module          # the unwrapped method (eval mode), on the training device or the CPU
    metrics: dict                    # final scalars: global_step, epoch, loss, val_loss, images_per_s, ...
    data: Any                        # the PretrainData the run used (train/val splits, channels, size, mean/std)
    config: PretrainConfig           # the resolved configuration (run_name, channels, mean, std filled in)
    checkpoint: Path | None          # checkpoints/last.ckpt
    history: list[dict] = field(default_factory=list)  # per optimizer step of this process: step, loss, lr
    fabric: Any = None               # the Fabric object (None after ddp_spawn)

    @property
    def is_global_zero(self) -> bool:
        """True in the process that should report, write results and draw pictures (always after ddp_spawn)."""
        return self.fabric is None or bool(self.fabric.is_global_zero)

    @property
    def world_size(self) -> int:
        return 1 if self.fabric is None else int(self.fabric.world_size)

    @property
    def device(self) -> torch.device:
        p = next(self.method.parameters(), None)
        return p.device if p is not None else torch.device("cpu")


def train(cfg: PretrainConfig, resume: str | os.PathLike | None = None, *, data=None, method=None,
          callbacks=None, allow_config_change: bool = False) -> TrainResult:
    """Pretrain `cfg.method` on `cfg.data`; returns the run directory, the trained method and final metrics.

    resume:    a checkpoint file, a run directory, or "auto" (continue the run named by the config, if any). The
               run continues with its own stored settings; changes in `cfg` that keep it the same run (length,
               logging, checkpointing, hardware, eval) are applied, others refused (engine.resume).
    data:      optional prebuilt PretrainData (defaults to `mimkit.data.build_pretrain_data(cfg.data)`).
    method:    optional prebuilt method (defaults to `mimkit.methods.build_method`); must match the config.
    callbacks: extra `mimkit.engine.callbacks.Callback`s (hooks, state kept in checkpoints; see that package).
    allow_config_change: on resume, apply every difference of `cfg` from the run's settings.
    Raises TrainingDiverged on a NaN/inf loss, ConfigError on inconsistent settings, TrainingInterrupted
    (a KeyboardInterrupt) on Ctrl-C.
    """
    check_available(cfg.trainer.loggers)
    fabric = make_fabric(cfg.trainer)
    result = fabric.launch(_run, cfg, resume, data, method, list(callbacks or ()), allow_config_change)
    if result.method is None:  # ddp_spawn: the workers are gone; rebuild what they could not send back
        result.method = ckpt_io.method_from_checkpoint(result.checkpoint)[0]
        if data is None:
            from mimkit.data import build_pretrain_data

            data = build_pretrain_data(result.config.data, report_dir=result.run_dir)
        result.data = data
    return result


def _run(fabric, cfg, resume, data, method, callbacks, allow_config_change) -> TrainResult:
    from mimkit.engine.run_setup import prepare

    loop = prepare(fabric, cfg, resume, data, method, callbacks, allow_config_change)
    metrics = loop.fit()
    if loop.is_fsdp:  # parameters are sharded: give back the full weights from the final checkpoint
        method = ckpt_io.method_from_checkpoint(loop.last_ckpt)[0]
    else:
        method = loop.method
        method.eval()
    data = loop.data
    spawned = loop.cfg.trainer.strategy == "ddp_spawn" and not (_under_torchrun() or _under_srun())
    if spawned:
        # results cross a process boundary: send no tensors (their shared memory dies with the worker);
        # `train` reloads the method from the final checkpoint in the launching process
        method, data, fabric = None, None, None
    return TrainResult(run_dir=loop.run_dir, method=method, metrics=metrics, data=data, config=loop.resolved,
                       checkpoint=loop.last_ckpt if loop.last_ckpt.is_file() else None, history=loop.history,
                       fabric=fabric)
