"""The launch commands of docs/distributed.md, run as documented on 2 CPU processes (gloo): torchrun (start,
stop after 2 steps, resume) and the environment `srun` gives the tasks of examples/slurm/pretrain.sbatch."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "distributed.md"

pytestmark = pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file(),
                                reason="the documented example pretrains on Fashion-MNIST")


def documented(tag: str) -> list[str]:
    """The command of the fenced block that starts with `# tested: TAG`, as an argv."""
    text = DOC.read_text()
    m = re.search(r"```bash\n# tested: " + re.escape(tag) + r"\n(.*?)```", text, re.S)
    assert m, f"no block tagged {tag} in {DOC}"
    return shlex.split(m.group(1).replace("\\\n", " "))


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]))
    return env


def _torchrun(argv: list[str], cwd: Path) -> str:
    assert argv[:2] == ["OMP_NUM_THREADS=1", "torchrun"], argv[:2]
    cmd = [sys.executable, "-m", "torch.distributed.run", *argv[2:]]
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout


def _ckpt(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def test_documented_torchrun_commands_train_and_resume(tmp_path):
    start, resume = documented("torchrun-start"), documented("torchrun-resume")
    out = _torchrun(start, tmp_path)
    run = tmp_path / "runs" / "torchrun-demo"
    assert "2 device(s) x 8 x 2 accumulation" in out, out[-3000:]
    assert "stopped after step 2" in out
    assert _ckpt(run)["progress"]["global_step"] == 2
    out = _torchrun(resume, tmp_path)
    assert "resumed from" in out and "step 2/4" in out and "2 device(s) x 8 x 2 accumulation" in out
    ckpt = _ckpt(run)
    assert ckpt["progress"]["global_step"] == 4
    rows = [r.split(",") for r in (run / "metrics.csv").read_text().splitlines()]
    assert rows[0][:2] == ["step", "loss"] and ["4", "val_loss"] == [rows[-1][0], rows[0][-1]] and rows[-1][-1]
    assert (run / "results.json").is_file()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_srun_environment_forms_the_world(tmp_path):
    """What examples/slurm/pretrain.sbatch's `srun` starts: N copies of `python -m mimkit pretrain`, each with its
    SLURM_* variables; no torchrun. The recipe's trainer.devices=1 is overridden by the job's shape."""
    sbatch = (REPO / "examples" / "slurm" / "pretrain.sbatch").read_text()
    assert "srun " in sbatch and "python -m mimkit pretrain" in sbatch and "--resume auto" in sbatch
    argv = documented("torchrun-start")
    args = argv[argv.index("pretrain") + 1:]  # the overrides after `-m mimkit pretrain`
    args = [a for a in args if not a.startswith(("trainer.run_name", "trainer.stop_after_steps"))]
    port = _free_port()
    procs = []
    for rank in range(2):
        env = _env()
        env.update(SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", SLURM_NNODES="1", SLURM_NODEID="0",
                   SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NODELIST="127.0.0.1",
                   SLURM_JOB_NAME="srun-demo", SLURM_JOB_ID="4242", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        cmd = [sys.executable, "-m", "mimkit", "pretrain", "--resume", "auto", "trainer.run_name=srun-demo",
               "trainer.devices=1", *args]
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    assert "2 device(s) x 8 x 2 accumulation" in outs[0], outs[0][-3000:]
    assert _ckpt(tmp_path / "runs" / "srun-demo")["progress"]["global_step"] == 4
