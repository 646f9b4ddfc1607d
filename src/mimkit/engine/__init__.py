"""Training engine: `train(cfg, resume=None) -> TrainResult` on Lightning Fabric, plus checkpoint I/O."""

from mimkit.engine.checkpoint import CheckpointError, load_checkpoint, method_from_checkpoint
from mimkit.engine.trainer import TrainingDiverged, TrainResult, make_fabric, resolve_resume, train

__all__ = [
    "CheckpointError",
    "TrainResult",
    "TrainingDiverged",
    "load_checkpoint",
    "make_fabric",
    "method_from_checkpoint",
    "resolve_resume",
    "train",
]
