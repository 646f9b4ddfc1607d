"""Callbacks: what the training loop does besides optimizer steps, and where your own code joins it.

Pass your own with `mimkit.engine.train(cfg, callbacks=[MyCallback()])`. Subclass `Callback` and override the
hooks you need; every hook gets `run`, a read-only `RunView` of the loop: `run.method` (the unwrapped
method), `run.model` (Fabric's wrapper), `run.fabric`, `run.config` (resolved), `run.data` (`.train`,
`.val`), `run.run_dir`, `run.global_step` (optimizer steps done), `run.epoch` (epochs done),
`run.total_steps`, `run.is_global_zero`, and `run.log(metrics: dict, step=None)` (to metrics.csv,
TensorBoard, ... and the checkpoint's last metrics), `run.print(msg)`.

Hooks, in the order they come (all on every rank; guard with `run.is_global_zero` for rank-0 work):
  on_fit_start(run)                          before the first step (after a resume's state is restored)
  on_before_optimizer_step(run, step, m)     gradients ready, `m` = the step's all-reduced metrics
  on_after_optimizer_step(run, step)         weights updated
  on_train_batch_end(run, step, m)           `step` optimizer steps done; `m` has "loss", "lr", ...
  on_validation_end(run, step, val_loss)     after the fixed-mask validation
  on_epoch_end(run, epoch)                   `epoch` epochs done (validation and pictures just ran)
  on_train_end(run)                          the steps are done (final validation and checkpoint follow)
  on_fit_end(run, metrics)                   the final metrics of the run
  teardown(run)                              always, also after an error
  on_save_checkpoint(run, checkpoint)        add entries to the checkpoint dict being written
  on_load_checkpoint(run, checkpoint)        a checkpoint was loaded (resume, or a NaN rollback)
  state_dict() / load_state_dict(state)      your state, kept in last.ckpt under checkpoint["callbacks"]
                                             [state_key] and restored on resume and on rollback

A checkpoint is written after every callback's on_train_batch_end / on_epoch_end of that step, so your state
in it always matches the weights. Your callbacks run after mimkit's own (below) and before checkpointing.

Your callback must not change the run. The loop re-seeds the global torch RNG before every step, and it runs
each of your hooks with the global torch, CUDA, Python and NumPy RNG states saved and restored and the
method's train/eval mode restored (`isolated_rng`), so draws and `model.eval()` there leave no trace; still,
prefer a local `torch.Generator` for anything random you do. Forward passes belong under `torch.no_grad()` in
eval mode, on `run.method` (a forward through `run.model` would be seen by DDP); under FSDP the parameters
are sharded, so evaluate through `run.model` on every rank. Do not step the optimizer or change the weights.

mimkit's own callbacks, one file each: MetricsLogging (metrics_logging.py), ProgressBar (progress.py),
Validation (validation.py), Reconstructions (reconstructions.py), NaNGuard (nan_guard.py), OnlineProbe
(online_probe.py; kNN + linear probe every eval.online_probe_every_steps), Checkpointing
(checkpointing.py; always last).
"""

from mimkit.engine.callbacks.base import Callback, CallbackList, RunView, isolated_rng
from mimkit.engine.callbacks.checkpointing import Checkpointing
from mimkit.engine.callbacks.metrics_logging import MetricsLogging
from mimkit.engine.callbacks.nan_guard import NaNGuard
from mimkit.engine.callbacks.online_probe import OnlineProbe
from mimkit.engine.callbacks.progress import ProgressBar
from mimkit.engine.callbacks.reconstructions import Reconstructions
from mimkit.engine.callbacks.validation import VAL_STREAM, Validation


def default_callbacks(extra: list[Callback] = ()) -> list[Callback]:
    """mimkit's callbacks in the order they run, with `extra` (the caller's) before the checkpointing. The
    online probe (off unless eval.online_probe_every_steps is set) is left out when `extra` brings its own."""
    for cb in extra:
        if not isinstance(cb, Callback):
            raise TypeError(f"callbacks must be mimkit.engine.callbacks.Callback instances, got {type(cb).__name__}")
    probe = [] if any(isinstance(cb, OnlineProbe) for cb in extra) else [OnlineProbe()]
    return [MetricsLogging(), ProgressBar(), Validation(), Reconstructions(), NaNGuard(), *probe, *extra,
            Checkpointing()]


__all__ = ["VAL_STREAM", "Callback", "CallbackList", "Checkpointing", "MetricsLogging", "NaNGuard", "OnlineProbe",
           "ProgressBar",
           "Reconstructions", "RunView", "Validation", "default_callbacks", "isolated_rng"]
