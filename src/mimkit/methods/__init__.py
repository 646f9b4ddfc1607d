"""Methods: one file each, composing slots. The table of methods by name is `mimkit.catalog.METHODS`
(re-exported here), below config, so that config and methods do not import each other."""

from __future__ import annotations

from mimkit.catalog import METHODS, build_method, method_class
from mimkit.methods.base import Method, Reconstruction


def __getattr__(name: str):
    if name == "MAE":  # the one method re-exported here, for `from mimkit.methods import MAE`
        return method_class("mae")
    raise AttributeError(name)


__all__ = ["METHODS", "Method", "Reconstruction", "build_method", "method_class"]
