"""The step loop: optimizer steps with gradient accumulation, the exact-resume bookkeeping, and hooks.

One optimizer step consumes `optim.batch_size` images in total, whatever the device count or accumulation:
per-device batch = batch_size / (world_size * accumulate). The SeededSampler deals each rank its share of one
global order and hands every image its seed, so one process and N processes see the same images with the same
crops and masks, and the gradients agree up to floating-point summation order.

Exact resume: the progress is (step, epoch, position = samples of the epoch consumed). The lr is a pure function
of the step, the data order and masks are pure functions of (seed, epoch, index), and the global torch RNG
(drop path) is re-seeded from (seed, rank, step) before every step, so a resumed run repeats the uninterrupted
one bit for bit. Everything else is a callback (engine.callbacks): validation, pictures, logging, the
progress bar, the NaN guard and checkpointing, plus any the caller passes.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time

import torch
from torch.utils.data import DataLoader, default_collate

from mimkit import rng
from mimkit.data.sampler import SeededSampler
from mimkit.engine import state as train_state
from mimkit.engine.callbacks.base import CallbackList, RunView
from mimkit.engine.errors import StepRejected, TrainingInterrupted
from mimkit.engine.optim import lr_at, set_lr, set_weight_decay, weight_decay_at


class Loop:
    """Built and prepared by `engine.run_setup.prepare`; `fit()` trains and returns the final metrics."""

    def __init__(self, fabric, cfg, callbacks):
        from lightning.fabric.strategies import FSDPStrategy

        self.fabric, self.cfg = fabric, cfg
        self.rank0, self.world = fabric.is_global_zero, fabric.world_size
        self.is_fsdp = isinstance(fabric.strategy, FSDPStrategy)
        self.view = RunView(self)
        self.callbacks = CallbackList(callbacks, self.view)
        self.history: list[dict] = []   # per optimizer step of this process: step, lr, metrics
        self.last_metrics: dict = {}    # the last logged scalars (also stored in checkpoints)
        self.bar = None                 # the progress bar, when the ProgressBar callback shows one
        self.loggers: list = []         # Fabric loggers on rank 0 (the MetricsLogging callback's)
        self.lr_scale = 1.0             # product of trainer.nan_lr_factor over the NaN rollbacks of the run
        self.nan_rollbacks = 0          # both survive a resume: checkpoint["nan_guard"]
        self.resumed = False
        self.step = self.epoch = self.position = 0
        self.saved_step = -1            # step of the last checkpoint written or loaded (-1: none)
        self.stopped_early = False
        self.current_lr = float("nan")
        self.last_step_seconds = self.train_time = 0.0
        self.run_steps = 0

    # ------------------------------------------------------------------------------------------------------
    # what callbacks call (through RunView, or run.engine for mimkit's own)

    def print(self, msg: str) -> None:
        if self.rank0:
            if self.bar is not None:
                self.bar.write(msg, file=sys.stderr)  # tqdm.write's default is stdout
            else:
                print(msg, file=sys.stderr, flush=True)

    def log(self, metrics: dict, step: int) -> None:
        metrics = {k: (v.item() if hasattr(v, "item") else v) for k, v in metrics.items()}
        self.last_metrics.update(metrics)
        if self.rank0:
            for logger in self.loggers:
                logger.log_metrics(metrics, step)

    def event(self, record: dict) -> None:
        """Append one JSON line to <run_dir>/events.jsonl (rank 0)."""
        if self.rank0:
            record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}
            with open(self.run_dir / "events.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def save_checkpoint(self, keep_copy: bool = False) -> None:
        """Write checkpoints/last.ckpt of the current state (every rank calls)."""
        train_state.save(self, keep_copy)

    def restore_checkpoint(self, path) -> None:
        """Go back to the state of a checkpoint of this run (weights, optimizer, RNG, progress, callbacks)."""
        from mimkit.engine.checkpoint import load_checkpoint

        ckpt = load_checkpoint(path)
        train_state.restore(self, path, ckpt)
        self.saved_step = self.step

    # ------------------------------------------------------------------------------------------------------

    def _train_loader(self) -> DataLoader:
        fabric, cfg, data = self.fabric, self.cfg, self.data
        nw = cfg.data.num_workers
        pin = bool(cfg.data.pin_memory) and fabric.device.type == "cuda"
        kw = dict(num_workers=nw, pin_memory=pin, persistent_workers=nw > 0, collate_fn=default_collate)
        if getattr(data.train, "streaming", False):
            # a stream (data.hf_streaming): the dataset deals itself to the ranks and loader workers and takes the
            # sampler's part (set_epoch, epoch_length); workers restart each epoch to see the new epoch and start
            self.sampler = data.train.configure(seed=cfg.trainer.seed, rank=fabric.global_rank, world=self.world,
                                                micro=self.micro, global_batch=cfg.optim.batch_size)
            return DataLoader(data.train, batch_size=self.micro, drop_last=False,
                              **{**kw, "persistent_workers": False})
        self.sampler = SeededSampler(
            len(data.train), seed=cfg.trainer.seed, shuffle=True, rank=fabric.global_rank,
            world_size=self.world, drop_last=True, global_batch=cfg.optim.batch_size,
        )
        # plain DataLoaders: Fabric's wrapper would call sampler.set_epoch(<iteration count>) on every iter(),
        # overriding the epoch and mid-epoch start set for resuming; batches move to the device in the loop
        return DataLoader(data.train, batch_size=self.micro, sampler=self.sampler, drop_last=False, **kw)

    def _apply_schedules(self, step: int) -> float:
        """Per-step optimizer schedules, pure functions of the step (so a resume continues them exactly): the lr
        (scaled after NaN rollbacks) and the weight decay (constant unless optim.weight_decay_end is set).
        Other per-step schedules of the optimizer's groups belong here too."""
        s, oc = self.lr_scale, self.cfg.optim
        lr = lr_at(step, self.total_steps, self.warmup, self.peak_lr * s, oc.min_lr * s)
        set_lr(self.optimizer, lr)
        set_weight_decay(self.optimizer, weight_decay_at(step, self.total_steps, oc.weight_decay, oc.weight_decay_end))
        return lr

    def _train_step(self, batches) -> None:
        """One optimizer step (0-based `self.step`) over `accumulate` micro-batches; callbacks may reject it."""
        fabric, model, optimizer = self.fabric, self.model, self.optimizer
        tc, oc = self.cfg.trainer, self.cfg.optim
        A, step = oc.accumulate, self.step
        t_step = time.perf_counter()
        lr = self.current_lr = self._apply_schedules(step)
        torch.manual_seed(rng.combine(tc.seed, fabric.global_rank, step))
        if self._begin_step is not None:
            self._begin_step(step, self.total_steps)
        sums = None
        for micro in range(A):
            batch = fabric.to_device(next(batches))
            sync_off = self.world > 1 and micro < A - 1
            ctx = fabric.no_backward_sync(model, enabled=True) if sync_off else contextlib.nullcontext()
            with ctx:
                out = model(batch)
                fabric.backward(out["loss"] / A)
            vals = torch.stack([out[k].detach().float() for k in sorted(out)])
            sums = vals if sums is None else sums + vals
        means = sums / A
        if self.world > 1:
            means = fabric.all_reduce(means, reduce_op="mean")
        metrics = dict(zip(sorted(out), means.tolist()))
        if oc.clip_grad is not None:
            # a non-finite norm is the NaN guard's to judge (a rollback or a clear stop), not an exception here
            gnorm = fabric.clip_gradients(model, optimizer, max_norm=oc.clip_grad, error_if_nonfinite=False)
            metrics["grad_norm"] = float(gnorm)
        self.loss = metrics["loss"]
        self.callbacks.call("on_before_optimizer_step", step, metrics)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if self._end_step is not None:
            self._end_step(step, self.total_steps)
        self.callbacks.call("on_after_optimizer_step", step)
        self.last_step_seconds = time.perf_counter() - t_step
        self.train_time += self.last_step_seconds
        self.step += 1
        self.run_steps += 1
        self.position += oc.batch_size
        self.history.append({"step": self.step, "lr": lr, **metrics})
        self.callbacks.call("on_train_batch_end", self.step, {**metrics, "lr": lr})

    def fit(self) -> dict:
        tc, B = self.cfg.trainer, self.cfg.optim.batch_size
        self.batch_size = B
        train_loader = self._train_loader()
        self.epoch_len = self.sampler.epoch_length
        if self.position >= self.epoch_len:
            self.epoch, self.position = self.epoch + 1, 0
        self.saved_step = self.step if self.resumed else -1
        self.loss = float("nan")
        # schedule and EMA hooks of mimkit.methods.Method (a prebuilt plain module may lack them)
        self._begin_step = getattr(self.method, "begin_step", None)
        self._end_step = getattr(self.method, "end_step", None)
        stop_at = tc.stop_after_steps
        try:
            self.callbacks.call("on_fit_start")
            self.model.train()
            while self.step < self.total_steps and not self.stopped_early:
                self.sampler.set_epoch(self.epoch, self.position // self.world)
                batches = iter(train_loader)
                n_steps = min((self.epoch_len - self.position) // B, self.total_steps - self.step)
                try:
                    for _ in range(n_steps):
                        self._train_step(batches)
                        if stop_at is not None and stop_at <= self.step < self.total_steps:
                            self.stopped_early = True
                            break
                except StepRejected:  # rolled back: go on from the restored progress
                    if self.position >= self.epoch_len:
                        self.epoch, self.position = self.epoch + 1, 0
                    continue
                finally:
                    del batches
                if self.position >= self.epoch_len:  # a whole epoch: validation, pictures, then checkpoint
                    self.epoch, self.position = self.epoch + 1, 0
                    self.callbacks.call("on_epoch_end", self.epoch)
            self.callbacks.call("on_train_end")
            metrics = {
                "global_step": self.step, "total_steps": self.total_steps, "epoch": self.step / self.steps_per_epoch,
                "loss": self.loss, "val_loss": self.last_metrics.get("val_loss"),
                "images_per_s": self.run_steps * B / max(self.train_time, 1e-9),
                "stopped_early": self.stopped_early, "nan_rollbacks": self.nan_rollbacks,
                "lr_scale": self.lr_scale,
            }
            self.callbacks.call("on_fit_end", metrics)
        except KeyboardInterrupt:
            raise TrainingInterrupted(self.run_dir, self.last_ckpt if self.last_ckpt.is_file() else None) from None
        finally:
            self.callbacks.call("teardown")
        val = metrics["val_loss"]
        self.print(f"done: step {self.step}/{self.total_steps}, loss {self.loss:.4f}"
                   + (f", val_loss {val:.4f}" if val is not None and math.isfinite(val) else "")
                   + f", {metrics['images_per_s']:.0f} images/s; checkpoint {self.last_ckpt}")
        return metrics
