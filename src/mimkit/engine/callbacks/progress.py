"""The tqdm progress bar on rank 0: loss, lr and images/s of every step, and the expected time up front."""

from __future__ import annotations

import sys

from mimkit.engine.callbacks.base import Callback

ESTIMATE_AFTER = 3  # steps of this process timed before the expected duration is printed (the first is slow)


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


class ProgressBar(Callback):
    engine_owned = True

    def __init__(self):
        self.bar = None
        self.step_times: list[float] = []
        self.estimated = False

    def on_fit_start(self, run) -> None:
        loop = run.engine
        if loop.rank0 and run.config.trainer.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=run.total_steps, initial=run.global_step, desc="pretrain", dynamic_ncols=True,
                            unit="step", file=sys.stderr)
            loop.bar = self.bar

    def on_train_batch_end(self, run, step: int, metrics: dict) -> None:
        loop = run.engine
        if not loop.rank0:
            return
        self.step_times.append(loop.last_step_seconds)
        if not self.estimated and len(self.step_times) == ESTIMATE_AFTER + 1 and step < run.total_steps:
            self.estimated = True  # the first step (allocation, compilation) is left out of the estimate
            per_step = sum(self.step_times[1:]) / ESTIMATE_AFTER
            left = run.total_steps - step
            run.print(f"expected: about {format_duration(per_step * left)} for the {left:,} remaining steps "
                      f"({per_step:.3g} s/step over {ESTIMATE_AFTER} steps; validation and checkpoints not included)")
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                                 img_s=f"{loop.run_steps * loop.batch_size / max(loop.train_time, 1e-9):.0f}",
                                 refresh=False)
            self.bar.update(1)

    def on_load_checkpoint(self, run, checkpoint: dict) -> None:
        if self.bar is not None:
            self.bar.n = run.global_step
            self.bar.refresh()

    def teardown(self, run) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar = None
        run.engine.bar = None
