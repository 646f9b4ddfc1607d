"""NaN/inf guard: before every optimizer step the loss, the gradient norm and the gradients are checked, after it
the weights and the optimizer state; on a non-finite value the step is never applied to a checkpoint.

With trainer.nan_retries = 0 the run stops with TrainingDiverged, the last checkpoint intact. With R > 0 it rolls
back to the last good checkpoint (weights, optimizer, scaler, RNG, progress, callback states; a checkpoint is
written at the start, so there always is one), multiplies the lr schedule (peak and min lr) by
trainer.nan_lr_factor, rewrites the checkpoint with the new lr scale (so it survives a later resume), logs the
event (stderr, a "nan_rollbacks" row in metrics.csv, a line in <run_dir>/events.jsonl) and continues; the
(R+1)-th divergence of the run raises TrainingDiverged. Every decision is the same on every rank: the loss and
gradient norm are all-reduced, and the finite checks of gradients and weights are all-reduced flags.

Under 16-mixed precision, non-finite gradients are the GradScaler's business (it skips the step and lowers the
scale), so only the loss and the weights are checked there.
"""

from __future__ import annotations

import math

from mimkit.engine.callbacks.base import Callback
from mimkit.engine.errors import StepRejected, TrainingDiverged
from mimkit.engine.state import nonfinite, optimizer_tensors


class NaNGuard(Callback):
    engine_owned = True

    def on_fit_start(self, run) -> None:
        loop = run.engine
        if run.config.trainer.nan_retries > 0 and loop.saved_step < 0 and run.global_step < run.total_steps:
            loop.save_checkpoint()  # a divergence before the first periodic checkpoint rolls back to this one

    def on_before_optimizer_step(self, run, step: int, metrics: dict) -> None:
        loop = run.engine
        loss = metrics["loss"]
        if not math.isfinite(loss):
            self.diverged(run, step, f"loss is {loss}", loss)
        norm = metrics.get("grad_norm")
        if norm is not None and not math.isfinite(norm):
            self.diverged(run, step, f"the gradient norm is {norm} (loss {loss:.4g})", loss)
        if loop.scaler is None and norm is None:  # a finite clipping norm already proves the gradients finite
            if nonfinite([p.grad for p in loop.model.parameters()], loop):
                self.diverged(run, step, f"the gradients hold NaN/inf values (loss {loss:.4g})", loss)

    def on_after_optimizer_step(self, run, step: int) -> None:
        loop = run.engine
        if nonfinite([*loop.model.parameters(), *loop.model.buffers(), *optimizer_tensors(loop.optimizer)], loop):
            self.diverged(run, step, "the update made weights or optimizer state NaN/inf", loop.loss, applied=True)

    def diverged(self, run, step: int, what: str, loss: float, applied: bool = False) -> None:
        """A non-finite value at 0-based `step`. With rollbacks left, restore the last checkpoint with a lower lr
        and raise StepRejected (the loop goes on from there); otherwise raise TrainingDiverged."""
        loop, tc = run.engine, run.config.trainer
        lr = loop.current_lr
        if loop.nan_rollbacks < tc.nan_retries and loop.saved_step >= 0:  # the same decision on every rank
            self.rollback(run, step, what, loss, lr)
        last = f"{loop.last_ckpt} (step {loop.saved_step})" if loop.saved_step >= 0 else "none was written yet"
        tried = ""
        if tc.nan_retries:
            tried = (f"{loop.nan_rollbacks} rollback(s) to the last good checkpoint with a lower lr did not help "
                     f"(trainer.nan_retries={tc.nan_retries}, lr scale now {loop.lr_scale:g}). ")
        when = ("after the optimizer step; its weights were not saved" if applied else
                "before the optimizer step, so no weights were updated with it")
        msg = (
            f"{what} at optimizer step {step + 1} (epoch {loop.epoch}, lr {lr:.3g}); training stopped {when}. "
            f"{tried}Last good checkpoint: {last}. Try a lower optim.base_lr / optim.lr, a longer warmup "
            f"(optim.warmup_fraction), gradient clipping (optim.clip_grad=1.0), trainer.nan_retries, or "
            f"trainer.precision=32-true / bf16-mixed instead of 16-mixed; then resume from the checkpoint or "
            f"start again."
        )
        loop.event({"event": "nan_stop", "nan_step": step + 1, "reason": what, "loss": str(loss), "lr": lr,
                    "rollbacks": loop.nan_rollbacks, "lr_scale": loop.lr_scale,
                    "last_checkpoint_step": loop.saved_step})
        raise TrainingDiverged(msg)  # printed once, by whoever catches it (the CLI: `error: ...`)

    def rollback(self, run, step: int, what: str, loss: float, lr: float) -> None:
        loop, tc = run.engine, run.config.trainer
        loop.optimizer.zero_grad(set_to_none=True)  # drop the non-finite gradients
        rollbacks, scale = loop.nan_rollbacks + 1, loop.lr_scale * tc.nan_lr_factor
        loop.restore_checkpoint(loop.last_ckpt)
        loop.nan_rollbacks, loop.lr_scale = rollbacks, scale
        back = run.global_step
        loop.last_metrics.update({"nan_rollbacks": float(rollbacks), "lr_scale": scale})
        run.log({"nan_rollbacks": rollbacks, "lr_scale": scale}, back)
        loop.save_checkpoint()  # the same state with the new lr scale: a later resume keeps it
        loop.event({"event": "nan_rollback", "nan_step": step + 1, "reason": what, "loss": str(loss), "lr": lr,
                    "rollback_to_step": back, "rollbacks": rollbacks, "max_rollbacks": tc.nan_retries,
                    "lr_scale": scale})
        run.print(
            f"{what} at optimizer step {step + 1} (lr {lr:.3g}): rolled back to the checkpoint of step {back} "
            f"({rollbacks}/{tc.nan_retries} rollbacks); lr schedule now x {scale:g} "
            f"(trainer.nan_lr_factor={tc.nan_lr_factor:g})"
        )
        raise StepRejected(back)
