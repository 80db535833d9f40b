"""A run's config: the schemas (`schema`), their layering and merge (`layers`), and which changes a
continued run allows (`policy`).

Every name other modules import is re-exported here, so `from resilient_train.config import
RunConfig, resolve` keeps working whichever module holds the name.
"""

from resilient_train.config.layers import (
    known_keys,
    kwargs_layer,
    load_run_yaml,
    load_yaml_layer,
    nearest_key,
    parse_overrides,
    resolve,
    sourced_values,
)
from resilient_train.config.policy import ConfigChange, check_config_changes, config_changes
from resilient_train.config.schema import (
    ACCELERATORS,
    PRECISIONS,
    SECTIONS,
    CheckpointConfig,
    LoggingConfig,
    RunConfig,
    TrainerConfig,
)

__all__ = [
    "ACCELERATORS", "PRECISIONS", "SECTIONS",
    "CheckpointConfig", "LoggingConfig", "RunConfig", "TrainerConfig",
    "kwargs_layer", "known_keys", "load_run_yaml", "load_yaml_layer", "nearest_key", "parse_overrides", "resolve",
    "sourced_values",
    "ConfigChange", "check_config_changes", "config_changes",
]
