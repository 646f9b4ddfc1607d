"""mimkit run files, for the layers below the engine: the engine writes checkpoints (engine/checkpoint.py), and
frozen teachers, tokenizers and evaluation read them through this one module (an import-linter contract allows
exactly this edge; see docs/architecture.md)."""

from mimkit.engine.checkpoint import (CheckpointError, encoder_from_checkpoint, find_checkpoint, load_state_strict,
                                     read_run)

__all__ = ["CheckpointError", "encoder_from_checkpoint", "find_checkpoint", "load_state_strict", "read_run"]
