"""The pretraining loop on Lightning Fabric.

One optimizer step consumes `optim.batch_size` images in total, whatever the device count or accumulation:
per-device batch = batch_size / (world_size * accumulate). The SeededSampler deals each rank its share of
one global order and hands every image its seed, so one process and N processes see the same images with
the same crops and masks, and the gradients agree up to floating-point summation order.

Exact resume: a checkpoint holds weights, AdamW state, GradScaler state, RNG states and the progress
(step, epoch, samples consumed in the epoch). The lr is a pure function of the step, the data order and
masks are pure functions of (seed, epoch, index), and the global torch RNG (drop path) is re-seeded from
(seed, rank, step) before every step, so a resumed run repeats the uninterrupted one bit for bit.

Crash safety: every checkpoint is written under a temporary name and renamed into place (a killed run leaves
the previous checkpoint whole, plus a temp file the next start deletes). A checkpoint is written after the
step's work is complete: at the end of an epoch only after its validation, so a run resumed after a kill
at any moment (SIGKILL included) repeats exactly what the uninterrupted run did.

NaN/inf loss: the loss is checked before the optimizer step. With trainer.nan_retries = 0 the run stops with
TrainingDiverged and the last checkpoint is left intact. With nan_retries = R > 0 the run rolls back to the
last good checkpoint (weights, optimizer, scaler, RNG, progress; with R > 0 a checkpoint is written at the
start, so there always is one), multiplies the lr schedule (peak and min lr) by trainer.nan_lr_factor,
rewrites the checkpoint with the new lr scale (so it survives a later resume), logs the event (stderr,
a "nan_rollbacks" row in metrics.csv, a line in <run_dir>/events.jsonl) and continues; the (R+1)-th NaN of
the run raises TrainingDiverged.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, default_collate

from mimkit import rng
from mimkit.config import ConfigError, PretrainConfig, to_yaml
from mimkit.data.sampler import SeededSampler
from mimkit.engine import checkpoint as ckpt_io
from mimkit.engine.metrics import MetricsCSV, RunLogger
from mimkit.engine.optim import build_optimizer, lr_at, no_decay_names, set_lr, warmup_steps

VAL_STREAM = 0x7A1D  # the validation masks' seed is rng.combine(trainer.seed, VAL_STREAM): fixed for the run


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite (after trainer.nan_retries rollbacks, if any); raised before the optimizer
    step, leaving the last checkpoint intact."""


@dataclass
class TrainResult:
    run_dir: Path
    method: torch.nn.Module          # the unwrapped method (eval mode), on the training device or the CPU
    metrics: dict                    # final scalars: global_step, epoch, loss, val_loss, images_per_s, ...
    data: Any                        # the PretrainData the run used (train/val splits, channels, size, mean/std)
    config: PretrainConfig           # the resolved configuration (run_name, channels, mean, std filled in)
    checkpoint: Path | None          # checkpoints/last.ckpt
    history: list[dict] = field(default_factory=list)  # per optimizer step of this process: step, loss, lr
    fabric: Any = None               # the Fabric object (None after ddp_spawn)

    @property
    def is_global_zero(self) -> bool:
        """True in the process that should report, write results and draw pictures (always after ddp_spawn)."""
        return self.fabric is None or bool(self.fabric.is_global_zero)

    @property
    def world_size(self) -> int:
        return 1 if self.fabric is None else int(self.fabric.world_size)

    @property
    def device(self) -> torch.device:
        p = next(self.method.parameters(), None)
        return p.device if p is not None else torch.device("cpu")


# ----------------------------------------------------------------------------------------------------------
# setup


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("LOCAL_WORLD_SIZE" in os.environ and "RANK" in os.environ)


def _under_srun() -> bool:
    """Started as one of the tasks of `srun` (Lightning's SLURMEnvironment: SLURM_NTASKS set, not an interactive
    job named bash/interactive)."""
    return "SLURM_NTASKS" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def _slurm_count(name: str) -> int:
    value = os.environ.get(name, "1")  # SLURM_NTASKS_PER_NODE may read "4(x2)"
    digits = value.split("(")[0].split(",")[0]
    return int(digits) if digits.isdigit() else 1


