"""The DDP engine: channels_last, autocast (bf16 / fp16 + GradScaler / fp32), gradient
accumulation under no_sync, optional torch.compile and SyncBatchNorm.

On one process the model is used unwrapped (no DDP); the code path is otherwise the same.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from distres.config import BatchPlan, Config, ConfigError
from distres.data.batch import Batch
from distres.dist import DistEnv, average_buffers
from distres.models import build_model
from distres.models.resnet import count_params
from distres.optim import build_optimizer, build_scheduler


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def scaled_lr(cfg: Config, plan: BatchPlan) -> float:
    if cfg.optim.lr_scaling == "linear":
        return cfg.optim.lr * plan.global_batch / 256
    return cfg.optim.lr


class DDPEngine:
    checkpoint_format = "dcp"
    # autocast handles precision; inputs stay as the loader gives them
    input_dtype: torch.dtype | None = None

    def __init__(
        self,
        cfg: Config,
        env: DistEnv,
        device: torch.device,
        plan: BatchPlan,
        steps_per_epoch: int,
    ):
        self.cfg, self.env, self.device, self.plan = cfg, env, device, plan
        model = build_model(cfg.model)
        model.set_grad_checkpointing(cfg.engine.checkpoint_group)
        if cfg.engine.sync_bn and env.distributed:
            if device.type != "cuda":
                raise ConfigError(
                    "engine.sync_bn=true needs CUDA devices (SyncBatchNorm has no "
                    "CPU kernel); set engine.sync_bn=false"
                )
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        memory_format = torch.channels_last if cfg.train.channels_last else torch.preserve_format
        self.module = model.to(device, memory_format=memory_format)
        self.num_params = count_params(self.module)
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
        self.model = torch.compile(wrapped, dynamic=False) if cfg.engine.compile else wrapped

        self.lr = scaled_lr(cfg, plan)
        self.optimizer = build_optimizer(self.module, cfg.optim, device, lr=self.lr)
        self.scheduler = build_scheduler(
            self.optimizer, cfg.optim, steps_per_epoch, cfg.train.epochs
        )
        self.amp_dtype = resolve_precision(cfg.train.precision, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    last_grad_norm: torch.Tensor | None = None

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
                with self.autocast():
                    logits = self.model(images)
                loss = (
                    F.cross_entropy(
                        logits.float(), labels, label_smoothing=self.cfg.train.label_smoothing
                    )
                    / k
                )
                self.scaler.scale(loss).backward()
            total += loss.detach()
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
        return total

    @torch.no_grad()
    def sync_buffers(self) -> None:
        """Average BN running statistics over ranks (timm's distribute_bn), so evaluation and
        the saved weights see one model, not one per rank. DDP's per-forward broadcast of rank
        0's buffers would otherwise leave each rank with stats from its own last batch."""
        if self.ddp is not None:
            average_buffers(self.module, self.env.world_size)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def current_lr(self) -> float:
        return self.scheduler.get_last_lr()[0]
