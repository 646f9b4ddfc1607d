"""Two CPU processes (DDP, gloo) launched by torchrun match one process on the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine_tiny import have_images, reordering_floor, tiny_config, tiny_data, worst_weight_gap
from mimkit.engine import train

pytestmark = pytest.mark.skipif(not have_images(), reason="needs Fashion-MNIST or the foolbox sample images")

HERE = Path(__file__).resolve().parent


def test_two_process_ddp_matches_one_process(tmp_path):
    # clip_grad far above the gradient norm: nothing is clipped, but the pre-clip norm is recorded, and it
    # checks the gradient scale (AdamW alone would hide a wrongly scaled gradient)
    steps = ["optim.max_steps=5", "optim.clip_grad=1000"]
    # two ranks x 2 images x 2 accumulation steps = the single process's 8 images per optimizer step
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(HERE.parents[1] / "src"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(HERE / "ddp_worker.py"), str(tmp_path), str(tmp_path / "ddp.pt"),
           "trainer.run_name=ddp", *steps, "optim.accumulate=2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # the single-process reference runs while the two ranks start up
        single = train(tiny_config(tmp_path, "trainer.run_name=single", *steps), data=tiny_data())
    finally:
        torch.set_num_threads(n)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-4000:]

    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert ddp["world"] == 2
    a = torch.tensor([h["loss"] for h in single.history])
    b = torch.tensor([h["loss"] for h in ddp["history"]])
    assert len(a) == len(b) == 5
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    assert [h["lr"] for h in ddp["history"]] == [h["lr"] for h in single.history]
    norms = [[h["grad_norm"] for h in r] for r in (single.history, ddp["history"])]
    torch.testing.assert_close(torch.tensor(norms[1]), torch.tensor(norms[0]), rtol=1e-4, atol=0)
    # the weights: as close as one process gets to itself when only the order of its gradient sums changes
    floor = reordering_floor(tmp_path, single, *steps)
    worst = worst_weight_gap(ddp["state"], single.method.state_dict())
    assert floor < 1e-3 and worst <= max(1e-5, 2 * floor), (worst, floor)
    assert abs(ddp["metrics"]["val_loss"] - single.metrics["val_loss"]) < 1e-5


@pytest.mark.slow
def test_ddp_spawn_matches_one_process(tmp_path):
    """strategy=ddp_spawn from inside this process: the result comes back with the method reloaded."""
    steps = ["optim.max_steps=3", "optim.clip_grad=1000"]
    spawned = train(tiny_config(tmp_path, "trainer.run_name=spawn", "trainer.strategy=ddp_spawn",
                                "trainer.devices=2", *steps), data=tiny_data())
    single = train(tiny_config(tmp_path, "trainer.run_name=single", *steps), data=tiny_data())
    assert spawned.fabric is None and spawned.checkpoint.is_file()
    a = torch.tensor([[h["loss"], h["grad_norm"]] for h in single.history])
    b = torch.tensor([[h["loss"], h["grad_norm"]] for h in spawned.history])
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    worst = worst_weight_gap(spawned.method.state_dict(), single.method.state_dict())
    assert worst <= max(1e-5, 2 * reordering_floor(tmp_path, single, *steps)), worst
