"""Typed run configuration: pydantic models loaded from YAML recipes with `key.sub=value` overrides.

Every section forbids unknown keys, so a typo is an error that names the field and what is allowed
instead of a silently ignored setting. The sections are in config.sections; reading, overriding and
writing them in config.loading.
"""

from mimkit.catalog import method_config_class
from mimkit.config.loading import (
    apply_overrides,
    build_config,
    load_config,
    parse_override,
    to_yaml,
)
from mimkit.config.sections import (
    DataConfig,
    DepthFraction,
    EvalConfig,
    MethodSection,
    ModelConfig,
    OptimConfig,
    PretrainConfig,
    Section,
    TrainerConfig,
)
from mimkit.config_errors import ConfigError

__all__ = [
    "ConfigError", "DataConfig", "DepthFraction", "EvalConfig", "MethodSection", "ModelConfig", "OptimConfig",
    "PretrainConfig", "Section", "TrainerConfig", "apply_overrides", "build_config", "load_config",
    "method_config_class", "parse_override", "to_yaml",
]
