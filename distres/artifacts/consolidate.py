"""A sharded checkpoint's weights (or its EMA's) consolidated in one process, whatever world
size and engine wrote them."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from distres.config import ConfigError, ModelConfig
from distres.models import build_model


def checkpoint_weights(
    path: str | os.PathLike, trust: bool = False, ema: bool = False
) -> tuple[dict[str, torch.Tensor], ModelConfig, Path]:
    """The model weights of a sharded checkpoint (any world size), consolidated in this one
    process, with the model config the checkpoint records and the checkpoint used (the newest
    complete one, for a directory of them). Nothing is unpickled beyond
    tensors and the checkpoint formats' own classes unless `trust` (DeepSpeed's files only).
    ema=True: the EMA of the weights instead (train.ema_decay)."""
    from distres import checkpoint as ckpt

    path = Path(path)
    found = ckpt.find_resume(path, str(path)) if path.is_dir() else None
    if found is None:
        raise ckpt.CheckpointError(f"{path}: not a distres checkpoint directory")
    path, meta = found
    try:
        model_cfg = ModelConfig(**meta["model"])
    except (TypeError, ConfigError) as e:
        raise ckpt.CheckpointError(f"{path / ckpt.META}: bad model config ({e})") from None
    if ema and "ema" not in meta["tensors"].get("parts", []):
        raise ckpt.CheckpointError(
            f"{path}: holds no EMA of the weights (its run had train.ema_decay=0)"
        )
    reader = ckpt.tensor_format(path, meta)
    part = "ema" if ema else "model"
    weights = reader.consolidated_weights(path, meta, build_model(model_cfg), trust, part)
    return weights, model_cfg, path
