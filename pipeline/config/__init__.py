"""One dataclass tree for a run: loadable from YAML, overridable as ``section.key=value``.

``RunConfig`` is the whole run (:mod:`pipeline.config.sections`: one dataclass per section,
with the defaults and what every key means). Loading is strict (:mod:`pipeline.config.loading`):
an unknown key or a value of the wrong type is a :class:`ConfigError` that names the key and
suggests the closest valid one; then the cross-key checks run
(:mod:`pipeline.config.validation`).

Example::

    cfg = load_config("configs/demo.yaml", ["selection.threshold=dynamic", "training.steps=400"])
    print(dump_config(cfg))
"""

from __future__ import annotations

from pipeline.config.derived import candidate_batch_size, min_read_ahead, rows_in_flight
from pipeline.config.loading import (
    apply_overrides,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    parse_override,
    read_yaml,
)
from pipeline.config.sections import (
    POOL_BACKEND,
    SCHEMA_VERSION,
    AnnotationConfig,
    DataConfig,
    FeedbackConfig,
    GenerationConfig,
    OutputConfig,
    RayConfig,
    RunConfig,
    SelectionConfig,
    TrainingConfig,
)
from pipeline.config.validation import feedback_settings, validate
from pipeline.errors import ConfigError

__all__ = [
    "POOL_BACKEND",
    "SCHEMA_VERSION",
    "AnnotationConfig",
    "ConfigError",
    "DataConfig",
    "FeedbackConfig",
    "GenerationConfig",
    "OutputConfig",
    "RayConfig",
    "RunConfig",
    "SelectionConfig",
    "TrainingConfig",
    "apply_overrides",
    "candidate_batch_size",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "feedback_settings",
    "load_config",
    "min_read_ahead",
    "parse_override",
    "read_yaml",
    "rows_in_flight",
    "validate",
]
