"""trainer.loggers picks the run's Fabric loggers; a named logger whose package is missing is one clear error."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from engine_tiny import have_images, tiny_config, tiny_data
from mimkit.config import ConfigError
from mimkit.engine import train
from mimkit.engine.loggers import CSVRunLogger, FiniteOnly, build_loggers
from mimkit.engine.metrics import read_metrics

pytestmark = pytest.mark.skipif(not have_images(), reason="needs real images")


def test_loggers_follow_the_setting(tmp_path):
    torch.set_num_threads(1)
    both = train(tiny_config(tmp_path, "trainer.run_name=both", "model.depth=1", "optim.max_steps=2"),
                 data=tiny_data())
    assert list((both.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert [r["step"] for r in read_metrics(both.run_dir / "metrics.csv") if "loss" in r] == [1, 2]
    csv_only = train(tiny_config(tmp_path, "trainer.run_name=csv", "model.depth=1", "optim.max_steps=2",
                                 "trainer.loggers=[csv]"), data=tiny_data())
    assert not (csv_only.run_dir / "tensorboard").exists() and (csv_only.run_dir / "metrics.csv").is_file()
    loggers = build_loggers(["csv", "tensorboard"], tmp_path / "x", None, csv_only.config)
    assert isinstance(loggers[0], CSVRunLogger) and isinstance(loggers[1], FiniteOnly)
    from lightning.fabric.loggers import Logger

    assert all(isinstance(lg, Logger) for lg in loggers)


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_a_missing_logger_package_is_a_clear_error(tmp_path, name):
    if importlib.util.find_spec(name) is not None:
        pytest.skip(f"{name} is installed")
    with pytest.raises(ConfigError, match=rf"trainer.loggers names '{name}', but the '{name}' package is not "
                                          rf"installed \(pip install {name}\)"):
        train(tiny_config(tmp_path, "model.depth=1", f"trainer.loggers=[csv, {name}]"), data=tiny_data())
    assert not (tmp_path / "run").exists()


def test_unknown_logger_names_the_field():
    with pytest.raises(ConfigError, match=r"trainer\.loggers\.1"):
        tiny_config("/tmp", "trainer.loggers=[csv, comet]")
