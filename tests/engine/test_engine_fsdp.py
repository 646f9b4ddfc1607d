"""FSDP through Fabric on two CPU processes (gloo, torchrun): training matches one process on the same global
batch, and a checkpoint written under FSDP (full state dict, the usual format) resumes exactly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine_tiny import have_images, reordering_floor, tiny_config, tiny_data, worst_weight_gap
from mimkit.engine import train
from mimkit.engine import checkpoint as ckpt_io
from mimkit.engine.trainer import make_fabric

pytestmark = pytest.mark.skipif(not have_images(), reason="needs Fashion-MNIST or the foolbox sample images")

HERE = Path(__file__).resolve().parent


def test_fsdp_strategy_on_cpu_is_built():
    cfg = tiny_config("unused", "trainer.strategy=fsdp")
    fabric = make_fabric(cfg.trainer)
    from lightning.fabric.strategies import FSDPStrategy

    assert isinstance(fabric.strategy, FSDPStrategy)
    assert fabric.strategy._state_dict_type == "full"


def test_two_process_fsdp_matches_one_process_and_resumes(tmp_path):
    # 10 steps of 8 images (8 per epoch: the resumed part crosses the epoch boundary with its validation);
    # the FSDP run stops after step 6, writes a checkpoint and is resumed by the same two processes
    steps = ["optim.max_steps=10", "optim.clip_grad=1000"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(HERE.parents[1] / "src"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(HERE / "fsdp_worker.py"), str(tmp_path), str(tmp_path / "fsdp.pt"), "6",
           "trainer.run_name=fsdp", *steps, "optim.accumulate=2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # the single-process reference runs while the two ranks start up
        single = train(tiny_config(tmp_path, "trainer.run_name=single", *steps), data=tiny_data())
    finally:
        torch.set_num_threads(n)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]

    r = torch.load(tmp_path / "fsdp.pt", weights_only=True)
    assert r["world"] == 2 and r["strategy"] == "CPUFSDPStrategy"
    assert "resumed from" in out and "step 6/10" in out
    # the checkpoint of the stopped FSDP run is an ordinary full one: mid-epoch progress, the unsharded
    # parameter names of the single-process model (no FSDP prefixes), loadable without FSDP
    assert r["stopped_progress"]["global_step"] == 6 and r["stopped_progress"]["position"] == 48
    assert r["stopped_keys"] == sorted(single.method.state_dict())
    history = r["first"] + r["second"]
    assert [h["step"] for h in history] == list(range(1, 11))
    a = torch.tensor([h["loss"] for h in single.history])
    b = torch.tensor([h["loss"] for h in history])
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    assert [h["lr"] for h in history] == [h["lr"] for h in single.history]
    torch.testing.assert_close(torch.tensor([h["grad_norm"] for h in history]),
                               torch.tensor([h["grad_norm"] for h in single.history]), rtol=1e-4, atol=0)
    ref = single.method.state_dict()
    assert r["state"].keys() == ref.keys()
    # as in test_engine_ddp: held to the float32 floor of reordered gradient sums, measured here
    floor = reordering_floor(tmp_path, single, *steps)
    worst = worst_weight_gap(r["state"], ref)
    assert floor < 1e-3 and worst <= max(1e-5, 2 * floor), (worst, floor)
    assert abs(r["metrics"]["val_loss"] - single.metrics["val_loss"]) < 1e-5
    # the final FSDP checkpoint loads into a plain (unwrapped) model
    method = ckpt_io.method_from_checkpoint(tmp_path / "fsdp" / "checkpoints" / "last.ckpt")[0]
    assert all(torch.equal(method.state_dict()[k], r["state"][k]) for k in ref)
