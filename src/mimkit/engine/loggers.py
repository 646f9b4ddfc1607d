"""The run's metric loggers, as Lightning Fabric loggers (lightning.fabric.loggers.Logger), chosen by
`trainer.loggers`: csv (metrics.csv in the run folder), tensorboard (<run>/tensorboard), wandb and mlflow
(when their packages are installed; Lightning's WandbLogger / MLFlowLogger)."""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

from lightning.fabric.loggers import Logger
from lightning.fabric.utilities.rank_zero import rank_zero_only

from mimkit.config import ConfigError
from mimkit.engine.metrics import MetricsCSV

# logger name -> the package it needs
PACKAGES = {"csv": None, "tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def _plain(v):
    return v.item() if hasattr(v, "item") else v


class CSVRunLogger(Logger):
    """metrics.csv in the run folder (engine.metrics.MetricsCSV): rows after `resume_step` are dropped on resume,
    and `rewind(step)` drops them after a NaN rollback, so the file reads like the run that went on."""

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        super().__init__()
        self._run_dir = Path(run_dir)
        self.csv = MetricsCSV(self._run_dir / "metrics.csv", resume_step)

    @property
    def name(self) -> str:
        return "csv"

    @property
    def version(self) -> str:
        return ""

    @property
    def root_dir(self) -> str:
        return str(self._run_dir)

    @rank_zero_only
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.csv.log({k: _plain(v) for k, v in metrics.items()}, step)

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass  # the run's settings are in config.yaml

    def rewind(self, step: int) -> None:
        self.csv = MetricsCSV(self.csv.path, resume_step=step)


class FiniteOnly(Logger):
    """A logger that passes on only finite numbers (TensorBoard, W&B and MLflow reject or mangle NaN/inf)."""

    def __init__(self, inner: Logger):
        super().__init__()
        self.inner = inner

    @property
    def name(self):
        return self.inner.name

    @property
    def version(self):
        return self.inner.version

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        clean = {k: _plain(v) for k, v in metrics.items()}
        self.inner.log_metrics({k: v for k, v in clean.items()
                                if isinstance(v, (int, float)) and math.isfinite(v)}, step)

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        self.inner.log_hyperparams(params, *args, **kwargs)

    def finalize(self, status: str) -> None:
        self.inner.finalize(status)


def check_available(names) -> None:
    """ConfigError naming trainer.loggers and the package when a chosen logger's package is not installed."""
    for name in names:
        package = PACKAGES[name]
        if package is not None and importlib.util.find_spec(package) is None:
            raise ConfigError(f"trainer.loggers names {name!r}, but the {package!r} package is not installed "
                              f"(pip install {package}), or remove {name!r} from trainer.loggers")


def build_loggers(names, run_dir: Path, resume_step: int | None, config) -> list[Logger]:
    """The loggers `names` asks for, on rank zero (call only there)."""
    check_available(names)
    out: list[Logger] = []
    for name in names:
        if name == "csv":
            out.append(CSVRunLogger(run_dir, resume_step))
        elif name == "tensorboard":
            from lightning.fabric.loggers import TensorBoardLogger

            out.append(FiniteOnly(TensorBoardLogger(root_dir=str(run_dir), name="tensorboard", version="",
                                                    default_hp_metric=False)))
        elif name == "wandb":
            from lightning.pytorch.loggers import WandbLogger

            logger = WandbLogger(name=run_dir.name, save_dir=str(run_dir), project=os.environ.get(
                "WANDB_PROJECT", "mimkit"), config=config.model_dump(mode="json"))
            out.append(FiniteOnly(logger))
        elif name == "mlflow":
            from lightning.pytorch.loggers import MLFlowLogger

            uri = os.environ.get("MLFLOW_TRACKING_URI") or (Path(run_dir).parent / "mlruns").resolve().as_uri()
            logger = MLFlowLogger(experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", "mimkit"),
                                  run_name=run_dir.name, tracking_uri=uri)
            logger.log_hyperparams(config.model_dump(mode="json"))
            out.append(FiniteOnly(logger))
    return out
