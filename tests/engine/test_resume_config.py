"""--resume continues with the run's own settings: changes that keep it the same run are listed and applied,
others refused unless asked for (issue 16 item 3); Ctrl-C names the resume command (issue 16 item 17)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from engine_tiny import have_images, tiny_config, tiny_data
from mimkit.config import ConfigError
from mimkit.engine import train

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
COMMON = ["model.depth=1", "optim.max_steps=6"]



@pytest.mark.skipif(not have_images(), reason="needs real images")
def test_resume_applies_length_changes_and_refuses_others(tmp_path, capsys):
    train(tiny_config(tmp_path, *COMMON, "trainer.stop_after_steps=3"), data=tiny_data())
    config_before = (tmp_path / "run" / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"optim\.lr: 0\.001 -> 0\.0005.*--allow-config-change") as err:
        train(tiny_config(tmp_path, *COMMON, "optim.lr=5e-4", "data.img_size=16"), resume="auto", data=tiny_data())
    assert "optim.max_steps" not in str(err.value)
    assert (tmp_path / "run" / "config.yaml").read_text() == config_before  # nothing was overwritten
    capsys.readouterr()
    longer = train(tiny_config(tmp_path, "model.depth=1", "optim.max_steps=8"), resume="auto", data=tiny_data())
    assert longer.metrics["global_step"] == 8 and longer.config.optim.max_steps == 8
    assert "optim.max_steps: 6 -> 8" in capsys.readouterr().err
    forced = train(tiny_config(tmp_path, "model.depth=1", "optim.max_steps=10", "optim.lr=5e-4"), resume="auto",
                   data=tiny_data(), allow_config_change=True)
    assert forced.metrics["global_step"] == 10
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["optim"]["lr"] == 5e-4


CLI_TINY = ["data.limit=128", "data.num_workers=0", "data.stats_samples=32", "data.img_size=16", "optim.batch_size=16",
            "eval.knn=false", "eval.visualize=false", "trainer.progress=false", "trainer.checkpoint_every_steps=2"]


@pytest.mark.skipif(not FMNIST.exists(), reason="Debian package dataset-fashion-mnist not installed")
def test_cli_resume_of_a_run_started_with_a_recipe(tmp_path, capsys):
    from mimkit.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"depth": 1, "decoder_depth": 1}, "optim": {"max_steps": 6}}))
    run = tmp_path / "r"
    assert main(["pretrain", "--config", str(recipe), *CLI_TINY, f"trainer.out_dir={tmp_path}", "trainer.run_name=r",
                 "trainer.stop_after_steps=2"]) == 0
    capsys.readouterr()
    # a changed data setting is refused with the list of differences
    assert main(["pretrain", "--resume", str(run), "data.limit=96"]) == 2
    err = capsys.readouterr().err
    assert "data.limit: 128 -> 96" in err and "--allow-config-change" in err
    # the README's command: the run's own recipe (depth 1) is used, and the run finishes
    assert main(["pretrain", "--resume", str(run)]) == 0
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["progress"]["global_step"] == 6


@pytest.mark.skipif(not FMNIST.exists(), reason="Debian package dataset-fashion-mnist not installed")
def test_ctrl_c_prints_the_resume_command(tmp_path, capsys, monkeypatch):
    from mimkit.cli import main
    from mimkit.engine.loop import Loop

    schedules = Loop._apply_schedules

    def interrupt_at(stop):
        def apply(self, step):
            if step == stop:
                raise KeyboardInterrupt
            return schedules(self, step)
        return apply

    args = ["pretrain", *CLI_TINY, "model.depth=1", "optim.max_steps=6", f"trainer.out_dir={tmp_path}"]
    monkeypatch.setattr(Loop, "_apply_schedules", interrupt_at(1))  # before any checkpoint: nothing to resume
    assert main([*args, "trainer.run_name=early"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted"
    monkeypatch.setattr(Loop, "_apply_schedules", interrupt_at(3))
    assert main([*args, "trainer.run_name=late"]) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"interrupted; continue with: mimkit pretrain --resume {tmp_path / 'late'}"
    monkeypatch.setattr(Loop, "_apply_schedules", schedules)
    assert main(last.split("continue with: mimkit ")[1].split()) == 0
