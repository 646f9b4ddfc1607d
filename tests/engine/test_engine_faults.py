"""Faults in training: SIGKILL at random moments (checkpoints never corrupt, resume bit-exact) and NaN/inf
losses rolled back to the last good checkpoint with a lower lr (trainer.nan_retries / nan_lr_factor)."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from engine_tiny import have_images, non_finite_method, tiny_config, tiny_data
from mimkit.engine import TrainingDiverged, train
from mimkit.engine import checkpoint as ckpt_io
from mimkit.engine.metrics import read_metrics
from mimkit.engine.optim import lr_at, warmup_steps

pytestmark = pytest.mark.skipif(not have_images(), reason="needs Fashion-MNIST or the foolbox sample images")


def _state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def _nested_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_nested_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_nested_equal, a, b))
    return a == b


def _is_temp(p: Path) -> bool:
    return p.name.startswith(".") and p.name.endswith(".tmp")


# ----------------------------------------------------------------------------------------------------------
# SIGKILL

STEPS = 40  # 64 images / 8 per step: 8 steps per epoch, 5 epochs with validation
KILL_COMMON = ["model.depth=1", f"optim.max_steps={STEPS}", "trainer.checkpoint_every_steps=2",
               "trainer.checkpoint_every_epochs=null", "model.drop_path=0.1", "optim.clip_grad=1.0"]


def _kill_context():
    """A forkserver that imports torch, Lightning and mimkit once: each worker then starts in a fraction of a
    second instead of a fresh interpreter's seconds of imports (children are forked from a process that never
    ran torch code, unlike this one)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["pytest", "torch", "lightning.fabric", "timm", "mimkit.engine.trainer",
                                "mimkit.methods"])
    return ctx


def _run_and_kill(ctx, out_dir: Path, name: str, mode: str, at_step: int, delay: float, log: Path) -> dict:
    """Run kill_worker in a child process; once it has begun step >= at_step, SIGKILL it: after `delay`
    seconds in mode "plain" (or at the start of step at_step + 3 if sooner), in the first checkpoint's
    commit/write pause in the slow modes."""
    import kill_worker

    worker_mode = mode if mode == "plain" else f"{mode}:{at_step}"
    reader, writer = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=kill_worker.child_main, daemon=True,
                       args=(writer, str(log), str(out_dir), name, worker_mode, KILL_COMMON))
    proc.start()
    writer.close()
    last_step, marker, said = None, None, []
    try:
        while True:
            assert reader.poll(120), f"the worker went silent; its log: {log.read_text()[-3000:]}"
            try:
                word, _, arg = reader.recv_bytes().decode().partition(" ")
            except EOFError:
                raise AssertionError(f"the worker ended before the kill ({said[-3:]}); its log: "
                                     f"{log.read_text()[-3000:]}") from None
            said.append(word)
            if word == "step":
                last_step = int(arg)
                if last_step >= at_step and mode == "plain":
                    # wait `delay` s, but on a fast machine not past the start of step at_step + 3
                    deadline = time.monotonic() + delay
                    while last_step < at_step + 3 and reader.poll(max(0.0, deadline - time.monotonic())):
                        word, _, arg = reader.recv_bytes().decode().partition(" ")
                        last_step = int(arg) if word == "step" else last_step
                    break
            elif word in ("commit", "write"):
                marker = arg
                break
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(60)
    finally:
        if proc.exitcode is None:
            proc.kill()
            proc.join()
        reader.close()
    assert proc.exitcode == -signal.SIGKILL, f"exit code {proc.exitcode}; its log: {log.read_text()[-3000:]}"
    return {"last_step": last_step, "marker": marker}


def _check_checkpoints(ckpt_dir: Path) -> tuple[int | None, list[Path]]:
    """Every real file in checkpoints/ is a whole, loadable checkpoint; returns last.ckpt's step and the temps."""
    temps, step = [], None
    for p in sorted(ckpt_dir.iterdir()) if ckpt_dir.is_dir() else []:
        if _is_temp(p):
            temps.append(p)
            continue
        state = torch.load(p, map_location="cpu", weights_only=True)  # raises on a partial file
        assert state["format"] == "mimkit-checkpoint" and {"model", "optimizer", "rng", "progress"} <= state.keys()
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
        if p.name == "last.ckpt":
            step = int(state["progress"]["global_step"])
    return step, temps


