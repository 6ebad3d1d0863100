"""Input pipelines: shard sets in, `Batch`es out (see api.py for the contract).

Submodules load on first use, so `python -m distres.data.shards` runs without the loaders.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "Batch",
    "DataError",
    "KeyedBatch",
    "Loader",
    "SampleKey",
    "build_eval_loader",
    "build_loaders",
    "resolve_shard_sets",
]

_LAZY = {
    "Batch": "distres.data.api",
    "DataError": "distres.data.api",
    "KeyedBatch": "distres.data.api",
    "Loader": "distres.data.api",
    "SampleKey": "distres.data.api",
    "build_eval_loader": "distres.data.build",
    "build_loaders": "distres.data.build",
    "resolve_shard_sets": "distres.data.build",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
