"""Checks of what a config needs from this machine, run once before any process group exists:
the data backend imports, the shard paths exist, DeepSpeed's JSON reads. (The config schema
itself, distres.config, checks values only and touches nothing.)"""

from __future__ import annotations

import json
from pathlib import Path

from distres.config import Config, ConfigError, shard_specs


def preflight(cfg: Config) -> None:
    """A ConfigError naming the field for the first thing missing; nothing else."""
    d = cfg.data
    if d.backend == "dali":
        from distres.data.dali.loader import dali_available

        if not dali_available():
            raise ConfigError(
                "data.backend=dali but nvidia.dali does not import (pip "
                "install nvidia-dali-cuda130, or set data.backend=torch)"
            )
    if d.source == "shards":
        for key in ("train_shards", "val_shards"):
            for spec in shard_specs(getattr(d, key)):
                _check_scheme(f"data.{key}", spec)
                if not _shard_source_exists(spec):
                    raise ConfigError(
                        f"data.{key}={spec!r}: no such shard directory, manifest or tar"
                    )
    path = cfg.engine.deepspeed_config
    if path:
        try:
            parsed = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"engine.deepspeed_config={path}: no such file") from None
        except (OSError, ValueError) as e:
            raise ConfigError(f"engine.deepspeed_config={path}: unreadable JSON ({e})") from None
        if not isinstance(parsed, dict):
            raise ConfigError(f"engine.deepspeed_config={path}: not a JSON object")


def _check_scheme(key: str, spec: str) -> None:
    from distres.data.shards import storage

    try:
        storage.check_scheme(spec)
    except Exception as e:
        raise ConfigError(f"{key}={spec!r}: {str(e).split(': ', 1)[-1]}") from None


def _shard_source_exists(spec: str) -> bool:
    """A directory, a file (tar or manifest), or a brace pattern whose first expansion exists;
    a remote source (s3, gs, http, pipe:) is checked when the set is read, before training."""
    import braceexpand

    from distres.data.shards import storage

    if storage.is_remote(spec):
        return True
    first = next(iter(braceexpand.braceexpand(spec)), spec)
    return Path(spec).is_dir() or Path(first).is_file()