def test_sigkill_at_random_moments_leaves_whole_checkpoints_and_resume_is_exact(tmp_path):
    ref = train(tiny_config(tmp_path, "trainer.run_name=ref", *KILL_COMMON), data=tiny_data())
    assert ref.metrics["global_step"] == STEPS

    rnd = random.Random(1124)
    run = tmp_path / "killed"
    ckpt_dir = run / "checkpoints"
    log = tmp_path / "worker.log"
    # (mode, kill once step >= at, delay): the first kill may come before any checkpoint exists; "plain" kills
    # land anywhere in a step (now and then inside a checkpoint write); the slow modes kill with a checkpoint's
    # temp file complete but not yet renamed, and half written
    modes = ["plain", "slow_commit", "plain", "plain", "slow_write", "plain", "slow_commit", "plain"]
    at, plan = rnd.randint(0, 3), []
    for mode in modes:
        plan.append((mode, at, rnd.uniform(0.0, 0.06) if mode == "plain" else 0.0))
        at += rnd.randint(2, 4)
    assert plan[-1][1] < STEPS - 2
    prev, ctx = -1, _kill_context()
    for mode, at_step, delay in plan:
        t0 = time.perf_counter()
        said = _run_and_kill(ctx, tmp_path, "killed", mode, at_step, delay, log)
        assert said["last_step"] is not None and said["last_step"] >= at_step, (mode, said)
        step, temps = _check_checkpoints(ckpt_dir)
        print(f"{mode} kill at step >= {at_step} (+{delay:.3f} s): worker said step {said['last_step']}, "
              f"{said['marker']}; last.ckpt step {step}, temps {[t.name for t in temps]}; "
              f"{time.perf_counter() - t0:.2f} s")
        assert step is None or step % 2 == 0, (mode, step, said)
        assert (step if step is not None else -1) >= prev  # never loses saved progress
        if mode == "slow_commit":
            # killed between the finished temp file and the rename: last.ckpt is the previous checkpoint
            assert said["marker"] == "last.ckpt" and [t.name for t in temps] == [".last.ckpt.tmp"]
            newer = torch.load(temps[0], map_location="cpu", weights_only=True)["progress"]["global_step"]
            assert newer == (step if step is not None else 0) + 2
        elif mode == "slow_write":
            # killed in the middle of writing: a half file exists, but only under the temp name
            assert said["marker"] == ".last.ckpt.tmp" and [t.name for t in temps] == [".last.ckpt.tmp"]
            with pytest.raises(Exception):
                torch.load(temps[0], map_location="cpu", weights_only=True)
            assert step is not None
        prev = step if step is not None else -1

    final = train(tiny_config(tmp_path, "trainer.run_name=killed", *KILL_COMMON), resume="auto", data=tiny_data())
    assert final.run_dir == run and final.metrics["global_step"] == STEPS
    assert not any(_is_temp(p) for p in run.rglob("*")), "stale temp files were not cleaned"
    assert final.history and final.history[0]["step"] == prev + 1
    # the same weights, optimizer state and losses as the run that was never interrupted
    assert _state_equal(final.method.state_dict(), ref.method.state_dict())
    a = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(ref.checkpoint, map_location="cpu", weights_only=True)
    assert _nested_equal(a["optimizer"], b["optimizer"]) and a["progress"] == b["progress"]
    n = len(final.history)
    assert [h["loss"] for h in final.history] == [h["loss"] for h in ref.history][-n:]
    assert final.metrics["val_loss"] == ref.metrics["val_loss"]


