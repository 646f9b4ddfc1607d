"""Loading a run configuration: a YAML recipe plus `key.sub=value` overrides, validated into the sections'
models (errors name the field), and written back as YAML (optionally with each field's description)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from mimkit.config.sections import PretrainConfig
from mimkit.config_errors import ConfigError, format_errors


def parse_override(item: str) -> tuple[list[str], Any]:
    """`optim.lr=1e-3` -> (['optim', 'lr'], 0.001); the value is read as YAML (numbers, lists, null, bools)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def build_config(model: type[BaseModel], tree: dict) -> BaseModel:
    try:
        return model.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_errors(err, model, tree if isinstance(tree, dict) else None)) from None


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
    model: type[BaseModel] = PretrainConfig, base: dict | None = None,
):
    """Read a YAML recipe (or start from `base`, a plain config tree), apply `key=value` overrides, validate.

    Raises ConfigError naming the field.
    """
    tree: dict = copy.deepcopy(base) if base and path is None else {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        tree = loaded or {}
    for item in overrides:
        keys, value = parse_override(item)
        if keys == ["method"] and isinstance(value, str):
            # `method=<name>` switches method: the old method's settings do not apply to the new one
            value = {"name": value}
        _set(tree, keys, value)
    return build_config(model, tree)


def apply_overrides(cfg: BaseModel, overrides, sections: tuple[str, ...] = ("data", "eval")) -> BaseModel:
    """A copy of `cfg` with `key=value` overrides applied, allowing only the named sections (e.g. to evaluate
    a checkpoint on other data without touching the architecture it was trained with)."""
    if not overrides:
        return cfg
    tree = cfg.model_dump(mode="json")
    for item in overrides:
        keys, value = parse_override(item)
        if keys[0] not in sections:
            allowed = " and ".join(f"{s}.*" for s in sections)
            raise ConfigError(f"only {allowed} can be overridden here, not {item!r}")
        _set(tree, keys, value)
    return build_config(type(cfg), tree)


def to_yaml(cfg: BaseModel, comments: bool = False) -> str:
    """The configuration as YAML; `comments`: each field's description as a comment line above it (what
    `--print-config` shows). Either form loads back to the same configuration."""
    if not comments:
        return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    return "\n".join(_commented_lines(cfg, cfg.model_dump(mode="json"), 0)) + "\n"


def _yaml_value(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf"), sort_keys=False)
    return text.removesuffix("\n...\n").strip()


def _commented_lines(model: BaseModel, dumped: dict, depth: int) -> list[str]:
    import textwrap

    pad, lines = "  " * depth, []
    for name, field in type(model).model_fields.items():
        if name not in dumped:
            continue
        if field.description:
            lines += textwrap.wrap(field.description, 108 - len(pad), initial_indent=pad + "# ",
                                   subsequent_indent=pad + "# ")
        value, child = dumped[name], getattr(model, name, None)
        if isinstance(child, BaseModel) and isinstance(value, dict):
            lines.append(f"{pad}{name}:")
            lines += _commented_lines(child, value, depth + 1)
        else:
            lines.append(f"{pad}{name}: {_yaml_value(value)}")
    return lines
