"""What training can end with, besides a result."""

from __future__ import annotations

from pathlib import Path


class TrainingDiverged(RuntimeError):
    """The loss, the gradients or the weights became NaN or infinite (after trainer.nan_retries rollbacks, if
    any); raised before the optimizer step, leaving the last checkpoint intact."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training. `run_dir` is the run's folder; `checkpoint` its last.ckpt, or None when none
    was written yet (then there is nothing to resume)."""

    def __init__(self, run_dir: Path, checkpoint: Path | None):
        super().__init__(f"training interrupted in {run_dir}")
        self.run_dir, self.checkpoint = run_dir, checkpoint


class StepRejected(Exception):
    """Raised by a callback (the NaN guard) after it restored an earlier state: the loop abandons the current
    step and goes on from the restored progress."""