def test_epoch_end_checkpoint_is_written_after_validation(tmp_path, monkeypatch):
    """A step checkpoint that falls on an epoch's last step waits for the validation: a run killed during
    the validation resumes before it and validates again (nothing of the epoch end is skipped)."""
    from mimkit.engine.callbacks.validation import Validation
    from mimkit.engine.loop import Loop

    order = []
    save, validate = Loop.save_checkpoint, Validation.validate

    def rec_save(self, keep_copy=False):
        order.append(("save", self.step, self.epoch, self.position))
        return save(self, keep_copy)

    def rec_validate(self, run):
        order.append(("validate",))
        return validate(self, run)

    monkeypatch.setattr(Loop, "save_checkpoint", rec_save)
    monkeypatch.setattr(Validation, "validate", rec_validate)
    train(tiny_config(tmp_path, "model.depth=1", "optim.max_steps=12", "trainer.checkpoint_every_steps=4",
                      "trainer.checkpoint_every_epochs=null"), data=tiny_data())
    assert order == [("save", 4, 0, 32), ("validate",), ("save", 8, 1, 0), ("save", 12, 1, 32), ("validate",)]


# ----------------------------------------------------------------------------------------------------------
# NaN rollback


NAN_COMMON = ["model.depth=1", "optim.max_steps=12", "optim.min_lr=1e-4", "trainer.checkpoint_every_steps=4"]


def _cfg(tmp_path, name, *overrides):
    return tiny_config(tmp_path, f"trainer.run_name={name}", *NAN_COMMON, *overrides)


_method = non_finite_method


def _schedule(cfg, scale=1.0):
    total, oc = cfg.optim.max_steps, cfg.optim
    w = warmup_steps(total, oc.warmup_fraction)
    return [lr_at(s, total, w, oc.lr * scale, oc.min_lr * scale) for s in range(total)]


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def test_nan_rolls_back_lowers_the_lr_and_finishes(tmp_path):
    clean_cfg = _cfg(tmp_path, "clean")
    clean = train(clean_cfg, data=tiny_data(), method=_method(clean_cfg))
    cfg = _cfg(tmp_path, "nan", "trainer.nan_retries=2", "trainer.nan_lr_factor=0.5")
    method = _method(cfg, {6: 1})  # the 7th optimizer step's loss is NaN, once
    res = train(cfg, data=tiny_data(), method=method)
    assert method.nan_plan == {6: 0}
    assert res.metrics["global_step"] == 12 and res.metrics["nan_rollbacks"] == 1 and res.metrics["lr_scale"] == 0.5
    # history reads like the run that went on from the checkpoint of step 4, with half the lr from there on
    assert [h["step"] for h in res.history] == list(range(1, 13))
    lrs = [h["lr"] for h in res.history]
    assert lrs[:4] == pytest.approx(_schedule(cfg)[:4], rel=1e-12)
    assert lrs[4:] == pytest.approx(_schedule(cfg, 0.5)[4:], rel=1e-12)
    assert [h["lr"] for h in clean.history] == pytest.approx(_schedule(cfg), rel=1e-12)
    # weights, optimizer, RNG and data position were restored exactly: step 5 (the first after the rollback,
    # its loss computed before its update) repeats the clean run's; step 6 follows a smaller update
    losses, clean_losses = [h["loss"] for h in res.history], [h["loss"] for h in clean.history]
    assert losses[:5] == clean_losses[:5] and losses[5] != clean_losses[5]
    # logged: events.jsonl, a metrics.csv row, and the checkpoint (so that a resume keeps the lower lr)
    (ev,) = _events(res.run_dir)
    assert ev["event"] == "nan_rollback" and ev["nan_step"] == 7 and ev["loss"] == "nan"
    assert ev["rollback_to_step"] == 4 and ev["rollbacks"] == 1 and ev["max_rollbacks"] == 2 and ev["lr_scale"] == 0.5
    rows = read_metrics(res.run_dir / "metrics.csv")
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 13))  # the abandoned steps 5, 6 are gone
    assert [(r["step"], r["nan_rollbacks"], r["lr_scale"]) for r in rows if "nan_rollbacks" in r] == [(4, 1, 0.5)]
    ckpt = ckpt_io.load_checkpoint(res.checkpoint)
    assert ckpt["nan_guard"] == {"lr_scale": 0.5, "rollbacks": 1} and ckpt["progress"]["global_step"] == 12
    # the whole run equals a clean one stopped at step 4 whose checkpoint is given the lr scale 0.5 and resumed:
    # the rollback restored the weights, the AdamW state, the RNG and the data position exactly
    part_cfg = _cfg(tmp_path, "ref", "trainer.stop_after_steps=4")
    train(part_cfg, data=tiny_data(), method=_method(part_cfg))
    path = tmp_path / "ref" / "checkpoints" / "last.ckpt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert "nan_guard" in state
    state["nan_guard"] = {"lr_scale": 0.5, "rollbacks": 1}
    torch.save(state, path)
    ref = train(_cfg(tmp_path, "ref"), resume="auto", data=tiny_data())
    assert [h["loss"] for h in ref.history] == losses[4:] and [h["lr"] for h in ref.history] == lrs[4:]
    assert _state_equal(ref.method.state_dict(), res.method.state_dict())
    assert ref.metrics["nan_rollbacks"] == 1


