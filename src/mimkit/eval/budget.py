"""Is an evaluation's training budget long enough? A probe whose loss still falls steeply when its budget
ends is under-trained: its accuracy says more about the budget than about the encoder."""

from __future__ import annotations

from collections.abc import Sequence

STILL_FALLING = 0.10  # relative drop of the mean loss over the last window that counts as "still learning"


def still_learning(step_losses: Sequence[float], steps_per_epoch: int, what: str, setting: str) -> str | None:
    """A warning when the training loss was still falling at the end, else None.

    The mean loss of the last epoch is compared with the epoch before (one epoch: its last half with its
    first half); a drop of more than :data:`STILL_FALLING` means the probe was still learning when stopped.
    `what` names the probe, `setting` the field that lengthens it.
    """
    n = len(step_losses)
    window = steps_per_epoch if n >= 2 * steps_per_epoch else n // 2
    if window < 1:
        return None
    last = sum(step_losses[n - window:]) / window
    before = sum(step_losses[n - 2 * window:n - window]) / window
    if before <= 0 or (before - last) / before <= STILL_FALLING:
        return None
    span = "epoch" if window == steps_per_epoch else "half of its only epoch"
    return (f"{what}: the training loss still fell {100 * (before - last) / before:.0f}% over its last {span} "
            f"({before:.3f} -> {last:.3f}), so the budget is too short to train it and its accuracy "
            f"understates the encoder; raise {setting}")
