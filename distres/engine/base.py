"""The Engine contract the trainer relies on, and the prologue both engines share.

An engine owns the wrapped model, the optimizer, the LR schedule and the precision policy. The
trainer hands it the micro-batches of one optimizer step and gets the step's mean loss back;
it writes and loads its own tensors in its own checkpoint format; its schedule and loss
scaler are a stateful part of every checkpoint (state_dict / load_state_dict).
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from distres.components.optim import build_optimizer, build_scheduler
from distres.config import BatchPlan, Config
from distres.data.api import Batch
from distres.dist import DistEnv, average_buffers
from distres.models import build_model
from distres.models.resnet import count_params
from distres.precision import autocast, resolve_precision


class Engine(Protocol):
    module: nn.Module  # the bare model: evaluation, BN statistics, final weights
    num_params: int
    lr: float  # the base LR after scaling to the global batch
    amp_dtype: torch.dtype | None
    input_dtype: torch.dtype | None  # what evaluation casts images to (None: as they are)
    last_grad_norm: torch.Tensor | float | None

    def train(self) -> None: ...
    def train_step(self, micro_batches: list[Batch], grad_norm: bool = False) -> torch.Tensor: ...
    def autocast(self) -> contextlib.AbstractContextManager: ...
    def current_lr(self) -> float: ...
    def sync_buffers(self) -> None: ...
    def full_state_dict(self) -> dict[str, torch.Tensor]: ...
    # checkpoints: schedule and scaler as a part; tensors in the engine's own format
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def checkpoint_info(self) -> dict: ...
    # `parts`: the tensor parts' state_dicts by name (the EMA), written beside the engine's
    # own tensors, and on load filled in place (only those the checkpoint holds)
    def save_tensors(
        self, directory: Path, group: Any, async_save: bool, parts: dict[str, dict]
    ) -> Future | None: ...
    def load_tensors(self, directory: Path, meta: dict, parts: dict[str, dict]) -> None: ...


def train_loss(logits: torch.Tensor, targets: torch.Tensor, t) -> torch.Tensor:
    """train.loss on class indices (N) or soft targets (N x classes, from batch mixing, which
    has folded label smoothing in already).

    bce is timm's BinaryCrossEntropy: one-hot targets smoothed as cross-entropy would smooth
    them, thresholded at train.bce_threshold, the mean over samples and classes."""
    logits = logits.float()
    if t.loss == "ce":
        if targets.dim() == 1:
            return F.cross_entropy(logits, targets, label_smoothing=t.label_smoothing)
        return F.cross_entropy(logits, targets)
    if targets.dim() == 1:
        n = logits.shape[1]
        off = t.label_smoothing / n
        dense = torch.full_like(logits, off)
        targets = dense.scatter_(1, targets.view(-1, 1), 1.0 - t.label_smoothing + off)
    if t.bce_threshold > 0:
        targets = (targets > t.bce_threshold).to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, targets)


def scaled_lr(cfg: Config, plan: BatchPlan) -> float:
    if cfg.optim.lr_scaling == "linear":
        return cfg.optim.lr * plan.global_batch / 256
    return cfg.optim.lr


def check_engine_state(state: object) -> str | None:
    """Why an engine part's saved state would not load, or None."""
    if not isinstance(state, dict) or not isinstance(state.get("scheduler"), dict):
        return "no scheduler state"
    if not isinstance(state.get("scaler", {}), dict):
        return "the scaler state is not a mapping"
    return None


class EngineBase:
    """What both engines do the same way: build the model, optimizer and schedule from the
    config, resolve precision, compute the loss, average BN statistics, save their state."""

    input_dtype: torch.dtype | None = None
    last_grad_norm: torch.Tensor | float | None = None
    scaler: torch.amp.GradScaler | None = None

    def __init__(
        self,
        cfg: Config,
        env: DistEnv,
        device: torch.device,
        plan: BatchPlan,
        steps_per_epoch: int,
        fresh: bool = True,
    ):
        """fresh: a fresh start (model.init_from applies; a resume loads its checkpoint)."""
        self.cfg, self.env, self.device, self.plan = cfg, env, device, plan
        self.fresh = fresh
        self.steps_per_epoch = steps_per_epoch
        self.amp_dtype = resolve_precision(cfg.train.precision, device)
        self.lr = scaled_lr(cfg, plan)

    def build_model(self) -> nn.Module:
        model = build_model(self.cfg.model)
        if self.fresh and self.cfg.model.init_from:
            from distres.models.pretrained import init_from

            init_from(model, self.cfg.model.init_from)
        model.freeze(self.cfg.model.freeze)
        model.set_grad_checkpointing(self.cfg.engine.checkpoint_group)
        return model

    def build_optimizer(self, model: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
        cfg = self.cfg
        optimizer = build_optimizer(model, cfg.optim, self.device, lr=self.lr)
        scheduler = build_scheduler(optimizer, cfg.optim, self.steps_per_epoch, cfg.train.epochs)
        return optimizer, scheduler

    def set_module(self, module: nn.Module) -> None:
        self.module = module
        self.num_params = count_params(module)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return train_loss(logits, labels, self.cfg.train)

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.amp_dtype)

    def train(self) -> None:
        self.module.train()

    def current_lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    @torch.no_grad()
    def sync_buffers(self) -> None:
        """Average BN running statistics over ranks (timm's distribute_bn), so evaluation and
        the saved weights see one model, not one per rank (DDP broadcasts rank 0's at every
        forward; DeepSpeed never after the start)."""
        if self.env.distributed:
            average_buffers(self.module, self.env.world_size)

    # -- the engine's part of a checkpoint -------------------------------------------------
    def state_dict(self) -> dict:
        # an LR scheduler's state without its callables (ours are rebuilt from the config)
        schedule = {k: v for k, v in self.scheduler.state_dict().items() if not callable(v)}
        state: dict[str, Any] = {"scheduler": schedule}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
