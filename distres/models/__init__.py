"""Model construction from config."""

from __future__ import annotations

from typing import TYPE_CHECKING

from distres.models.resnet import ARCHS, ResNet, count_params, resnet

if TYPE_CHECKING:
    from distres.config import ModelConfig

__all__ = ["ARCHS", "ResNet", "build_model", "count_params", "resnet"]


def build_model(cfg: ModelConfig) -> ResNet:
    return resnet(cfg.name, num_classes=cfg.num_classes, in_chans=cfg.in_chans, plain=cfg.plain,
                  zero_init_residual=cfg.zero_init_residual)
