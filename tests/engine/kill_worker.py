"""A tiny pretraining run in a process of its own, for test_engine_faults to kill with SIGKILL.

The test starts `child_main` through a multiprocessing "forkserver" that has torch, Lightning and mimkit
imported already (a fresh interpreter per kill would spend seconds on imports); by hand:

    python kill_worker.py OUT_DIR RUN_NAME MODE [config overrides...]

Either way the run is tiny_config(OUT_DIR, trainer.run_name=RUN_NAME, overrides) on tiny_data(), resuming the
run if it has a checkpoint (resume="auto"), and it reports (on stdout, or as messages on a pipe):
  "ready"          just before train() is called
  "step N"         when optimizer step N (0-based) begins (the trainer asks for its lr)
  "done N"         after a complete run
MODE "plain" changes nothing else. Two modes stretch the checkpoint writes made once step AT has begun, so that
the test can kill the process at a chosen moment of one (the trainer's own code runs unchanged; only the disk
is made slow):
  "slow_commit:AT" "commit NAME" once a checkpoint's temp file is complete, then a pause before the rename
  "slow_write:AT"  "write NAME" when half of a checkpoint's temp file is on disk, then a pause before the rest
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from engine_tiny import tiny_config, tiny_data  # noqa: E402

PAUSE_S = 5.0  # long enough for the test to see the message and kill


def run(say, out_dir: str, run_name: str, mode: str, overrides=()) -> None:
    torch.set_num_threads(1)  # as in the tests: bitwise comparisons need the same thread count
    from lightning.fabric import Fabric

    import mimkit.engine.loop as loop_mod
    import mimkit.engine.trainer as trainer_mod
    from mimkit.engine import checkpoint as ckpt_io

    lr_at = loop_mod.lr_at
    mode, _, at = mode.partition(":")
    at = int(at or 0)
    current = [-1]

    def announcing_lr_at(step, *args, **kwargs):
        current[0] = step
        say(f"step {step}")
        return lr_at(step, *args, **kwargs)

    loop_mod.lr_at = announcing_lr_at

    if mode == "slow_commit":
        commit = ckpt_io.commit_file

        def slow_commit(tmp, path):
            if str(path).endswith(".ckpt") and current[0] >= at:
                say(f"commit {Path(path).name}")
                time.sleep(PAUSE_S)
            commit(tmp, path)

        ckpt_io.commit_file = slow_commit
    elif mode == "slow_write":
        save = Fabric.save

        def slow_save(self, path, state, *args, **kwargs):
            save(self, path, state, *args, **kwargs)
            if current[0] < at:
                return
            data = Path(path).read_bytes()
            half = len(data) // 2
            with open(path, "wb") as fh:  # the same bytes again, slowly
                fh.write(data[:half])
                fh.flush()
                os.fsync(fh.fileno())
                say(f"write {Path(path).name}")
                time.sleep(PAUSE_S)
                fh.write(data[half:])

        Fabric.save = slow_save
    elif mode != "plain":
        raise SystemExit(f"unknown mode {mode!r}")

    cfg = tiny_config(out_dir, f"trainer.run_name={run_name}", *overrides)
    say("ready")
    result = trainer_mod.train(cfg, resume="auto", data=tiny_data())
    say(f"done {result.metrics['global_step']}")


def child_main(conn, log: str, out_dir: str, run_name: str, mode: str, overrides=()) -> None:
    """Entry point in a multiprocessing child: messages go to the pipe `conn`, stderr to the file `log`."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 2)
    os.close(fd)
    run(lambda msg: conn.send_bytes(msg.encode()), out_dir, run_name, mode, overrides)
    conn.close()


if __name__ == "__main__":
    def _say(msg: str) -> None:
        sys.stdout.write(msg + "\n")
        sys.stdout.flush()

    run(_say, *sys.argv[1:4], overrides=sys.argv[4:])
