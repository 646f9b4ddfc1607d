"""The Callback base class, the read-only view of the loop that hooks receive, and the hook dispatcher."""

from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import Any

import torch


class Callback:
    """Base class: every hook is a no-op; override the ones you need (see the package docstring)."""

    #: key of this callback's state in the checkpoint's "callbacks" section; unique per run
    @property
    def state_key(self) -> str:
        return type(self).__qualname__

    def on_fit_start(self, run: RunView) -> None: ...
    def on_before_optimizer_step(self, run: RunView, step: int, metrics: dict) -> None: ...
    def on_after_optimizer_step(self, run: RunView, step: int) -> None: ...
    def on_train_batch_end(self, run: RunView, step: int, metrics: dict) -> None: ...
    def on_validation_end(self, run: RunView, step: int, val_loss: float) -> None: ...
    def on_epoch_end(self, run: RunView, epoch: int) -> None: ...
    def on_train_end(self, run: RunView) -> None: ...
    def on_fit_end(self, run: RunView, metrics: dict) -> None: ...
    def teardown(self, run: RunView) -> None: ...
    def on_save_checkpoint(self, run: RunView, checkpoint: dict) -> None: ...
    def on_load_checkpoint(self, run: RunView, checkpoint: dict) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


class RunView:
    """What a callback may read of the running loop, and `log` / `print`. Nothing here changes the run."""

    def __init__(self, loop):
        self._loop = loop

    @property
    def method(self) -> torch.nn.Module:
        """The unwrapped method (under FSDP its parameters are sharded: use `model` on every rank instead)."""
        return self._loop.method

    @property
    def model(self):
        """The method as Fabric set it up (DDP/FSDP wrapper): a forward pass here is a collective under FSDP."""
        return self._loop.model

    @property
    def fabric(self):
        return self._loop.fabric

    @property
    def config(self):
        """The resolved PretrainConfig of the run (run_name, channels, mean and std filled in)."""
        return self._loop.resolved

    @property
    def data(self):
        """The PretrainData: `.train`, `.val` (datasets of {"image", "seed", "index", ...}), channels, mean, std."""
        return self._loop.data

    @property
    def run_dir(self) -> Path:
        return self._loop.run_dir

    @property
    def global_step(self) -> int:
        """Optimizer steps completed."""
        return self._loop.step

    @property
    def epoch(self) -> int:
        """Epochs completed."""
        return self._loop.epoch

    @property
    def total_steps(self) -> int:
        return self._loop.total_steps

    @property
    def is_global_zero(self) -> bool:
        return bool(self._loop.rank0)

    @property
    def engine(self):
        """The loop itself, for mimkit's own callbacks (checkpointing, NaN guard, validation); others need not."""
        return self._loop

    def log(self, metrics: dict, step: int | None = None) -> None:
        """Send scalars to the run's loggers (metrics.csv, TensorBoard, ...) at `step` (default: global_step);
        they also become the checkpoint's last metrics."""
        self._loop.log(metrics, self._loop.step if step is None else step)

    def print(self, msg: str) -> None:
        """A line on stderr from rank 0 (through the progress bar when there is one)."""
        self._loop.print(msg)


@contextlib.contextmanager
def isolated_rng(module: torch.nn.Module | None = None):
    """Within: draws from the global torch (CPU and current CUDA device), Python and NumPy RNGs are undone
    afterwards, and `module` gets back its train/eval mode, so that code run here cannot change the run."""
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    cuda_state = torch.cuda.get_rng_state() if cuda else None
    try:
        import numpy as np

        np_state = np.random.get_state()
    except ImportError:
        np, np_state = None, None
    training = None if module is None else module.training
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state)
        if np_state is not None:
            np.random.set_state(np_state)
        if module is not None and module.training != training:
            module.train(training)


class CallbackList:
    """Calls a hook on every callback in order. Callbacks marked `engine_owned` (mimkit's own) run as they are;
    any other runs inside `isolated_rng`, so that a forgotten global RNG draw or a model left in eval mode
    cannot change the run."""

    def __init__(self, callbacks: list[Callback], view: RunView):
        keys = [cb.state_key for cb in callbacks]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"two callbacks share the checkpoint state key {dup[0]!r}: give one a distinct "
                             f"`state_key`")
        self.callbacks, self.view = list(callbacks), view

    def call(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, hook)
            if getattr(cb, "engine_owned", False):
                fn(self.view, *args)
            else:
                with isolated_rng(self.view._loop.method):
                    fn(self.view, *args)

    def state_dicts(self) -> dict:
        out = {}
        for cb in self.callbacks:
            state = cb.state_dict()
            if state:
                out[cb.state_key] = state
        return out

    def load_state_dicts(self, states: dict) -> None:
        for cb in self.callbacks:
            if cb.state_key in (states or {}):
                cb.load_state_dict(states[cb.state_key])
