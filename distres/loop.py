"""The training loop: build everything from the config, then fit()."""

from __future__ import annotations

import contextlib
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from distres.config import Config
from distres.data import Batch, build_loaders
from distres.dist import DistEnv
from distres.evaluate import evaluate
from distres.export import save_weights, unwrap
from distres.models import build_model, count_params
from distres.optim import build_optimizer, build_scheduler
from distres.stopping import EarlyStopping
from distres.tracking import Tracker


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest algo


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class LossWindow:
    """Train loss summed on the device between log records: the hot loop never syncs; the
    window spans epoch ends, so every step lands in exactly one record."""

    def __init__(self, device: torch.device):
        self.total = torch.zeros((), device=device)
        self.steps, self.t0 = 0, time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.total += loss
        self.steps += 1

    def drain(self) -> tuple[float, int, float]:
        """(mean loss, steps, seconds) since the last drain; one host-device sync."""
        mean = (self.total / max(1, self.steps)).item()
        out = (mean, self.steps, time.perf_counter() - self.t0)
        self.total.zero_()
        self.steps, self.t0 = 0, time.perf_counter()
        return out


class Trainer:
    """Owns the model, data, optimizer and bookkeeping of one run on one rank."""

    def __init__(self, cfg: Config, run_dir: Path, env: DistEnv, device: torch.device):
        self.cfg, self.run_dir, self.env, self.device = cfg, run_dir, env, device
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        seed_everything(cfg.run.seed + env.rank, cfg.run.deterministic)

        memory_format = torch.channels_last if cfg.train.channels_last else torch.preserve_format
        model = build_model(cfg.model).to(device, memory_format=memory_format)
        self.num_params = count_params(model)
        if env.distributed:
            model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        self.model = torch.compile(model) if cfg.engine.compile else model

        self.train_data, self.val_data = build_loaders(cfg, device, env.rank, env.world_size)
        self.steps_per_epoch = len(self.train_data)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"train.batch_size={cfg.train.batch_size} is larger than the "
                f"{self.train_data.num_samples()} training samples a rank reads per epoch"
            )
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        if cfg.train.max_steps:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        self.global_batch = cfg.train.batch_size * env.world_size

        self.optimizer = build_optimizer(unwrap(self.model), cfg.optim, device)
        self.scheduler = build_scheduler(
            self.optimizer, cfg.optim, self.steps_per_epoch, cfg.train.epochs
        )
        self.amp_dtype = resolve_precision(cfg.train.precision, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.early_stopping = EarlyStopping(cfg.early_stop)
        self.tracker = Tracker(
            run_dir,
            cfg.tracking.progress,
            self.total_steps,
            cfg.train.epochs,
            cfg.tracking.log_every,
            enabled=env.is_main,
        )
        self.step = self.epoch = self.samples_seen = 0
        self.best_top1 = -math.inf
        self.last_eval: dict[str, float] = {}
        self.stop_reason: str | None = None
        self.window = LossWindow(device)

    # -- one step -------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self, batch: Batch) -> torch.Tensor:
        with self.autocast():
            logits = self.model(batch.images)
        loss = F.cross_entropy(
            logits.float(), batch.labels, label_smoothing=self.cfg.train.label_smoothing
        )
        self.scaler.scale(loss).backward()
        if self.cfg.train.clip_grad_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return loss.detach()

    # -- the loop -------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.tracker.print(
            f"{self.cfg.model.name} ({self.num_params / 1e6:.2f}M params) on {self.device}, "
            f"world size {self.env.world_size}, global batch {self.global_batch}, "
            f"{self.steps_per_epoch} steps/epoch x {self.cfg.train.epochs} epochs, "
            f"precision {self.amp_dtype or torch.float32}; run dir {self.run_dir}"
        )
        self.tracker.start(self.step)
        self.model.train()
        while self.stop_reason is None and self.epoch < self.cfg.train.epochs:
            self.train_epoch()
            self.epoch += 1
            last = self.epoch == self.cfg.train.epochs or self.stop_reason is not None
            if self.stop_reason != "non_finite_loss" and (
                last or self.epoch % self.cfg.train.eval_every_epochs == 0
            ):
                self.validate()
        if self.stop_reason is None:
            self.stop_reason = "completed"
        elif self.stop_reason != "non_finite_loss" and self.last_eval.get("step") != self.step:
            self.validate()  # stopped mid-epoch: the summary still reports this step's accuracy
        self.tracker.close()
        if self.cfg.checkpoint.save_final and self.env.is_main:
            save_weights(self.model, self.cfg.model, self.run_dir / "final")
        summary = {
            "stop_reason": self.stop_reason,
            "final_val_top1": self.last_eval.get("val/top1"),
            "final_val_top5": self.last_eval.get("val/top5"),
            "final_val_loss": self.last_eval.get("val/loss"),
            "best_val_top1": self.best_top1 if self.best_top1 > -math.inf else None,
            "steps": self.step,
            "epochs": self.epoch,
            "samples_seen": self.samples_seen,
            "global_batch": self.global_batch,
            "world_size": self.env.world_size,
            "model": self.cfg.model.name,
            "params": self.num_params,
            "wall_s": round(time.perf_counter() - t0, 3),
        }
        self.tracker.summary(summary)
        return summary

    def train_epoch(self) -> None:
        self.train_data.set_epoch(self.epoch)
        log_every = self.cfg.tracking.log_every
        # Accumulated on the device; read back only at log intervals (no per-step sync).
        loss_sum = torch.zeros((), device=self.device)
        window_steps, window_t0 = 0, time.perf_counter()
        for batch in self.train_data:
            loss = self.train_step(batch)
            loss_sum += loss
            self.step += 1
            window_steps += 1
            self.samples_seen += self.global_batch
            self.tracker.step(self.step, self.epoch)
            if self.step % log_every == 0 or self.step == self.total_steps:
                mean_loss = (loss_sum / window_steps).item()
                elapsed = time.perf_counter() - window_t0
                self.tracker.log(
                    {
                        "event": "train",
                        "step": self.step,
                        "epoch": self.epoch,
                        "samples": self.samples_seen,
                        "lr": self.scheduler.get_last_lr()[0],
                        "train/loss": mean_loss,
                        "img_per_s": window_steps * self.global_batch / max(elapsed, 1e-9),
                    }
                )
                if not math.isfinite(mean_loss):
                    self.stop_reason = "non_finite_loss"
                    self.tracker.print(
                        f"non-finite training loss ({mean_loss}) at step {self.step}; stopping"
                    )
                loss_sum.zero_()
                window_steps, window_t0 = 0, time.perf_counter()
            if self.step >= self.total_steps and self.stop_reason is None:
                self.stop_reason = "completed"
            if self.stop_reason is not None:
                return

    def log_train(self) -> None:
        mean_loss, steps, elapsed = self.window.drain()
        self.tracker.log(
            {
                "event": "train",
                "step": self.step,
                "epoch": self.epoch,
                "samples": self.samples_seen,
                "lr": self.scheduler.get_last_lr()[0],
                "train/loss": mean_loss,
                "img_per_s": steps * self.global_batch / max(elapsed, 1e-9),
            }
        )
        if not math.isfinite(mean_loss):
            self.stop_reason = "non_finite_loss"
            self.tracker.print(
                f"non-finite training loss ({mean_loss}) at step {self.step}; stopping"
            )

    def validate(self) -> dict[str, float]:
        self.val_data.set_epoch(self.epoch)
        metrics = evaluate(unwrap(self.model), self.val_data, self.device, self.autocast)
        self.best_top1 = max(self.best_top1, metrics["val/top1"])
        self.last_eval = {**metrics, "step": self.step}
        self.tracker.log(
            {
                "event": "eval",
                "step": self.step,
                "epoch": max(0, self.epoch - 1),
                "samples": self.samples_seen,
                "lr": self.scheduler.get_last_lr()[0],
                **metrics,
            }
        )
        if self.early_stopping.update(metrics, self.step) and self.stop_reason is None:
            self.stop_reason = "early_stop"
            self.tracker.print(
                f"early stop: {self.early_stopping.monitor} has not improved on "
                f"{self.early_stopping.best:.4f} for {self.early_stopping.patience} evaluations"
            )
        return metrics
