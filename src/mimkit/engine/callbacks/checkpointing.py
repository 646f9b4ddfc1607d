"""When last.ckpt is written: every `trainer.checkpoint_every_steps` steps, at epoch ends (every
`trainer.checkpoint_every_epochs`, after the epoch's validation, with an epoch_NNNN.ckpt copy when
`trainer.keep_epoch_checkpoints`), when the run stops early and when it ends. Runs after every other
callback, so a checkpoint holds the step's complete work (callback states included): a run killed at any
moment resumes exactly."""

from __future__ import annotations

from mimkit.engine.callbacks.base import Callback


class Checkpointing(Callback):
    engine_owned = True

    def on_train_batch_end(self, run, step: int, metrics: dict) -> None:
        loop, every = run.engine, run.config.trainer.checkpoint_every_steps
        # a step that ends the epoch is checkpointed after the epoch's validation (on_epoch_end), so that a run
        # killed in between repeats the validation when resumed
        if every and step % every == 0 and loop.position < loop.epoch_len:
            loop.save_checkpoint()

    def on_epoch_end(self, run, epoch: int) -> None:
        loop, tc = run.engine, run.config.trainer
        epoch_due = bool(tc.checkpoint_every_epochs) and epoch % tc.checkpoint_every_epochs == 0
        step_due = bool(tc.checkpoint_every_steps) and run.global_step % tc.checkpoint_every_steps == 0
        if (epoch_due or step_due) and run.global_step < run.total_steps:
            loop.save_checkpoint(keep_copy=bool(epoch_due and tc.keep_epoch_checkpoints))

    def on_train_end(self, run) -> None:
        loop, tc = run.engine, run.config.trainer
        if loop.stopped_early:
            if loop.saved_step != run.global_step:
                loop.save_checkpoint()
            run.print(f"stopped after step {run.global_step} (trainer.stop_after_steps={tc.stop_after_steps}); "
                      f"continue with resume={str(run.run_dir)!r}")
        elif loop.saved_step != run.global_step:
            loop.save_checkpoint(keep_copy=bool(tc.keep_epoch_checkpoints and loop.position == 0))
