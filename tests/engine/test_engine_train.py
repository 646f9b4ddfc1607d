"""The training engine on the CPU: loss goes down on real images, exact resume, atomic checkpoints,
NaN stop, fixed validation masks, run directory contents."""

from __future__ import annotations

import math
import os
import time

import pytest
import torch

from engine_tiny import have_images, tiny_config, tiny_data
from mimkit.config import ConfigError, load_config
from mimkit.engine import TrainingDiverged, method_from_checkpoint, train
from mimkit.engine import checkpoint as ckpt_io
from mimkit.engine.metrics import read_metrics
from mimkit.engine.optim import no_decay_names
from mimkit.methods import MAE, build_method

pytestmark = pytest.mark.skipif(not have_images(), reason="needs Fashion-MNIST or the foolbox sample images")



def _state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def test_pretrain_lowers_loss_on_fashion_mnist(tmp_path, fashion_mnist_dir):
    cfg = load_config(None, [
        f"trainer.out_dir={tmp_path}", "trainer.accelerator=cpu", "trainer.progress=false",
        "trainer.log_every_steps=5", "data.num_workers=0", "data.limit=480", "data.val_fraction=0.002",
        "data.stats_samples=200", "model.decoder=tiny", "optim.batch_size=16", "optim.lr=1e-3",
        "optim.max_steps=30", "optim.warmup_fraction=0.1",
    ])
    result = train(cfg)
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.85 * first, (first, last)
    # default run name: method-encoder-dataset-timestamp, with everything the run promises inside
    run = result.run_dir
    assert run.parent == tmp_path and run.name.startswith("mae-vit_tiny-fashionmnist-")
    for name in ("config.yaml", "metrics.csv", "checkpoints/last.ckpt"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").rglob("events.out.tfevents*"))
    rows = read_metrics(run / "metrics.csv")
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [5, 10, 15, 20, 25, 30]
    assert all({"lr", "images_per_s", "epoch"} <= r.keys() for r in train_rows)
    assert any("val_loss" in r for r in rows) and result.metrics["val_loss"] is not None
    # the resolved config names the run and the data statistics; the checkpoint rebuilds the method
    assert result.is_global_zero and result.world_size == 1 and not result.method.training
    assert result.config.trainer.run_name == run.name and result.config.data.mean == result.data.mean
    method, cfg2, ckpt = method_from_checkpoint(run / "checkpoints" / "last.ckpt")
    assert ckpt["progress"]["global_step"] == 30 and ckpt["data"]["img_size"] == [28, 28]
    assert _state_equal(method.state_dict(), result.method.state_dict())


def _tiny_run(tmp_path, name, *overrides, resume=None, method=None):
    cfg = tiny_config(tmp_path, f"trainer.run_name={name}", *overrides)
    return train(cfg, resume=resume, data=tiny_data(), method=method)


def test_resume_continues_exactly(tmp_path):
    # 64 images / 8 per step = 8 steps per epoch; accumulation 2, drop path (uses the torch RNG), an epoch
    # boundary with validation and checkpoint inside the resumed part, stop in the middle of epoch 0
    common = ["optim.max_steps=11", "optim.accumulate=2", "model.drop_path=0.1", "optim.clip_grad=1.0"]
    full = _tiny_run(tmp_path, "full", *common)
    part = _tiny_run(tmp_path, "part", *common, "trainer.stop_after_steps=5")
    assert part.metrics["stopped_early"] and part.metrics["global_step"] == 5
    saved = torch.load(part.checkpoint, map_location="cpu", weights_only=True)
    assert saved["progress"] == {"global_step": 5, "epoch": 0, "position": 40, "total_steps": 11}
    resumed = _tiny_run(tmp_path, "part", *common, resume="auto")
    assert resumed.run_dir == part.run_dir
    assert [h["step"] for h in resumed.history] == list(range(6, 12))
    full_losses = [h["loss"] for h in full.history]
    assert [h["loss"] for h in part.history] == full_losses[:5]
    assert [h["loss"] for h in resumed.history] == full_losses[5:]  # bit-identical, fp32 CPU
    assert [h["lr"] for h in resumed.history] == [h["lr"] for h in full.history][5:]
    assert _state_equal(full.method.state_dict(), resumed.method.state_dict())
    assert resumed.metrics["val_loss"] == full.metrics["val_loss"]
    # metrics.csv of the resumed run reads like the uninterrupted one
    strip = lambda rows: [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]  # noqa: E731
    assert strip(read_metrics(resumed.run_dir / "metrics.csv")) == strip(read_metrics(full.run_dir / "metrics.csv"))
    # resume by explicit checkpoint path works too, and a finished run has nothing left to do
    csv_before = (resumed.run_dir / "metrics.csv").read_text()
    again = _tiny_run(tmp_path, "part", *common, resume=str(resumed.checkpoint))
    assert again.history == [] and again.metrics["global_step"] == 11
    assert (resumed.run_dir / "metrics.csv").read_text() == csv_before


def test_the_weight_decay_schedule_is_applied_every_step_and_resumes_exactly(tmp_path):
    # optim.weight_decay_end: the decayed group's weight decay follows the cosine of the step, set in the loop
    common = ["optim.max_steps=8", "optim.weight_decay=0.04", "optim.weight_decay_end=0.4"]
    full = _tiny_run(tmp_path, "wd_full", *common)
    constant = _tiny_run(tmp_path, "wd_constant", "optim.max_steps=8", "optim.weight_decay=0.04")
    assert not _state_equal(full.method.state_dict(), constant.method.state_dict())
    part = _tiny_run(tmp_path, "wd_part", *common, "trainer.stop_after_steps=5")
    groups = torch.load(part.checkpoint, map_location="cpu", weights_only=True)["optimizer"]["param_groups"]
    step = 4  # the last step taken (0-based), on a cosine from 0.04 to 0.4 over the 8 steps
    expected = 0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi * step / 8))
    assert sorted(g["weight_decay"] for g in groups) == pytest.approx([0.0, expected])
    resumed = _tiny_run(tmp_path, "wd_part", *common, resume="auto")
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history][5:]
    assert _state_equal(full.method.state_dict(), resumed.method.state_dict())