def make_fabric(tc):
    """A Fabric for the trainer section. Under torchrun or srun, devices/num_nodes follow the launcher's world
    (LOCAL_WORLD_SIZE/WORLD_SIZE; SLURM_NTASKS_PER_NODE/SLURM_NNODES), and strategy auto becomes ddp."""
    from lightning.fabric import Fabric

    devices, num_nodes, strategy = tc.devices, tc.num_nodes, tc.strategy
    launched = _under_torchrun() or _under_srun()
    if _under_torchrun():
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        world = int(os.environ.get("WORLD_SIZE", local))
        devices, num_nodes = local, max(1, world // local)
    elif _under_srun():
        devices, num_nodes = _slurm_count("SLURM_NTASKS_PER_NODE"), _slurm_count("SLURM_NNODES")
        world = int(os.environ.get("SLURM_NTASKS", devices * num_nodes))
    if launched:
        if strategy == "auto" and world > 1:
            strategy = "ddp"
        if strategy == "ddp_spawn":
            strategy = "ddp"  # the launcher already started the processes
    if strategy == "fsdp":
        strategy = _fsdp_strategy(tc.accelerator)
    return Fabric(accelerator=tc.accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
                  precision=tc.precision)


def _fsdp_strategy(accelerator: str):
    """Lightning's FSDPStrategy: transformer blocks wrapped one by one, full (unsharded) state dicts in
    checkpoints, so an FSDP checkpoint has the same format as a DDP or single-process one.

    On a CPU (trainer.accelerator=cpu, or auto without a GPU) Lightning's connector refuses FSDP ("only available
    on GPU") although torch's FullyShardedDataParallel runs on CPU tensors with the gloo backend; the refusal
    tests for the exact class FSDPStrategy, so on CPU a subclass that changes nothing else is used. That is what
    the two-process CPU tests (tests/engine/test_engine_fsdp.py) exercise."""
    from lightning.fabric.strategies import FSDPStrategy
    from timm.models.vision_transformer import Block

    kwargs = dict(state_dict_type="full", auto_wrap_policy={Block}, use_orig_params=True)
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if not on_cpu:
        return FSDPStrategy(**kwargs)

    class CPUFSDPStrategy(FSDPStrategy):
        """FSDPStrategy on CPU processes (gloo). torch's FSDP also needs ``device_id=cpu`` said explicitly (without
        it, it looks for an accelerator and fails); Lightning passes the device index, None on a CPU."""

        def setup_module(self, module):
            from torch.distributed.fsdp import FullyShardedDataParallel

            return FullyShardedDataParallel(
                module=module, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self._fsdp_kwargs)

        # Lightning gathers full state dicts with offload_to_cpu=True. For tensors already on the CPU, torch's
        # FSDP then skips the copy it makes otherwise (`.cpu()` returns the same view), and the optimizer state
        # gather reuses one buffer for every state: the saved AdamW exp_avg silently became exp_avg_sq (seen in
        # torch 2.14). Gathering without the offload makes FSDP clone each state, which is what we want on CPU.
        def save_checkpoint(self, *args, **kwargs):
            with _full_state_dicts_without_offload():
                return super().save_checkpoint(*args, **kwargs)

        def load_checkpoint(self, *args, **kwargs):
            with _full_state_dicts_without_offload():
                return super().load_checkpoint(*args, **kwargs)

    return CPUFSDPStrategy(**kwargs)


@contextlib.contextmanager
def _full_state_dicts_without_offload():
    """Within: Lightning's FSDP full-state-dict context asks torch for cloned (not CPU-offloaded) tensors."""
    from unittest import mock

    import lightning.fabric.strategies.fsdp as lf_fsdp

    def context(module, world_size: int, rank0_only: bool = True):
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.api import FullOptimStateDictConfig

        return FSDP.state_dict_type(
            module=module, state_dict_type=StateDictType.FULL_STATE_DICT,
            state_dict_config=FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
            optim_state_dict_config=FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only))

    with mock.patch.object(lf_fsdp, "_get_full_state_dict_context", context):
        yield


def default_run_prefix(cfg: PretrainConfig) -> str:
    d = cfg.data
    if d.source == "torchvision" and d.name:
        dataset = d.name.lower()
    elif d.source in ("folder", "imagefolder", "shards") and d.path:
        dataset = Path(d.path).name or d.source
    elif d.source == "hf":
        dataset = (d.name or Path(d.path or "hf").name or "hf").replace("/", "_").lower()
    else:
        dataset = d.source.replace("_", "")
    return f"{cfg.method.name}-{cfg.model.encoder}-{dataset}-"


def _new_run_dir(cfg: PretrainConfig) -> Path:
    out = Path(cfg.trainer.out_dir)
    if cfg.trainer.run_name:
        return out / cfg.trainer.run_name
    base = default_run_prefix(cfg) + time.strftime("%Y%m%d-%H%M%S")
    path, i = out / base, 1
    while path.exists():
        path, i = out / f"{base}-{i}", i + 1
    return path