def test_nan_before_any_checkpoint_and_the_lr_scale_survives_resume(tmp_path):
    # an uninterrupted run: NaN at the 2nd step rolls back to the checkpoint written at the start
    cfg = _cfg(tmp_path, "full", "trainer.nan_retries=1", "trainer.nan_lr_factor=0.25")
    full = train(cfg, data=tiny_data(), method=_method(cfg, {1: 1}))
    assert [h["lr"] for h in full.history] == pytest.approx(_schedule(cfg, 0.25), rel=1e-12)
    (ev,) = _events(full.run_dir)
    assert ev["rollback_to_step"] == 0 and ev["nan_step"] == 2
    # the same, stopped after 3 steps and resumed with a plain method: the lower lr and the count carry over
    part_cfg = _cfg(tmp_path, "part", "trainer.nan_retries=1", "trainer.nan_lr_factor=0.25",
                    "trainer.stop_after_steps=3")
    part = train(part_cfg, data=tiny_data(), method=_method(part_cfg, {1: 1}))
    assert part.metrics["stopped_early"] and part.metrics["nan_rollbacks"] == 1
    resumed = train(_cfg(tmp_path, "part", "trainer.nan_retries=1", "trainer.nan_lr_factor=0.25"),
                    resume="auto", data=tiny_data())
    assert [h["step"] for h in resumed.history] == list(range(4, 13))
    assert [h["lr"] for h in resumed.history] == [h["lr"] for h in full.history][3:]
    assert resumed.metrics["nan_rollbacks"] == 1 and resumed.metrics["lr_scale"] == 0.25
    assert _state_equal(resumed.method.state_dict(), full.method.state_dict())


def test_nan_after_all_retries_stops_with_the_last_good_checkpoint(tmp_path):
    cfg = _cfg(tmp_path, "stuck", "trainer.nan_retries=2", "trainer.nan_lr_factor=0.5")
    method = _method(cfg, {5: 99})  # the 6th step's loss is NaN whatever the lr
    with pytest.raises(TrainingDiverged) as err:
        train(cfg, data=tiny_data(), method=method)
    assert method.nan_plan[5] == 99 - 3  # two rollbacks, then the third NaN stops the run
    msg = str(err.value)
    assert "loss is nan at optimizer step 6" in msg and "2 rollback(s)" in msg and "nan_retries=2" in msg
    assert "step 4" in msg
    events = _events(tmp_path / "stuck")
    assert [(e["event"], e["lr_scale"]) for e in events] == [("nan_rollback", 0.5), ("nan_rollback", 0.25),
                                                             ("nan_stop", 0.25)]
    ckpt = ckpt_io.load_checkpoint(tmp_path / "stuck" / "checkpoints" / "last.ckpt")
    assert ckpt["progress"]["global_step"] == 4 and ckpt["nan_guard"] == {"lr_scale": 0.25, "rollbacks": 2}
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert all(torch.isfinite(p).all() for p in method.parameters())
    assert not list((tmp_path / "stuck").rglob("*.tmp"))
