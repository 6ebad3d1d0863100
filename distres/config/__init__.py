"""The run configuration: a tree of dataclasses, YAML presets, `key=value` overrides.

    python -m distres.train [--config configs/NAME.yaml] [section.key=value ...]

The dataclass defaults are the embedded default run (CIFAR-style ResNet-20 on the built-in
`digits` shards, CPU). Every check of the values runs here, and fails with a `ConfigError` whose
one-line message names the field and the value; nothing here touches the filesystem or imports
a backend (what the machine must have is checked by distres.preflight).
"""

from __future__ import annotations

from distres.config.base import ConfigError, doc
from distres.config.data import DataConfig, shard_specs
from distres.config.load import (
    BatchPlan,
    help_text,
    load_config,
    plan_batch,
    save_config,
    to_yaml,
)
from distres.config.schema import (
    CheckpointConfig,
    Config,
    EarlyStopConfig,
    EngineConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrackingConfig,
    TrainConfig,
)

__all__ = [
    "BatchPlan",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EarlyStopConfig",
    "EngineConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "TrackingConfig",
    "TrainConfig",
    "doc",
    "help_text",
    "load_config",
    "plan_batch",
    "save_config",
    "shard_specs",
    "to_yaml",
]
