"""The training loop: build everything from the config, then fit()."""

from __future__ import annotations

import itertools
import math
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distres.config import BatchPlan, Config, ConfigError
from distres.data import Batch, build_loaders
from distres.dist import DistEnv
from distres.engine import build_engine
from distres.evaluate import evaluate
from distres.export import save_weights
from distres.stopping import EarlyStopping, StopConsensus
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
    """Owns the data, the engine and the bookkeeping of one run on one rank."""

    def __init__(
        self, cfg: Config, run_dir: Path, env: DistEnv, device: torch.device, plan: BatchPlan
    ):
        self.cfg, self.run_dir, self.env, self.device, self.plan = cfg, run_dir, env, device, plan
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        # The same seed on every rank: identical initial weights (DDP also broadcasts them).
        seed_everything(cfg.run.seed, cfg.run.deterministic)

        self.train_data, self.val_data = build_loaders(cfg, device, env.rank, env.world_size)
        self.steps_per_epoch = len(self.train_data) // plan.grad_accum
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"train.batch_size={plan.micro_batch} x grad_accum={plan.grad_accum} is more "
                f"than the {self.train_data.num_samples()} training samples each of "
                f"{env.world_size} rank(s) reads per epoch"
            )
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        if cfg.train.max_steps:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)

        self.engine = build_engine(cfg, env, device, plan, self.steps_per_epoch)
        self.early_stopping = EarlyStopping(cfg.early_stop)
        self.consensus = StopConsensus(device)
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

    # -- the loop -------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.tracker.print(
            f"{self.cfg.model.name} ({self.engine.num_params / 1e6:.2f}M params) on "
            f"{self.device}, world size {self.env.world_size}, global batch "
            f"{self.plan.global_batch} = {self.plan.micro_batch} x {self.plan.grad_accum} "
            f"accum x {self.env.world_size} ranks, lr {self.engine.lr:.4g}, "
            f"{self.steps_per_epoch} steps/epoch x {self.cfg.train.epochs} epochs, precision "
            f"{self.engine.amp_dtype or torch.float32}; run dir {self.run_dir}"
        )
        self.consensus.install_signal_handlers()
        self.tracker.start(self.step)
        self.engine.model.train()
        try:
            while self.stop_reason is None and self.epoch < self.cfg.train.epochs:
                self.train_epoch()
                self.epoch += 1
                if self.stop_reason is None and (
                    self.epoch == self.cfg.train.epochs
                    or self.epoch % self.cfg.train.eval_every_epochs == 0
                ):
                    self.validate()
                    self.stop_reason = self.consensus.agree()
        finally:
            self.consensus.restore_signal_handlers()
        self.stop_reason = self.stop_reason or "completed"
        if self.stop_reason != "non_finite_loss" and self.last_eval.get("step") != self.step:
            self.validate()  # stopped mid-epoch: the summary still reports this step's accuracy
        self.report_stop()
        self.tracker.close()
        self.engine.sync_buffers()
        if self.cfg.checkpoint.save_final and self.env.is_main:
            save_weights(self.engine.module, self.cfg.model, self.run_dir / "final")
        summary = {
            "stop_reason": self.stop_reason,
            "final_val_top1": self.last_eval.get("val/top1"),
            "final_val_top5": self.last_eval.get("val/top5"),
            "final_val_loss": self.last_eval.get("val/loss"),
            "best_val_top1": self.best_top1 if self.best_top1 > -math.inf else None,
            "steps": self.step,
            "epochs": self.epoch,
            "samples_seen": self.samples_seen,
            "global_batch": self.plan.global_batch,
            "grad_accum": self.plan.grad_accum,
            "world_size": self.env.world_size,
            "model": self.cfg.model.name,
            "params": self.engine.num_params,
            "wall_s": round(time.perf_counter() - t0, 3),
        }
        self.tracker.summary(summary)
        return summary

    def optimizer_steps(self) -> Iterator[list[Batch]]:
        """This epoch's micro-batches, grad_accum at a time (a short tail is dropped)."""
        batches = iter(self.train_data)
        k = self.plan.grad_accum
        for _ in range(self.steps_per_epoch):
            group = list(itertools.islice(batches, k))
            if len(group) < k:
                return
            yield group

    def train_epoch(self) -> None:
        self.train_data.set_epoch(self.epoch)
        log_every = self.cfg.tracking.log_every
        check_every = self.cfg.train.stop_check_every
        for micro_batches in self.optimizer_steps():
            loss = self.engine.train_step(micro_batches)
            self.window.add(loss)
            self.consensus.note_loss(loss)
            self.step += 1
            self.samples_seen += self.plan.global_batch
            self.tracker.step(self.step, self.epoch)
            last = self.step >= self.total_steps
            if self.step % log_every == 0 or last:
                self.log_train()
            if self.step % check_every == 0 or last:
                self.stop_reason = self.consensus.agree()
            if self.stop_reason is None and last:
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
                "lr": self.engine.current_lr(),
                "train/loss": mean_loss,
                "img_per_s": steps * self.plan.global_batch / max(elapsed, 1e-9),
                "data/skipped": self.skipped_samples(),
            }
        )

    def skipped_samples(self) -> int:
        """Bad samples skipped so far on all ranks (data.on_bad_sample=skip); log steps only."""
        count = self.train_data.skipped + self.val_data.skipped
        if not self.env.distributed:
            return count
        total = torch.tensor([count], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(total)
        return int(total.item())

    def validate(self) -> dict[str, float]:
        self.val_data.set_epoch(self.epoch)
        self.engine.sync_buffers()
        metrics = evaluate(self.engine.module, self.val_data, self.device, self.engine.autocast)
        self.engine.model.train()
        self.best_top1 = max(self.best_top1, metrics["val/top1"])
        self.last_eval = {**metrics, "step": self.step}
        self.tracker.log(
            {
                "event": "eval",
                "step": self.step,
                "epoch": max(0, self.epoch - 1),
                "samples": self.samples_seen,
                "lr": self.engine.current_lr(),
                **metrics,
            }
        )
        # Metrics are all-reduced, so every rank reaches the same decision; it still travels
        # through the consensus so there is one path to a stop.
        if self.early_stopping.update(metrics, self.step):
            self.consensus.early_stop = True
        return metrics

    def report_stop(self) -> None:
        reason, es = self.stop_reason, self.early_stopping
        if reason == "early_stop":
            self.tracker.print(
                f"early stop at step {self.step}: {es.monitor} has not improved "
                f"on {es.best:.4f} for {es.patience} evaluations"
            )
        elif reason == "preempted":
            self.tracker.print(f"stop requested by a signal; all ranks stopped at step {self.step}")
        elif reason == "non_finite_loss":
            self.tracker.print(
                f"non-finite training loss on at least one rank; all ranks "
                f"stopped at step {self.step}"
            )
