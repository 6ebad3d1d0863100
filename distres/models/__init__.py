"""Model construction from config.

The package import stays free of torch (config validation imports the registry from here);
the modules that need torch load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from distres.models.archs import ARCHS

if TYPE_CHECKING:
    from distres.config import ModelConfig
    from distres.models.resnet import ResNet

__all__ = ["ARCHS", "ResNet", "build_model", "count_params"]


def build_model(cfg: ModelConfig) -> ResNet:
    from distres.models.resnet import resnet

    return resnet(
        cfg.name,
        num_classes=cfg.num_classes,
        in_chans=cfg.in_chans,
        plain=cfg.plain,
        zero_init_residual=cfg.zero_init_residual,
        drop_path_rate=cfg.drop_path_rate,
    )


def __getattr__(name: str) -> Any:
    lazy = {"ResNet": "ResNet", "count_params": "count_params"}
    if name in lazy:
        return getattr(importlib.import_module("distres.models.resnet"), lazy[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