def resolve_resume(resume: str | os.PathLike | None, cfg: PretrainConfig) -> Path | None:
    """The checkpoint to resume from: a file, a run dir, or "auto" (last.ckpt of trainer.run_name, or of the
    newest run under trainer.out_dir with this method/encoder/dataset; None when there is none yet)."""
    if resume is None or resume == "":
        return None
    if str(resume) == "auto":
        out = Path(cfg.trainer.out_dir)
        if cfg.trainer.run_name:
            last = out / cfg.trainer.run_name / "checkpoints" / "last.ckpt"
            return last if last.is_file() else None
        prefix = default_run_prefix(cfg)
        runs = sorted(
            (p for p in out.glob(prefix + "*") if (p / "checkpoints" / "last.ckpt").is_file()),
            key=lambda p: (p / "checkpoints" / "last.ckpt").stat().st_mtime,
        )
        return runs[-1] / "checkpoints" / "last.ckpt" if runs else None
    return ckpt_io.find_checkpoint(resume)


def _resolved_config(cfg: PretrainConfig, run_dir: Path, data) -> PretrainConfig:
    tree = cfg.model_dump(mode="json")
    tree["trainer"]["run_name"] = run_dir.name
    tree["data"]["channels"] = int(data.channels)
    tree["data"]["mean"] = [float(x) for x in data.mean]
    tree["data"]["std"] = [float(x) for x in data.std]
    return PretrainConfig.model_validate(tree)


def _config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return diffs


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


# ----------------------------------------------------------------------------------------------------------
# entry point


def train(cfg: PretrainConfig, resume: str | os.PathLike | None = None, *, data=None, method=None) -> TrainResult:
    """Pretrain `cfg.method` on `cfg.data`; returns the run directory, the trained method and final metrics.

    resume: a checkpoint file, a run directory, or "auto" (continue the run named by the config, if any).
    data:   optional prebuilt PretrainData (defaults to `mimkit.data.build_pretrain_data(cfg.data)`).
    method: optional prebuilt method (defaults to `mimkit.methods.build_method`); must match the config.
    Raises TrainingDiverged on a NaN/inf loss, ConfigError on inconsistent settings.
    """
    fabric = make_fabric(cfg.trainer)
    result = fabric.launch(_run, cfg, resume, data, method)
    if result.method is None:  # ddp_spawn: the workers are gone; rebuild what they could not send back
        result.method = ckpt_io.method_from_checkpoint(result.checkpoint)[0]
        if data is None:
            from mimkit.data import build_pretrain_data

            data = build_pretrain_data(result.config.data, report_dir=result.run_dir)
        result.data = data
    return result


def _run(fabric, cfg: PretrainConfig, resume, data, method) -> TrainResult:
    return _Loop(fabric, cfg, resume, data, method).run()


