"""Optimizer and LR schedule, both keyed to optimizer steps."""

from __future__ import annotations

import math

import torch
from torch import nn

from distres.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float, no_wd_bn_bias: bool) -> list[dict]:
    """Two groups: decayed weights, and (when asked) BN/bias parameters without decay."""
    if not no_wd_bn_bias or weight_decay == 0:
        return [
            {
                "params": [p for p in model.parameters() if p.requires_grad],
                "weight_decay": weight_decay,
            }
        ]
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            # Every conv/linear weight is >= 2-D; BN weights/biases and biases are 1-D.
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _split_head(groups: list[dict], model: nn.Module, head_lr: float) -> list[dict]:
    """Each group split in two: the body at the base lr, the head (fc) at head_lr. The LR
    schedule multiplies each group's own lr, so the ratio holds at every step."""
    head = {id(p) for p in model.fc.parameters()}
    out = []
    for g in groups:
        body = [p for p in g["params"] if id(p) not in head]
        mine = [p for p in g["params"] if id(p) in head]
        out += [{**g, "params": body}] if body else []
        out += [{**g, "params": mine, "lr": head_lr}] if mine else []
    return out


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, device: torch.device, lr: float | None = None
):
    """SGD or AdamW at `lr` (default cfg.lr; the engine passes the batch-scaled value)."""
    lr = cfg.lr if lr is None else lr
    groups = param_groups(model, cfg.weight_decay, cfg.no_wd_bn_bias)
    if cfg.head_lr_mult != 1.0:
        groups = _split_head(groups, model, lr * cfg.head_lr_mult)
    # NOTE: the fused kernels exist for CUDA; foreach is the fast multi-tensor path elsewhere.
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, **fast)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(cfg.momentum, cfg.beta2), **fast)
    # Large-batch optimizers: timm's (multi-tensor foreach kernels). Both adapt only the
    # parameters that are decayed (always_adapt=False), so with no_wd_bn_bias BN weights and
    # biases take plain steps, as in You et al. and MLPerf's LARS.
    from timm.optim import Lamb, Lars

    if cfg.name == "lars":
        return Lars(
            groups,
            lr=lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            trust_coeff=cfg.trust_coeff,
            foreach=True,
        )
    # LAMB's own clipping of the global gradient norm is left to train.clip_grad_norm
    return Lamb(groups, lr=lr, betas=(cfg.momentum, cfg.beta2), max_grad_norm=None, foreach=True)


def lr_factor(step: int, cfg: OptimConfig, steps_per_epoch: int, epochs: int) -> float:
    """Multiplier of cfg.lr at optimizer step `step` (0-based): warm-up, then the schedule."""
    total = max(1, steps_per_epoch * epochs)
    warmup = min(total, round(cfg.warmup_epochs * steps_per_epoch))
    if step < warmup:
        s = cfg.warmup_start_factor
        return s + (1.0 - s) * step / warmup
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        epoch = step / steps_per_epoch
        milestones = [m * epochs if m < 1 else m for m in cfg.step_milestones]
        return cfg.step_gamma ** sum(epoch >= m for m in milestones)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = cfg.min_lr_factor
    if cfg.schedule == "poly":
        return floor + (1.0 - floor) * (1.0 - progress) ** cfg.poly_power
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int, epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg, steps_per_epoch, epochs)
    )
