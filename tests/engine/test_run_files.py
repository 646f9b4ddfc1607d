"""Run files and what a run prints: no empty folders after a failed start, normal file modes, the progress
bar's postfix every step, the expected duration up front (issue 16 items 6 and 17, issue 14 item 2), and the
Python example in examples/ at tiny size (issue 16 item 18)."""

from __future__ import annotations

import os
import runpy
import stat
from pathlib import Path

import pytest
import torch

from engine_tiny import have_images, tiny_config, tiny_data
from mimkit.config import ConfigError
from mimkit.engine import Callback, train

pytestmark = pytest.mark.skipif(not have_images(), reason="needs real images")
ROOT = Path(__file__).resolve().parents[2]



def test_a_failed_start_leaves_no_empty_run_folder(tmp_path):
    # 128 accumulation steps of one image need 128 images: the 64 here cannot be fitted (a smaller batch is)
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        train(tiny_config(tmp_path, "optim.batch_size=128", "optim.accumulate=128", "model.depth=1"),
              data=tiny_data())
    assert not (tmp_path / "run").exists()


def test_run_files_get_the_modes_of_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        res = train(tiny_config(tmp_path, "model.depth=1", "optim.max_steps=2"), data=tiny_data())
    finally:
        os.umask(old)
    for name in ("config.yaml", "metrics.csv", "checkpoints/last.ckpt"):
        assert stat.S_IMODE((res.run_dir / name).stat().st_mode) == 0o644, name


class _Postfix(Callback):
    """Reads the bar after the ProgressBar callback updated it (mimkit's callbacks run before the caller's)."""

    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, run, step, metrics):
        self.seen.append((f"{metrics['loss']:.4f}", run.engine.bar.postfix))


def test_the_bar_shows_every_steps_loss_and_the_expected_time(tmp_path, capsys):
    seen = _Postfix()
    train(tiny_config(tmp_path, "model.depth=1", "optim.max_steps=8", "trainer.progress=true",
                      "trainer.log_every_steps=10"), data=tiny_data(), callbacks=[seen])
    assert len(seen.seen) == 8
    for loss, postfix in seen.seen:
        assert f"loss={loss}" in postfix and "img_s=" in postfix
    assert len({loss for loss, _ in seen.seen}) > 1
    err = capsys.readouterr().err
    assert err.count("expected: about ") == 1 and "for the 4 remaining steps" in err


def test_the_python_example_trains_at_tiny_size(tmp_path, monkeypatch):
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists():
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    example = runpy.run_path(str(ROOT / "examples" / "train_python.py"))
    out = example["main"](["optim.max_steps=4", "optim.batch_size=16", "data.limit=96", "data.num_workers=0",
                           "data.stats_samples=32", "data.img_size=16", "model.depth=1", "trainer.log_every_steps=2",
                           "trainer.progress=false", "eval.visualize=false", f"trainer.out_dir={tmp_path}",
                           "trainer.run_name=example"])
    assert out["result"].metrics["global_step"] == 4
    assert [s for s, _ in out["spread"]] == [2, 4] and all(v > 0 for _, v in out["spread"])
    ckpt = torch.load(tmp_path / "example" / "checkpoints" / "last.ckpt", weights_only=True)
    assert [s for s, _ in ckpt["callbacks"]["FeatureSpread"]["history"]] == [2, 4]
