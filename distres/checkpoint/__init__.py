"""Checkpoints: `store` (where they live, atomic commit, retention, validation), `manager` (a
run's stateful parts -> save(step) / load(path)), `dcp` (the DDP engine's tensors, read
safely). DeepSpeed's format lives in distres.engine.deepspeed."""

from distres.checkpoint.store import (
    BEST,
    FORMAT_VERSION,
    LATEST,
    META,
    CheckpointError,
    CheckpointStore,
    committed,
    failpoint,
    find_resume,
    read_meta,
    read_rank_state,
    step_name,
    tensor_format,
    validate,
)

__all__ = [
    "BEST",
    "FORMAT_VERSION",
    "LATEST",
    "META",
    "CheckpointError",
    "CheckpointStore",
    "committed",
    "failpoint",
    "find_resume",
    "read_meta",
    "read_rank_state",
    "step_name",
    "tensor_format",
    "validate",
]