def test_checkpoints_are_atomic_and_weights_only(tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    stale = run / "checkpoints" / ".last.ckpt.tmp"
    stale.write_bytes(b"half a checkpoint from a killed run")
    res = _tiny_run(tmp_path, "run", "optim.max_steps=4", "trainer.checkpoint_every_steps=2",
                    "trainer.keep_epoch_checkpoints=true")
    files = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert files == ["last.ckpt"]  # stale temp removed, no temp left; no epoch ended, so no epoch copy
    assert not list(run.rglob("*.tmp"))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["format"] == "mimkit-checkpoint" and ckpt["version"] == 1
    assert {"config", "data", "model", "optimizer", "progress", "rng"} <= ckpt.keys()
    assert ckpt["data"] == {"img_size": [16, 16], "channels": 1, "mean": res.data.mean, "std": res.data.std}
    assert ckpt["config"]["trainer"]["run_name"] == "run" and ckpt["progress"]["global_step"] == 4
    assert isinstance(ckpt["rng"]["torch"], torch.Tensor) and ckpt["optimizer"]["state"]
    groups = ckpt["optimizer"]["param_groups"]  # the optimizer the run really used: no decay on the listed
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert len(groups[1]["params"]) == len(no_decay_names(res.method)) > 0

    # a save that dies before the rename leaves the previous checkpoint untouched and no temp file
    before = (run / "checkpoints" / "last.ckpt").read_bytes()

    def boom(tmp, path):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt_io, "commit_file", boom)
    with pytest.raises(OSError, match="simulated"):
        _tiny_run(tmp_path, "run", "optim.max_steps=6", "trainer.checkpoint_every_steps=1", resume="auto")
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == before
    assert not list(run.rglob("*.tmp"))


def test_epoch_checkpoints_and_existing_run_dir(tmp_path):
    res = _tiny_run(tmp_path, "ep", "optim.max_steps=16", "trainer.keep_epoch_checkpoints=true")
    names = sorted(p.name for p in (res.run_dir / "checkpoints").iterdir())
    assert names == ["epoch_0001.ckpt", "epoch_0002.ckpt", "last.ckpt"]
    assert ckpt_io.load_checkpoint(res.run_dir / "checkpoints" / "epoch_0001.ckpt")["progress"]["global_step"] == 8
    with pytest.raises(ConfigError, match="resume"):
        _tiny_run(tmp_path, "ep", "optim.max_steps=16")  # would overwrite a finished run's checkpoint


class _Probe(MAE):
    """MAE that records the seeds it validates on and can turn its training loss into NaN."""

    nan_at: int | None = None

    def forward(self, batch):
        out = super().forward(batch)
        if self.training:
            self.calls = getattr(self, "calls", 0) + 1
            if self.nan_at is not None and self.calls >= self.nan_at:
                out["loss"] = out["loss"] * float("nan")
        else:
            self.val_seeds = getattr(self, "val_seeds", [])
            self.val_seeds.append(batch["seed"].tolist())
        return out