class _Loop:
    def __init__(self, fabric, cfg: PretrainConfig, resume, data, method):
        self.fabric, self.cfg = fabric, cfg
        self.resume, self.data, self.method = resume, data, method
        self.rank0 = fabric.is_global_zero
        self.world = fabric.world_size
        from lightning.fabric.strategies import FSDPStrategy

        self.is_fsdp = isinstance(fabric.strategy, FSDPStrategy)
        self.history: list[dict] = []
        self.last_metrics: dict = {}
        self.bar = None
        self.logger: RunLogger | None = None
        self.lr_scale = 1.0       # product of trainer.nan_lr_factor over the NaN rollbacks of this run
        self.nan_rollbacks = 0    # rollbacks so far (both survive a resume: checkpoint["nan_guard"])
        self.resumed = False

    def print(self, msg: str) -> None:
        if self.rank0:
            if self.bar is not None:
                self.bar.write(msg)
            else:
                print(msg, file=sys.stderr, flush=True)

    # ------------------------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        fabric, cfg = self.fabric, self.cfg
        tc, oc = cfg.trainer, cfg.optim
        world, acc = self.world, oc.accumulate
        if oc.batch_size % (world * acc):
            raise ConfigError(
                f"optim.batch_size={oc.batch_size} (the global batch per optimizer step) must be divisible by "
                f"world size x optim.accumulate = {world} x {acc} = {world * acc} "
                f"(world size = trainer.devices x trainer.num_nodes); per-device batch = batch_size / that"
            )
        self.micro = oc.batch_size // (world * acc)

        ckpt_path = resolve_resume(self.resume, cfg)
        if self.resume is not None and ckpt_path is None:
            self.print(f"resume={self.resume!r}: no checkpoint found, starting a new run")
        if ckpt_path is not None:
            run_dir = ckpt_io.run_dir_of(ckpt_path)
        else:
            run_dir = _new_run_dir(cfg) if self.rank0 else None
            run_dir = Path(fabric.broadcast(str(run_dir) if run_dir else None, src=0))
            last = run_dir / "checkpoints" / "last.ckpt"
            if last.is_file():
                raise ConfigError(
                    f"run directory {run_dir} already holds {last}; pass resume='auto' (or the path) to continue "
                    f"it, or choose another trainer.run_name"
                )
        self.run_dir = run_dir
        self.ckpt_dir = run_dir / "checkpoints"
        self.last_ckpt = self.ckpt_dir / "last.ckpt"
        if self.rank0:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            ckpt_io.remove_stale_temps(self.ckpt_dir)
            ckpt_io.remove_stale_temps(run_dir)  # config.yaml's, if a run was killed while writing it
        fabric.barrier()

        # data and method, identically initialised on every rank
        from lightning.fabric.utilities.seed import seed_everything

        seed_everything(tc.seed, verbose=False)
        if self.data is None:
            from mimkit.data import build_pretrain_data

            with fabric.rank_zero_first():
                self.data = build_pretrain_data(cfg.data, report_dir=run_dir)
        from mimkit.methods import method_class

        specs = method_class(cfg.method.name).view_specs(cfg.method)
        if specs:  # methods that compare augmented views get them from the loader
            self.data = self.data.with_views(specs, cfg.data.crop_ratio)
        data = self.data
        self.resolved = _resolved_config(cfg, run_dir, data)
        n_train = len(data.train)
        self.steps_per_epoch = n_train // oc.batch_size
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"the training split has {n_train} images, fewer than one global batch "
                f"(optim.batch_size={oc.batch_size}); lower optim.batch_size or use more data (data.limit)"
            )
        self.total_steps = oc.max_steps if oc.max_steps else max(1, round(oc.epochs * self.steps_per_epoch))
        self.warmup = warmup_steps(self.total_steps, oc.warmup_fraction)

        if self.method is None:
            from mimkit.methods import build_method

            torch.manual_seed(tc.seed)
            self.method = build_method(self.resolved, tuple(data.img_size), int(data.channels))
        method = self.method

        ckpt = None
        if ckpt_path is not None:
            ckpt = ckpt_io.load_checkpoint(ckpt_path)
            diffs = _config_differences(
                {k: ckpt["config"].get(k, {}) for k in ("method", "model", "optim")},
                {k: self.resolved.model_dump(mode="json")[k] for k in ("method", "model", "optim")},
            )
            if diffs:
                self.print(f"warning: resuming {ckpt_path} with changed settings: " + "; ".join(diffs))
            if not self.is_fsdp:
                ckpt_io.load_state_strict(method, ckpt["model"], str(ckpt_path))

        if self.rank0:
            ckpt_io.atomic_write(run_dir / "config.yaml", lambda tmp: Path(tmp).write_text(to_yaml(self.resolved)))
            report = getattr(data, "report", None)
            if report is not None:
                try:
                    report.write(run_dir)
                    self.print(report.summary())
                except Exception as err:  # the report is informative only; never fail a run on it
                    self.print(f"warning: could not write the data report: {err}")
        fabric.barrier()
        if ckpt is None:  # data-fitted state (CCViT's k-means tokenizer); a resumed run has it in the checkpoint
            method.prepare(data.train, tc.seed)

        no_decay = no_decay_names(method)
        # a method may scale the base-lr rule (DMJD: pred_ratio / mask_ratio); an explicit optim.lr is used as given
        scale = getattr(method, "lr_scale", None)
        self.peak_lr = oc.peak_lr * (scale(self.resolved) if scale is not None and oc.lr is None else 1.0)
        if tc.compile:
            # Fabric unwraps the OptimizedModule, wraps the plain module (DDP / FSDP) and compiles the wrapper;
            # state dicts come from the plain module, so checkpoints carry no `_orig_mod.` prefix
            method = torch.compile(method)
        model = fabric.setup_module(method)
        optimizer = fabric.setup_optimizers(build_optimizer(model, oc, no_decay, lr=self.peak_lr))
        self.model, self.optimizer = model, optimizer
        self.scaler = getattr(fabric.strategy.precision, "scaler", None)

        progress = {"global_step": 0, "epoch": 0, "position": 0}
        if ckpt is not None:
            progress = self._load_training_state(ckpt_path, ckpt, weights_loaded=not self.is_fsdp)
            guard = ckpt.get("nan_guard") or {}
            self.lr_scale = float(guard.get("lr_scale", 1.0))
            self.nan_rollbacks = int(guard.get("rollbacks", 0))
            self.resumed = True
            self.print(
                f"resumed from {ckpt_path}: step {progress['global_step']}/{self.total_steps}, "
                f"epoch {progress['epoch']}, sample {progress['position']} of the epoch"
                + (f"; lr scale {self.lr_scale:g} after {self.nan_rollbacks} NaN rollback(s)"
                   if self.nan_rollbacks else "")
            )
        del ckpt
        self.data_meta = {
            "img_size": [int(x) for x in data.img_size], "channels": int(data.channels),
            "mean": [float(x) for x in data.mean], "std": [float(x) for x in data.std],
        }
        return self._train(progress)

    def _load_training_state(self, ckpt_path: Path, ckpt: dict, weights_loaded: bool = False) -> dict:
        """Load weights (unless `weights_loaded`), optimizer, scaler and RNG states from a checkpoint (every rank
        reads the same file); returns its progress {"global_step", "epoch", "position"}."""
        if self.is_fsdp:
            self.fabric.load(ckpt_path, {"model": self.model, "optimizer": self.optimizer}, strict=False)
        else:
            if not weights_loaded:
                ckpt_io.load_state_strict(self.method, ckpt["model"], str(ckpt_path))
            self.optimizer.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if ckpt.get("rng"):
            set_rng_state(ckpt["rng"])
        progress = {"global_step": 0, "epoch": 0, "position": 0}
        progress.update({k: int(v) for k, v in ckpt["progress"].items() if k in progress})
        self.last_metrics = dict(ckpt.get("metrics") or {})
        return progress

    # ------------------------------------------------------------------------------------------------------

    def _loaders(self):
        fabric, cfg, data = self.fabric, self.cfg, self.data
        nw = cfg.data.num_workers
        pin = bool(cfg.data.pin_memory) and fabric.device.type == "cuda"
        kw = dict(num_workers=nw, pin_memory=pin, persistent_workers=nw > 0, collate_fn=default_collate)
        if getattr(data.train, "streaming", False):
            # a stream (data.hf_streaming): the dataset deals itself to the ranks and loader workers and takes the
            # sampler's part (set_epoch, epoch_length); workers restart each epoch to see the new epoch and start
            self.sampler = data.train.configure(seed=cfg.trainer.seed, rank=fabric.global_rank, world=self.world,
                                                micro=self.micro, global_batch=cfg.optim.batch_size)
            train_loader = DataLoader(data.train, batch_size=self.micro, drop_last=False,
                                      **{**kw, "persistent_workers": False})
        else:
            self.sampler = SeededSampler(
                len(data.train), seed=cfg.trainer.seed, shuffle=True, rank=fabric.global_rank,
                world_size=self.world, drop_last=True, global_batch=cfg.optim.batch_size,
            )
            # plain DataLoaders: Fabric's wrapper would call sampler.set_epoch(<iteration count>) on every iter(),
            # overriding the epoch and mid-epoch start set for resuming; batches move to the device in the loop
            train_loader = DataLoader(data.train, batch_size=self.micro, sampler=self.sampler, drop_last=False,
                                      **kw)
        val_loader = None
        val = getattr(data, "val", None)
        if val is not None and len(val) > 0:
            self.val_sampler = SeededSampler(
                len(val), seed=rng.combine(cfg.trainer.seed, VAL_STREAM), shuffle=False, rank=fabric.global_rank,
                world_size=self.world, drop_last=False,
            )
            self.val_sampler.set_epoch(0)
            kw["persistent_workers"] = False  # used once an epoch; no need to keep its workers alive
            val_loader = DataLoader(val, batch_size=self.micro, sampler=self.val_sampler, drop_last=False, **kw)
        return train_loader, val_loader

    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean MIM loss over the held-out split with fixed masks (val seeds at epoch 0, same every time)."""
        if self.val_loader is None:
            return None
        fabric, model = self.fabric, self.model
        self.val_sampler.set_epoch(0)
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=fabric.device)

        def add(batch, weight: float) -> None:
            out = model(batch)
            b = batch["image"].shape[0] * weight
            total.add_(torch.tensor([out["loss"].detach().double().item() * b, b], dtype=torch.float64,
                                    device=total.device))

        seen, last = 0, None
        for batch in self.val_loader:
            last = fabric.to_device(batch)
            add(last, 1.0)
            seen += 1
        if self.is_fsdp:
            # FSDP needs every rank in every forward: ranks with fewer batches repeat one with weight 0
            most = math.ceil(math.ceil(len(self.data.val) / self.world) / self.micro)  # rank 0 has the most
            for _ in range(most - seen):
                add(last if last is not None else self._val_filler(), 0.0)
        if self.world > 1:
            total = fabric.all_reduce(total, reduce_op="sum")
        model.train()
        return float(total[0] / total[1]) if total[1] > 0 else None

    def _val_filler(self) -> dict:
        val = self.data.val
        item = val[(0, rng.combine(self.cfg.trainer.seed, VAL_STREAM))]
        return self.fabric.to_device(default_collate([item]))

    def save(self, step: int, epoch: int, position: int, keep_copy: bool = False) -> None:
        """Write checkpoints/last.ckpt atomically (all ranks call; rank 0 renames the finished temp file)."""
        fabric = self.fabric
        tmp = ckpt_io.temp_path(self.last_ckpt)
        state = {
            "format": ckpt_io.FORMAT, "version": ckpt_io.VERSION,
            "config": self.resolved.model_dump(mode="json"), "data": self.data_meta,
            "model": self.model, "optimizer": self.optimizer,
            "progress": {"global_step": step, "epoch": epoch, "position": position, "total_steps": self.total_steps},
            "rng": rng_state(), "metrics": {k: float(v) for k, v in self.last_metrics.items()},
            "nan_guard": {"lr_scale": float(self.lr_scale), "rollbacks": int(self.nan_rollbacks)},
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        try:
            fabric.save(tmp, state)
            if self.rank0:
                ckpt_io.commit_file(tmp, self.last_ckpt)
                if keep_copy:
                    copy = self.ckpt_dir / f"epoch_{epoch:04d}.ckpt"
                    ckpt_io.atomic_write(copy, lambda t: shutil.copyfile(self.last_ckpt, t))
        finally:
            if self.rank0 and tmp.exists():
                tmp.unlink()
        fabric.barrier()
        self.saved_step = step

    # ------------------------------------------------------------------------------------------------------

    def _train(self, progress: dict) -> TrainResult:
        fabric, cfg = self.fabric, self.cfg
        tc, oc = cfg.trainer, cfg.optim
        model, optimizer = self.model, self.optimizer
        B, A = oc.batch_size, oc.accumulate
        train_loader, self.val_loader = self._loaders()
        epoch_len = self.sampler.epoch_length
        step, epoch, position = progress["global_step"], progress["epoch"], progress["position"]
        if position >= epoch_len:
            epoch, position = epoch + 1, 0
        self.saved_step = step if self.resumed else -1
        self.logger = RunLogger(self.run_dir, self.rank0, resume_step=step if self.resumed else None)
        if self.rank0 and tc.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total_steps, initial=step, desc="pretrain", dynamic_ncols=True,
                            unit="step", file=sys.stderr)
        self.print(
            f"run dir: {self.run_dir}\n{self.total_steps} optimizer steps ({self.steps_per_epoch}/epoch) of "
            f"{B} images = {self.world} device(s) x {self.micro} x {A} accumulation; peak lr {self.peak_lr:.3g}, "
            f"{self.warmup} warmup steps"
            + (f" (x {self.lr_scale:g} after {self.nan_rollbacks} NaN rollback(s))" if self.lr_scale != 1.0 else "")
        )
        if tc.nan_retries > 0 and self.saved_step < 0 and step < self.total_steps:
            self.save(step, epoch, position)  # a NaN before the first periodic checkpoint rolls back to this one
        stop_at = tc.stop_after_steps
        # images/s counts time inside optimizer steps (data wait included), not validation or checkpointing
        window_loss, window_steps, window_time = 0.0, 0, 0.0
        train_time, run_steps = 0.0, 0
        val_loss, val_step = self.last_metrics.get("val_loss"), -1
        if step >= self.total_steps:  # resumed a finished run: nothing left to train, validate or save
            val_step = step
        stopped_early = False
        lv = float("nan")
        model.train()
        # schedule and EMA hooks of mimkit.methods.Method (a prebuilt plain module may lack them)
        begin_step = getattr(self.method, "begin_step", None)
        end_step = getattr(self.method, "end_step", None)
        try:
            while step < self.total_steps and not stopped_early:
                self.sampler.set_epoch(epoch, position // self.world)
                batches = iter(train_loader)
                n_steps = min((epoch_len - position) // B, self.total_steps - step)
                rolled_back = False
                for _ in range(n_steps):
                    t_step = time.perf_counter()
                    s = self.lr_scale
                    lr = lr_at(step, self.total_steps, self.warmup, self.peak_lr * s, oc.min_lr * s)
                    set_lr(optimizer, lr)
                    torch.manual_seed(rng.combine(tc.seed, fabric.global_rank, step))
                    if begin_step is not None:
                        begin_step(step, self.total_steps)
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
                    step_metrics = dict(zip(sorted(out), means.tolist()))
                    lv = step_metrics["loss"]
                    if not math.isfinite(lv):
                        # raises TrainingDiverged, or restores the last checkpoint with a lower lr
                        step, epoch, position = self._diverged(step, epoch, lv, lr)
                        if position >= epoch_len:
                            epoch, position = epoch + 1, 0
                        window_loss, window_steps, window_time = 0.0, 0, 0.0
                        rolled_back = True
                        break
                    if oc.clip_grad is not None:
                        gnorm = fabric.clip_gradients(model, optimizer, max_norm=oc.clip_grad)
                        step_metrics["grad_norm"] = float(gnorm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if end_step is not None:
                        end_step(step, self.total_steps)
                    dt = time.perf_counter() - t_step
                    train_time += dt
                    window_time += dt
                    step += 1
                    run_steps += 1
                    position += B
                    self.history.append({"step": step, "lr": lr, **step_metrics})
                    window_loss += lv
                    window_steps += 1
                    if self.bar is not None:
                        self.bar.update(1)
                        if step % max(1, min(tc.log_every_steps, 10)) == 0 or step == 1:
                            self.bar.set_postfix(loss=f"{lv:.4f}", lr=f"{lr:.2e}",
                                                 img_s=f"{run_steps * B / max(train_time, 1e-9):.0f}")
                    if step % tc.log_every_steps == 0 or step == self.total_steps:
                        metrics = {
                            **{k: v for k, v in step_metrics.items() if k != "loss"},
                            "loss": window_loss / window_steps, "lr": lr,
                            "images_per_s": window_steps * B / max(window_time, 1e-9),
                            "epoch": step / self.steps_per_epoch,
                        }
                        self.last_metrics.update(metrics)
                        self.logger.log(metrics, step)
                        window_loss, window_steps, window_time = 0.0, 0, 0.0
                    # a step that ends the epoch is checkpointed after the epoch's validation (below), so that
                    # a run killed in between repeats the validation when resumed
                    if tc.checkpoint_every_steps and step % tc.checkpoint_every_steps == 0 and position < epoch_len:
                        self.save(step, epoch, position)
                    if stop_at is not None and step >= stop_at and step < self.total_steps:
                        stopped_early = True
                        break
                del batches
                if rolled_back:
                    continue
                if position >= epoch_len:  # a whole epoch: validate, then checkpoint at the epoch boundary
                    epoch, position = epoch + 1, 0
                    val_loss, val_step = self._validate_and_log(step, epoch), step
                    self._save_recon(step, epoch)
                    every = tc.checkpoint_every_epochs
                    epoch_due = bool(every) and epoch % every == 0
                    step_due = bool(tc.checkpoint_every_steps) and step % tc.checkpoint_every_steps == 0
                    if (epoch_due or step_due) and step < self.total_steps:
                        self.save(step, epoch, position, keep_copy=bool(epoch_due and tc.keep_epoch_checkpoints))
                if stopped_early:
                    if self.saved_step != step:
                        self.save(step, epoch, position)
                    self.print(f"stopped after step {step} (trainer.stop_after_steps={stop_at}); "
                               f"continue with resume={str(self.run_dir)!r}")
            if not stopped_early:
                if val_step != step:
                    val_loss = self._validate_and_log(step, epoch + position / epoch_len)
                if self.saved_step != step:
                    self.save(step, epoch, position, keep_copy=bool(tc.keep_epoch_checkpoints and position == 0))
        finally:
            if self.bar is not None:
                self.bar.close()
                self.bar = None
            if self.logger is not None:
                self.logger.close()

        metrics = {
            "global_step": step, "total_steps": self.total_steps, "epoch": step / self.steps_per_epoch,
            "loss": lv, "val_loss": val_loss, "images_per_s": run_steps * B / max(train_time, 1e-9),
            "stopped_early": stopped_early, "nan_rollbacks": self.nan_rollbacks, "lr_scale": self.lr_scale,
        }
        self.print(
            f"done: step {step}/{self.total_steps}, loss {lv:.4f}"
            + (f", val_loss {val_loss:.4f}" if val_loss is not None else "")
            + f", {metrics['images_per_s']:.0f} images/s; checkpoint {self.last_ckpt}"
        )
        return self._result(metrics)

    def _validate_and_log(self, step: int, epoch: float) -> float | None:
        val_loss = self.validate()
        if val_loss is not None:
            self.last_metrics["val_loss"] = val_loss
            self.logger.log({"val_loss": val_loss, "epoch": float(epoch)}, step)
            self.print(f"epoch {epoch:g} step {step}: val_loss {val_loss:.4f}")
        return val_loss

    def _save_recon(self, step: int, epoch: int) -> None:
        """Every `eval.recon_every_epochs` epochs, on rank 0 (not under FSDP): <run_dir>/recon/step_NNNNNN.png of a
        fixed batch (the first held-out images with fixed seeds, so the pictures are comparable over training)."""
        every = getattr(self.cfg.eval, "recon_every_epochs", 0)
        if not every or epoch % every or not self.rank0 or self.is_fsdp or getattr(self, "_recon_off", False):
            return
        try:
            from mimkit.data import fixed_batch
            from mimkit.viz import save_reconstruction_grid

            if getattr(self, "_recon_batch", None) is None:
                val = getattr(self.data, "val", None)
                ds = val if val is not None and len(val) > 0 else self.data.train
                self._recon_batch = fixed_batch(ds, self.cfg.eval.num_images)
            path = self.run_dir / "recon" / f"step_{step:06d}.png"
            save_reconstruction_grid(self.model.module, self._recon_batch, path, self.data.mean, self.data.std,
                                     max_images=None)
        except Exception as err:  # pictures are informative only; never fail a run on them
            self._recon_off = True
            self.print(f"warning: no more reconstruction pictures this run: {type(err).__name__}: {err}")

    def _diverged(self, step: int, epoch: int, loss: float, lr: float) -> tuple[int, int, int]:
        """A NaN/inf loss at 0-based `step`, before its optimizer step. With rollbacks left (trainer.nan_retries),
        restore the last checkpoint, scale the lr by trainer.nan_lr_factor and return the restored
        (step, epoch, position); otherwise raise TrainingDiverged."""
        tc = self.cfg.trainer
        retries = tc.nan_retries
        if self.nan_rollbacks < retries and self.saved_step >= 0:  # the same decision on every rank
            return self._rollback(step, loss, lr)
        last = f"{self.last_ckpt} (step {self.saved_step})" if self.saved_step >= 0 else "none was written yet"
        tried = ""
        if retries:
            tried = (f"{self.nan_rollbacks} rollback(s) to the last good checkpoint with a lower lr did not help "
                     f"(trainer.nan_retries={retries}, lr scale now {self.lr_scale:g}). ")
        msg = (
            f"loss is {loss} at optimizer step {step + 1} (epoch {epoch}, lr {lr:.3g}); training stopped before "
            f"the optimizer step, so no weights were updated with it. {tried}Last good checkpoint: {last}. "
            f"Try a lower optim.base_lr / optim.lr, a longer warmup (optim.warmup_fraction), gradient clipping "
            f"(optim.clip_grad=1.0), trainer.nan_retries, or trainer.precision=32-true / bf16-mixed instead of "
            f"16-mixed; then resume from the checkpoint or start again."
        )
        self._event({"event": "nan_stop", "nan_step": step + 1, "loss": str(loss), "lr": lr,
                     "rollbacks": self.nan_rollbacks, "lr_scale": self.lr_scale,
                     "last_checkpoint_step": self.saved_step})
        self.print(msg)
        raise TrainingDiverged(msg)

    def _rollback(self, step: int, loss: float, lr: float) -> tuple[int, int, int]:
        tc = self.cfg.trainer
        self.optimizer.zero_grad(set_to_none=True)  # drop the NaN gradients
        ckpt = ckpt_io.load_checkpoint(self.last_ckpt)
        progress = self._load_training_state(self.last_ckpt, ckpt)
        del ckpt
        back, epoch, position = progress["global_step"], progress["epoch"], progress["position"]
        self.nan_rollbacks += 1
        self.lr_scale *= tc.nan_lr_factor
        self.last_metrics.update({"nan_rollbacks": float(self.nan_rollbacks), "lr_scale": self.lr_scale})
        # history and metrics.csv read like the run that goes on from the restored step
        self.history = [h for h in self.history if h["step"] <= back]
        if self.logger is not None and self.logger.csv is not None:
            self.logger.csv = MetricsCSV(self.logger.csv.path, resume_step=back)
        if self.logger is not None:
            self.logger.log({"nan_rollbacks": self.nan_rollbacks, "lr_scale": self.lr_scale}, back)
        self.save(back, epoch, position)  # the same state with the new lr scale: a later resume keeps it
        self._event({"event": "nan_rollback", "nan_step": step + 1, "loss": str(loss), "lr": lr,
                     "rollback_to_step": back, "rollbacks": self.nan_rollbacks, "max_rollbacks": tc.nan_retries,
                     "lr_scale": self.lr_scale})
        self.print(
            f"loss is {loss} at optimizer step {step + 1} (lr {lr:.3g}): rolled back to the checkpoint of step "
            f"{back} ({self.nan_rollbacks}/{tc.nan_retries} rollbacks); lr schedule now x {self.lr_scale:g} "
            f"(trainer.nan_lr_factor={tc.nan_lr_factor:g})"
        )
        if self.bar is not None:
            self.bar.n = back
            self.bar.refresh()
        return back, epoch, position

    def _event(self, record: dict) -> None:
        """Append one JSON line to <run_dir>/events.jsonl (rank 0)."""
        if not self.rank0:
            return
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}
        with open(self.run_dir / "events.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def _result(self, metrics: dict) -> TrainResult:
        fabric = self.fabric
        if self.is_fsdp:  # parameters are sharded: give back the full weights from the final checkpoint
            method = ckpt_io.method_from_checkpoint(self.last_ckpt)[0]
        else:
            method = self.model.module
            method.eval()
        spawned = self.cfg.trainer.strategy == "ddp_spawn" and not (_under_torchrun() or _under_srun())
        if spawned:
            # results cross a process boundary: send no tensors (their shared memory dies with the worker);
            # `train` reloads the method from the final checkpoint in the launching process
            method, data, fabric = None, None, None
        else:
            data = self.data
        return TrainResult(
            run_dir=self.run_dir, method=method, metrics=metrics, data=data, config=self.resolved,
            checkpoint=self.last_ckpt if self.last_ckpt.is_file() else None, history=self.history,
            fabric=fabric,
        )
