"""Training metrics to the run's loggers: the mean of each window of `trainer.log_every_steps` steps."""

from __future__ import annotations

from mimkit.engine.callbacks.base import Callback
from mimkit.engine.loggers import build_loggers


class MetricsLogging(Callback):
    engine_owned = True

    def __init__(self):
        self._reset()

    def _reset(self) -> None:
        self.window_loss, self.window_steps, self.window_time = 0.0, 0, 0.0

    def on_fit_start(self, run) -> None:
        loop = run.engine
        if loop.rank0:
            loop.loggers = build_loggers(run.config.trainer.loggers, run.run_dir,
                                         run.global_step if loop.resumed else None, run.config)

    def on_train_batch_end(self, run, step: int, metrics: dict) -> None:
        loop, tc = run.engine, run.config.trainer
        self.window_loss += metrics["loss"]
        self.window_steps += 1
        self.window_time += loop.last_step_seconds
        if step % tc.log_every_steps == 0 or step == run.total_steps:
            logged = {
                **{k: v for k, v in metrics.items() if k not in ("loss", "lr")},
                "loss": self.window_loss / self.window_steps, "lr": metrics["lr"],
                "images_per_s": self.window_steps * loop.batch_size / max(self.window_time, 1e-9),
                "epoch": step / loop.steps_per_epoch,
            }
            run.log(logged, step)
            self._reset()

    def on_load_checkpoint(self, run, checkpoint: dict) -> None:
        """A rollback mid-run: metrics.csv and the window read like the run that goes on from the restored step."""
        self._reset()
        for logger in getattr(run.engine, "loggers", []):
            if hasattr(logger, "rewind"):
                logger.rewind(run.global_step)

    def teardown(self, run) -> None:
        for logger in getattr(run.engine, "loggers", []):
            logger.finalize("success")
        run.engine.loggers = []