def _probe(nan_at=None):
    cfg = tiny_config("/nonexistent")
    torch.manual_seed(cfg.trainer.seed)
    m = build_method(cfg, (16, 16), 1)
    m.__class__ = _Probe
    m.nan_at = nan_at
    return m


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    probe = _probe(nan_at=6)
    with pytest.raises(TrainingDiverged) as err:
        _tiny_run(tmp_path, "nan", "optim.max_steps=10", "trainer.checkpoint_every_steps=4", method=probe)
    msg = str(err.value)
    assert "loss is nan at optimizer step 6" in msg and "step 4" in msg and "optim.clip_grad" in msg
    last = tmp_path / "nan" / "checkpoints" / "last.ckpt"
    method, _, ckpt = method_from_checkpoint(last)
    assert ckpt["progress"]["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not list((tmp_path / "nan").rglob("*.tmp"))
    # the weights were not updated with the NaN gradients either
    assert all(torch.isfinite(p).all() for p in probe.parameters())


def test_validation_uses_the_same_masks_every_epoch(tmp_path):
    probe = _probe()
    res = _tiny_run(tmp_path, "val", "optim.max_steps=24", method=probe)  # 3 epochs of 8 steps
    calls = probe.val_seeds
    per_epoch = len(calls) // 3
    assert len(calls) == 3 * per_epoch and per_epoch == 2  # 16 val images in batches of 8
    epochs = [calls[i * per_epoch:(i + 1) * per_epoch] for i in range(3)]
    assert epochs[0] == epochs[1] == epochs[2]
    val_rows = [r for r in read_metrics(res.run_dir / "metrics.csv") if "val_loss" in r]
    assert [r["step"] for r in val_rows] == [8, 16, 24]
    # fixed masks and images: validating the same weights twice gives the same number
    import mimkit.engine.trainer as trainer_mod

    assert res.metrics["val_loss"] == val_rows[-1]["val_loss"]
    assert trainer_mod.VAL_STREAM  # the val seed is derived from trainer.seed, not from the epoch


def test_global_batch_must_divide(tmp_path):
    with pytest.raises(ConfigError, match=r"optim.batch_size=8.*optim.accumulate = 1 x 3"):
        _tiny_run(tmp_path, "bad", "optim.accumulate=3")


def test_fractional_epochs_set_the_run_length(tmp_path):
    res = _tiny_run(tmp_path, "frac", "optim.epochs=1.5", "optim.max_steps=null")  # 8 steps per epoch
    assert res.metrics["total_steps"] == 12 and len(res.history) == 12
    val_rows = [r for r in read_metrics(res.run_dir / "metrics.csv") if "val_loss" in r]
    assert [(r["step"], r["epoch"]) for r in val_rows] == [(8, 1.0), (12, 1.5)]


def test_resolve_resume_auto(tmp_path):
    from mimkit.engine import resolve_resume

    cfg = load_config(None, [f"trainer.out_dir={tmp_path}"])
    assert resolve_resume("auto", cfg) is None and resolve_resume(None, cfg) is None
    for name, age in (("mae-vit_tiny-fashionmnist-20240101-000000", 100), ("mae-vit_tiny-fashionmnist-20240102-000000", 50),
                      ("mae-vit_small-fashionmnist-20240103-000000", 0)):
        last = tmp_path / name / "checkpoints" / "last.ckpt"
        last.parent.mkdir(parents=True)
        last.write_bytes(b"x")
        os.utime(last, (time.time() - age, time.time() - age))
    # newest run of this method/encoder/dataset; other encoders are not candidates
    assert resolve_resume("auto", cfg) == tmp_path / "mae-vit_tiny-fashionmnist-20240102-000000" / "checkpoints" / "last.ckpt"
    named = load_config(None, [f"trainer.out_dir={tmp_path}", "trainer.run_name=mae-vit_tiny-fashionmnist-20240101-000000"])
    assert resolve_resume("auto", named).parent.parent.name.endswith("20240101-000000")
    assert resolve_resume(str(tmp_path / "mae-vit_small-fashionmnist-20240103-000000"), cfg).name == "last.ckpt"
    with pytest.raises(ckpt_io.CheckpointError, match="not found"):
        resolve_resume(str(tmp_path / "nope.ckpt"), cfg)


def test_a_methods_lr_scale_multiplies_the_base_lr_rule_unless_lr_is_explicit(tmp_path):
    if not have_images():
        pytest.skip("no real images")
    from mimkit.engine.optim import lr_at, warmup_steps

    # DMJD scales the base-lr rule by pred_ratio / mask_ratio = 1.0 / 0.5 = 2
    ruled = tiny_config(tmp_path, "method=dmjd", "method.mask_ratio=0.5", "optim.lr=null", "optim.base_lr=1e-3",
                        "model.depth=1", "optim.max_steps=2", "trainer.run_name=ruled")
    res = train(ruled, data=tiny_data())
    peak = 1e-3 * 8 / 256 * 2.0
    assert res.history[0]["lr"] == pytest.approx(lr_at(0, 2, warmup_steps(2, 0.3), peak))
    explicit = tiny_config(tmp_path, "method=dmjd", "method.mask_ratio=0.5", "model.depth=1", "optim.max_steps=2",
                           "trainer.run_name=explicit")
    res = train(explicit, data=tiny_data())
    assert res.history[0]["lr"] == pytest.approx(lr_at(0, 2, warmup_steps(2, 0.3), 1e-3))
