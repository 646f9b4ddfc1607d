"""Run setup: the Fabric for the trainer section (torchrun, srun, FSDP on CPU or GPU) and run folders.

Launchers: under torchrun or srun the device count and node count follow the launcher's world, and
strategy auto becomes ddp. FSDP wraps transformer blocks one by one and writes full (unsharded) state dicts,
so every strategy writes the same checkpoint format.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import torch

from mimkit.config import PretrainConfig
from mimkit.engine import checkpoint as ckpt_io


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


def new_run_dir(cfg: PretrainConfig) -> Path:
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
