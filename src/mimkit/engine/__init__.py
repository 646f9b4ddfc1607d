"""Training engine: `train(cfg, resume=None, callbacks=[...]) -> TrainResult` on Lightning Fabric, plus checkpoint
I/O. Callbacks: `mimkit.engine.callbacks`."""

from mimkit.engine.callbacks import Callback, RunView
from mimkit.engine.checkpoint import CheckpointError, load_checkpoint, method_from_checkpoint
from mimkit.engine.errors import TrainingDiverged, TrainingInterrupted
from mimkit.engine.trainer import TrainResult, make_fabric, resolve_resume, train

__all__ = [
    "Callback",
    "CheckpointError",
    "RunView",
    "TrainResult",
    "TrainingDiverged",
    "TrainingInterrupted",
    "load_checkpoint",
    "make_fabric",
    "method_from_checkpoint",
    "resolve_resume",
    "train",
]
