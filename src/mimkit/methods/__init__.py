"""Methods by name. Each is one file composing slots; this table is the only place that lists them."""

from __future__ import annotations

from mimkit.methods.base import Method, Reconstruction
from mimkit.methods.mae import MAE

METHODS = {"mae": MAE}


def build_method(cfg, img_size, in_chans: int) -> Method:
    """A method from a PretrainConfig's `method` and `model` sections for images of this size and channels."""
    return METHODS[cfg.method.name].from_config(cfg.method, cfg.model, img_size, in_chans)


__all__ = ["MAE", "METHODS", "Method", "Reconstruction", "build_method"]
