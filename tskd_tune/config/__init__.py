"""The one typed config tree, loaded from a search-space YAML, with dotted-path overrides.

- :mod:`~tskd_tune.config.schema`: the pydantic models and the constants that describe them;
- :mod:`~tskd_tune.config.yaml_io`: strict YAML reading, ``--set`` overrides, dumping;
- :mod:`~tskd_tune.config.validate`: one-line errors, cross-field checks, loading.

This package's face is for the layers above the config (cli, search, trial, benchmarks, tests). Modules
the validation itself depends on (the data layer, the models, the search space) import from
``tskd_tune.config.schema`` instead, so that no import arrow points back up.
"""

from tskd_tune.config.schema import (
    END_OF_TRIAL_METRICS,
    OBJECTIVE_METRICS,
    PATH_FIELDS,
    AugmentConfig,
    CacheConfig,
    Config,
    DataConfig,
    DistillConfig,
    LoraConfig,
    ResourcesConfig,
    SearchConfig,
    Section,
    StudentConfig,
    SyntheticConfig,
    TeacherConfig,
    TrackingConfig,
)
from tskd_tune.config.validate import (
    absolutize,
    apply_search_overrides,
    apply_values,
    check_data_config,
    check_space,
    format_error,
    load_config,
    path_values,
    validate,
)
from tskd_tune.config.yaml_io import parse_overrides, read_yaml, set_by_path, to_yaml

__all__ = [
    "END_OF_TRIAL_METRICS",
    "OBJECTIVE_METRICS",
    "PATH_FIELDS",
    "AugmentConfig",
    "CacheConfig",
    "Config",
    "DataConfig",
    "DistillConfig",
    "LoraConfig",
    "ResourcesConfig",
    "SearchConfig",
    "Section",
    "StudentConfig",
    "SyntheticConfig",
    "TeacherConfig",
    "TrackingConfig",
    "absolutize",
    "apply_search_overrides",
    "apply_values",
    "check_data_config",
    "check_space",
    "format_error",
    "load_config",
    "parse_overrides",
    "path_values",
    "read_yaml",
    "set_by_path",
    "to_yaml",
    "validate",
]
