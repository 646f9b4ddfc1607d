"""Soak test (slow, not in CI): many epochs with periodic SIGKILLs, each followed by a resume.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -m slow -s tests/engine/test_soak.py

A training process (tests/engine/kill_worker.py, forked from a forkserver that has torch and mimkit imported)
trains 30 epochs of a tiny MAE; the test SIGKILLs it after a random number of optimizer steps, checks that
every file in checkpoints/ is a whole, loadable checkpoint whose step never goes backwards, and starts it again
(resume="auto"), until the run finishes. Then:

* nothing is lost: the final checkpoint (weights, AdamW state, progress) and validation loss equal, bit for
  bit, those of the same run never interrupted;
* memory is steady: the resident set size (VmRSS) of each worker is sampled at every step; a worker's peak
  exceeds the first worker's peak by at most SOAK_RSS_SLACK_MIB across the resumes, and the last worker (the
  longest-lived, many epochs) grows by at most that much between its 20th step and its end.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from engine_tiny import have_images, tiny_config, tiny_data
from mimkit.engine import train
from test_engine_faults import _check_checkpoints, _is_temp, _kill_context, _nested_equal, _state_equal

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not have_images(), reason="needs Fashion-MNIST or the foolbox sample images")]

EPOCHS = 30
STEPS = 8 * EPOCHS  # 64 images / 8 per step
KILLS = 12
RSS_SLACK_MIB = float(os.environ.get("SOAK_RSS_SLACK_MIB", 48))
COMMON = ["model.depth=1", f"optim.max_steps={STEPS}", "trainer.checkpoint_every_steps=5",
          "trainer.checkpoint_every_epochs=1", "model.drop_path=0.1", "optim.clip_grad=1.0"]


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _worker(ctx, out_dir: Path, log: Path, kill_after: int | None) -> dict:
    """Run kill_worker until it has done `kill_after` steps (then SIGKILL) or until it finishes (None)."""
    import kill_worker

    reader, writer = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=kill_worker.child_main, daemon=True,
                       args=(writer, str(log), str(out_dir), "soak", "plain", COMMON))
    proc.start()
    writer.close()
    rss, first_step, last_step, done = [], None, None, False
    try:
        while True:
            assert reader.poll(300), f"the worker went silent; its log: {log.read_text()[-3000:]}"
            try:
                word, _, arg = reader.recv_bytes().decode().partition(" ")
            except EOFError:
                raise AssertionError(f"the worker ended unexpectedly; its log: {log.read_text()[-3000:]}") from None
            if word == "step":
                last_step = int(arg)
                first_step = last_step if first_step is None else first_step
                r = _rss_mib(proc.pid)
                if r is not None:
                    rss.append(r)
                if kill_after is not None and last_step - first_step >= kill_after:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
            elif word == "done":
                done = True
                break
        proc.join(60)
    finally:
        if proc.exitcode is None:
            proc.kill()
            proc.join()
        reader.close()
    if kill_after is not None:
        assert proc.exitcode == -signal.SIGKILL, proc.exitcode
    return {"first_step": first_step, "last_step": last_step, "rss": rss, "done": done}


def test_soak_many_epochs_with_periodic_kills(tmp_path):
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    ref = train(tiny_config(tmp_path, "trainer.run_name=ref", *COMMON), data=tiny_data())
    t_ref = time.perf_counter() - t0
    assert ref.metrics["global_step"] == STEPS

    rnd = random.Random(20261124)
    ctx = _kill_context()
    log = tmp_path / "worker.log"
    ckpt_dir = tmp_path / "soak" / "checkpoints"
    segments, prev = [], -1
    for kill in range(KILLS):
        seg = _worker(ctx, tmp_path, log, kill_after=rnd.randint(4, 16))
        step, temps = _check_checkpoints(ckpt_dir)  # every checkpoint file whole and loadable
        assert step is None or step >= prev, (step, prev)
        prev = step if step is not None else -1
        segments.append(seg)
        print(f"kill {kill + 1}: steps {seg['first_step']}..{seg['last_step']}, last.ckpt step {step}, "
              f"temps {[t.name for t in temps]}, RSS peak {max(seg['rss']):.0f} MiB")
    last = _worker(ctx, tmp_path, log, kill_after=None)
    assert last["done"]
    segments.append(last)
    elapsed = time.perf_counter() - t0

    # nothing lost: bitwise the uninterrupted run
    run = tmp_path / "soak"
    assert not any(_is_temp(p) for p in run.rglob("*"))
    a = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(ref.checkpoint, map_location="cpu", weights_only=True)
    assert a["progress"] == b["progress"] and a["progress"]["global_step"] == STEPS
    assert _state_equal(a["model"], b["model"])
    assert _nested_equal(a["optimizer"], b["optimizer"])
    assert a["metrics"]["val_loss"] == b["metrics"]["val_loss"] == ref.metrics["val_loss"]

    # steady memory
    peaks = [max(s["rss"]) for s in segments]
    tail = last["rss"]
    assert len(tail) > 40, "the last worker should train for several epochs"
    growth_in_run = tail[-1] - tail[19]
    print(f"soak: {EPOCHS} epochs, {STEPS} steps, {KILLS} SIGKILLs + resumes; reference run {t_ref:.1f} s, "
          f"all {elapsed:.1f} s; RSS peak per worker (MiB): {', '.join(f'{p:.0f}' for p in peaks)}; last worker "
          f"{len(tail)} steps: step 20 {tail[19]:.0f} MiB -> end {tail[-1]:.0f} MiB ({growth_in_run:+.1f})")
    assert max(peaks) - peaks[0] <= RSS_SLACK_MIB, peaks
    assert growth_in_run <= RSS_SLACK_MIB, (tail[19], tail[-1])
