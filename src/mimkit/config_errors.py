"""Validation errors a person can act on: each line names the field, the value and what is allowed there
(for an unknown key: the closest allowed name and the full list)."""

from __future__ import annotations

import difflib

from typing import Any

from pydantic import BaseModel, ValidationError

from mimkit.catalog import method_config_class


class ConfigError(ValueError):
    """A configuration problem; the message names the field, the value and what is allowed."""


def _allowed_fields(model: type[BaseModel], loc: tuple, tree: dict | None = None) -> list[str]:
    """Field names accepted at `loc` (the parent of an unknown key), for the error message."""
    current: Any = model
    if loc[:1] == ("method",) and "method" in getattr(model, "model_fields", {}):  # PretrainConfig
        try:
            current = method_config_class(((tree or {}).get("method") or {}).get("name", "mae"))
        except ValueError:
            return []
        loc = loc[1:]
    for part in loc:
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        ann = fields[part].annotation
        current = ann
    return list(getattr(current, "model_fields", {}))


def format_errors(err: ValidationError, model: type[BaseModel], tree: dict | None = None) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(str(x) for x in e["loc"])
        field = ".".join(loc) or "<root>"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_fields(model, loc[:-1], tree)
            close = difflib.get_close_matches(loc[-1], allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            lines.append(f"unknown field '{field}'{hint}; allowed: {', '.join(allowed)}")
        else:
            value = e.get("input")
            shown = "" if isinstance(value, dict) else f" (got {value!r})"
            lines.append(f"field '{field}': {e['msg']}{shown}")
    return "invalid configuration:\n  " + "\n  ".join(lines)
