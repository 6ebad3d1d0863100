"""The DDP engine: channels_last, autocast (bf16 / fp16 + GradScaler / fp32), gradient
accumulation under no_sync, optional torch.compile and SyncBatchNorm.

On one process the model is used unwrapped (no DDP); the code path is otherwise the same.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel as DDP

from distres.checkpoint import dcp
from distres.components.profiling import mark
from distres.config import ConfigError
from distres.data.api import Batch
from distres.engine.base import EngineBase


class DDPEngine(EngineBase):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg, env, device, plan = self.cfg, self.env, self.device, self.plan
        model = self.build_model()
        if cfg.engine.sync_bn and env.distributed:
            if device.type != "cuda":
                raise ConfigError(
                    "engine.sync_bn=true needs CUDA devices (SyncBatchNorm has no "
                    "CPU kernel); set engine.sync_bn=false"
                )
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        memory_format = torch.channels_last if cfg.train.channels_last else torch.preserve_format
        self.set_module(model.to(device, memory_format=memory_format))
        self.ddp: DDP | None = None
        if env.distributed:
            self.ddp = DDP(
                self.module,
                device_ids=[device.index] if device.type == "cuda" else None,
                bucket_cap_mb=cfg.engine.bucket_cap_mb,
                # gradients live in the buckets: no copy between param.grad and the bucket
                gradient_as_bucket_view=True,
                # NOTE: not with gradient accumulation: a static graph is recorded on the first
                # backward, and one under no_sync() trips DDP's reducer (an internal assert in
                # torch 2.14)
                static_graph=cfg.engine.static_graph and plan.grad_accum == 1,
            )
        wrapped = self.ddp or self.module
        # dynamic=False: training shapes are fixed (the last partial batch is dropped), and
        # progressive resizing's few sizes each get a static graph instead of one with
        # symbolic sizes after the second
        mode = cfg.engine.compile_mode
        self.model = (
            torch.compile(wrapped, dynamic=False, mode=mode) if cfg.engine.compile else wrapped
        )
        # CUDA graphs (reduce-overhead) own their outputs until the next replay: each
        # micro-step starts a new graph step, so the losses read after it stay valid
        self.graph_steps = cfg.engine.compile and mode == "reduce-overhead"
        self.optimizer, self.scheduler = self.build_optimizer(self.module)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)

    def train_step(self, micro_batches: list[Batch], grad_norm: bool = False) -> torch.Tensor:
        """One optimizer step over k micro-batches; returns the mean loss (detached, on device).
        grad_norm=True also leaves the (unscaled, pre-clip) gradient norm in last_grad_norm.

        Each micro-batch loss is divided by k, so the summed gradients equal those of one batch
        k times larger; all but the last backward skip DDP's all-reduce (no_sync).
        """
        k = len(micro_batches)
        total = torch.zeros((), device=self.device)
        for i, (images, labels) in enumerate(micro_batches):
            sync = self.ddp is None or i == k - 1
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                if self.graph_steps:
                    torch.compiler.cudagraph_mark_step_begin()
                with mark("forward"):
                    with self.autocast():
                        logits = self.model(images)
                    loss = self.loss(logits, labels) / k
                with mark("backward"):
                    self.scaler.scale(loss).backward()
            total += loss.detach()
        with mark("optimizer"):
            self._step(grad_norm)
        return total

    def _step(self, grad_norm: bool) -> None:
        self.last_grad_norm = None
        if self.cfg.train.clip_grad_norm or grad_norm:
            self.scaler.unscale_(self.optimizer)
            params = [p for p in self.module.parameters() if p.grad is not None]
            if self.cfg.train.clip_grad_norm:
                norm = nn.utils.clip_grad_norm_(params, self.cfg.train.clip_grad_norm)
            else:
                norm = nn.utils.get_total_norm([p.grad for p in params])
            self.last_grad_norm = norm.detach()  # stays on the device until the log record
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    # -- checkpoints: DCP, resharded on load for any world size ----------------------------
    def checkpoint_info(self) -> dict:
        return {"format": "dcp"}

    def _tensors(self) -> dict[str, Any]:
        """Model and optimizer state as DCP sees them (canonical parameter names)."""
        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        return {"model": model_state, "optim": optim_state}

    def save_tensors(
        self, directory: Path, group: Any, async_save: bool, parts: dict[str, dict] | None = None
    ) -> Future | None:
        if self.ddp is not None:
            # DDP broadcasts rank 0's BN buffers at every forward, so rank 0's are the ones
            # that count; make every rank hold them, so whichever rank writes a replicated
            # tensor writes those.
            for buf in self.module.buffers():
                dist.broadcast(buf, src=0)
        tensors = {**self._tensors(), **(parts or {})}
        return dcp.save_tensors(tensors, directory, group, async_save)

    def load_tensors(
        self, directory: Path, meta: dict, parts: dict[str, dict] | None = None
    ) -> None:
        tensors = {**self._tensors(), **(parts or {})}
        dcp.load_tensors(directory, tensors)
        set_state_dict(
            self.module,
            self.optimizer,
            model_state_dict=tensors["model"],
            optim_state_dict=tensors["optim"],
        )
