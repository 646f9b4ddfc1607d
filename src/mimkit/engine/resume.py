"""Resuming a run: the run's own settings, which changes a resume may apply, and the RNG states.

A resumed run continues with the settings stored in its checkpoint. A requested configuration that differs
from them is split in two: settings that only say how long to run, how often to log or save, on which
hardware, or what to evaluate afterwards (`RESUMABLE_CHANGES`) are listed and applied; any other difference
(method, model, data, optimizer, seed, precision) would make the continued run differ from the one that wrote
the checkpoint, and is refused with the list of differences unless the caller allows it explicitly
(`train(..., allow_config_change=True)`, `mimkit pretrain --allow-config-change`).
"""

from __future__ import annotations

import copy
import random
from pathlib import Path

import torch

from mimkit.config import ConfigError, PretrainConfig, build_config, load_config

# dotted fields (or section prefixes ending in ".") a resume may change without changing what is trained
RESUMABLE_CHANGES = (
    "optim.epochs", "optim.max_steps",
    "trainer.stop_after_steps", "trainer.progress", "trainer.log_every_steps", "trainer.loggers",
    "trainer.checkpoint_every_steps", "trainer.checkpoint_every_epochs", "trainer.keep_epoch_checkpoints",
    "trainer.nan_retries", "trainer.nan_lr_factor", "trainer.out_dir", "trainer.run_name",
    "trainer.accelerator", "trainer.devices", "trainer.num_nodes", "trainer.strategy",
    "data.num_workers", "data.pin_memory", "eval.",
)
# filled in from the data when a run starts: a requested None means "as the run has it", not a change
_RESOLVED_AT_START = ("data.channels", "data.mean", "data.std", "trainer.run_name")
# settings of one invocation, never inherited from the stored run (a finished stop_after_steps would stop again)
_PER_INVOCATION = ("trainer.stop_after_steps",)


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _set(tree: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def config_differences(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(dotted field, old value, new value) for every leaf that differs between two config trees."""
    a, b = _flatten(old), _flatten(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def is_resumable_change(field: str) -> bool:
    return any(field == p or (p.endswith(".") and field.startswith(p)) for p in RESUMABLE_CHANGES)


def reconcile(stored: dict, requested: PretrainConfig, checkpoint: Path, allow_change: bool = False
              ) -> tuple[PretrainConfig, list[str]]:
    """The configuration a resume runs with: the run's stored settings, plus the requested changes that keep it
    the same run (all requested changes when `allow_change`). Returns it with a line per applied change;
    raises ConfigError listing the other differences."""
    # settings added to mimkit after the run was written take their defaults, not count as changes
    try:
        stored = build_config(PretrainConfig, stored).model_dump(mode="json")
    except ConfigError as err:
        from mimkit.engine.checkpoint import CheckpointError

        raise CheckpointError(f"the settings stored in {checkpoint} are not valid for this mimkit: {err}") from None
    wanted = requested.model_dump(mode="json")
    diffs = [(k, a, b) for k, a, b in config_differences(stored, wanted)
             if not (b is None and k in _RESOLVED_AT_START)]
    refused = [d for d in diffs if not is_resumable_change(d[0])]
    if refused and not allow_change:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in refused)
        raise ConfigError(
            f"resuming {checkpoint} with settings that differ from the run's own, so it would no longer continue "
            f"the same run: {shown}. Resume without them (the run's config.yaml is used), start a new run, or "
            f"pass --allow-config-change (train(..., allow_config_change=True)) to apply them anyway")
    tree = copy.deepcopy(stored)
    for key, _, value in diffs:
        _set(tree, key, value)
    cfg = build_config(PretrainConfig, tree)
    return cfg, [f"{k}: {a!r} -> {b!r}" for k, a, b in diffs]


def config_for_resume(resume: str, config_path: str | None = None, overrides=()) -> PretrainConfig:
    """The configuration a command line `--resume RUN [--config FILE] [key=value ...]` asks for: the run's
    stored settings with the overrides on top (a --config file replaces them as the base); the overrides alone
    when there is no checkpoint yet (resume=auto before the first one: a new run starts)."""
    from mimkit.engine.checkpoint import read_run
    from mimkit.engine.setup import resolve_resume

    requested = load_config(config_path, overrides)
    if config_path is not None:
        return requested
    ckpt_path = resolve_resume(resume, requested)
    if ckpt_path is None:
        return requested
    stored = copy.deepcopy(read_run(ckpt_path)[0]["config"])
    for key in _PER_INVOCATION:
        _set(stored, key, None)
    return load_config(None, overrides, base=stored)


def resolved_config(cfg: PretrainConfig, run_dir: Path, data) -> PretrainConfig:
    """`cfg` with the run name, channel count and normalisation the run really uses."""
    tree = cfg.model_dump(mode="json")
    tree["trainer"]["run_name"] = run_dir.name
    tree["data"]["channels"] = int(data.channels)
    tree["data"]["mean"] = [float(x) for x in data.mean]
    tree["data"]["std"] = [float(x) for x in data.std]
    return PretrainConfig.model_validate(tree)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    return state


def set_rng_state(state: dict) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "python" in state:
        v = state["python"]
        random.setstate((v[0], tuple(v[1]), v[2]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = list(state["cuda"])[: torch.cuda.device_count()]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))
