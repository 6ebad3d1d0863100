"""Final weights: safetensors plus the model config that rebuilds the module."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from distres.config import ModelConfig
from distres.models import build_model

WEIGHTS, MODEL_CONFIG = "model.safetensors", "model.yaml"


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def save_weights(model: nn.Module, model_cfg: ModelConfig, out_dir: str | os.PathLike) -> Path:
    """Write `model.safetensors` (contiguous CPU tensors, torchvision key names for the
    ImageNet variants) and `model.yaml` next to it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in unwrap(model).state_dict().items()}
    save_file(state, str(out / WEIGHTS), metadata={"format": "pt", "model": model_cfg.name})
    (out / MODEL_CONFIG).write_text(yaml.safe_dump(dataclasses.asdict(model_cfg), sort_keys=False))
    return out / WEIGHTS


def load_weights(path: str | os.PathLike, map_location: str = "cpu") -> nn.Module:
    """Rebuild the model from `model.yaml` beside the weights and load them."""
    path = Path(path)
    cfg_path = path.with_name(MODEL_CONFIG)
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: model config missing beside {path.name}")
    model = build_model(ModelConfig(**yaml.safe_load(cfg_path.read_text())))
    model.load_state_dict(load_file(str(path), device=map_location))
    return model.to(torch.device(map_location))
