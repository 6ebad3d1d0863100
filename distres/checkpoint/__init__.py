"""Checkpoints: `store` (where they live, atomic commit, retention), `read` (finding and
validating them), `parts` (what a part is), `manager` (a
run's stateful parts -> save(step) / load(path)), `dcp` (the DDP engine's tensors, read
safely). DeepSpeed's format lives in distres.engine.deepspeed."""

from distres.checkpoint.read import (
    BEST,
    FORMAT_VERSION,
    LATEST,
    META,
    committed,
    find_resume,
    read_meta,
    read_rank_state,
    step_name,
    tensor_format,
    validate,
)
from distres.checkpoint.store import CheckpointStore, failpoint
from distres.errors import CheckpointError

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
