"""The training loop: restore, then optimizer steps with one boundary policy after each
(log / close the epoch and evaluate / agree on a stop / checkpoint, each at its cadence),
then finish (final evaluation, checkpoint, weights, summary)."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from distres.checkpoint import CheckpointStore
from distres.checkpoint.manager import CheckpointManager
from distres.config import BatchPlan, Config, to_yaml
from distres.data.api import Batch, Loader
from distres.data.batch_augment import BatchAugment
from distres.dist import DistEnv
from distres.ema import WeightEma
from distres.engine.base import Engine
from distres.evaluate import evaluate
from distres.export import save_inference_info, save_weights
from distres.precision import autocast
from distres.profiling import StepProfiler, mark
from distres.stopping import EarlyStopping, StopConsensus
from distres.tracking import TensorBoardRun, Tracker, WandbRun, run_info, wandb_mode
from distres.trainer.reports import Reports
from distres.trainer.resume import same_layout
from distres.trainer.state import (
    RANK_CHECKS,
    SHARED_CHECKS,
    DataPosition,
    LossWindow,
    RngStates,
    SkipCounts,
    TrainState,
)

log = logging.getLogger("distres")


@dataclasses.dataclass(eq=False)
class Trainer(Reports):
    """One run on one rank, its parts built by distres.trainer.build (or by a test)."""

    cfg: Config
    env: DistEnv
    device: torch.device
    plan: BatchPlan
    run_dir: Path
    train_data: Loader
    val_data: Loader
    steps_per_epoch: int
    total_steps: int
    engine: Engine
    early_stopping: EarlyStopping
    consensus: StopConsensus
    tracker: Tracker
    state: TrainState
    window: LossWindow
    data: DataPosition
    checkpoints: CheckpointManager | None = None  # None: checkpoints off
    # color jitter, random erasing, mixup/cutmix on the device (None: none of them is on);
    # its draws are functions of the step, so the checkpoint's step is all its state
    augment: BatchAugment | None = None
    ema: WeightEma | None = None  # train.ema_decay > 0: the EMA of the weights, a tensor part
    profiler: StepProfiler | None = None  # tracking.profile_steps

    def __post_init__(self) -> None:
        if self.checkpoints is None:
            self.attach_checkpoints(None)

    def fit(self, resume_from: tuple[Path, dict] | None = None) -> dict[str, Any]:
        t0 = time.perf_counter()
        if resume_from is not None:
            self.restore(*resume_from)
        self.start()
        reason = None
        self.consensus.install_signal_handlers()
        try:
            while (
                reason is None
                and self.state.step < self.total_steps
                and self.state.epoch < self.cfg.train.epochs
            ):
                reason = self.train_epoch()
            # still under the handlers: a stop signal during the final evaluation and
            # checkpoint only sets a flag, instead of killing the rank halfway through them
            return self.finish(reason or "completed", time.perf_counter() - t0)
        finally:
            self.consensus.restore_signal_handlers()

    def train_epoch(self) -> str | None:
        """The rest of this epoch; the stop reason if the run stops in it."""
        self.data.begin_epoch()
        for micro_batches in self.optimizer_steps():
            self.train_step(micro_batches)
            reason = self.boundary()
            if reason is not None:
                return reason
        # an epoch that ends early (its loader ran short) ends the run
        return "completed" if self.state.epoch_step else None

    def optimizer_steps(self) -> Iterator[list[Batch]]:
        """The rest of this epoch's micro-batches, grad_accum at a time (a short tail is
        dropped)."""
        batches = iter(self.train_data)
        k = self.plan.grad_accum
        for _ in range(self.steps_per_epoch - self.state.epoch_step):
            if self.profiler is not None:
                self.profiler.before(self.state.step + 1)
            t0 = time.perf_counter()
            with mark("data_wait"):
                group = list(itertools.islice(batches, k))
            self.window.data_wait += time.perf_counter() - t0
            if len(group) < k:
                return
            yield group

    def train_step(self, micro_batches: list[Batch]) -> None:
        s = self.state
        # the gradient norm only on steps that log it (it costs a pass over the grads)
        logs = (s.step + 1) % self.cfg.tracking.log_every == 0 or s.step + 1 >= self.total_steps
        if self.augment is not None:
            micro_batches = self.augment(micro_batches, s.step)
        loss = self.engine.train_step(micro_batches, grad_norm=logs)
        self.window.add(loss)
        self.consensus.note_loss(loss)
        s.step += 1
        s.epoch_step += 1
        s.samples_seen += self.plan.global_batch
        if self.ema is not None:
            self.ema.update(s.step, s.samples_seen, self.plan.global_batch)
        if self.profiler is not None:
            self.report_profile(self.profiler.after(s.step))
        self.tracker.step(s.step, s.epoch)

    def boundary(self) -> str | None:
        """After every optimizer step, each at its cadence: log; at an epoch's end, evaluate;
        agree on a stop (the one place a stop reason is decided); checkpoint."""
        s, cfg = self.state, self.cfg
        last = s.step >= self.total_steps
        if s.step % cfg.tracking.log_every == 0 or last:
            self.log_train()
        check = s.step % self.stop_check_every == 0 or last
        epoch_end = s.epoch_step == self.steps_per_epoch
        if epoch_end:
            s.epoch, s.epoch_step = s.epoch + 1, 0
            if not last and s.epoch % cfg.train.eval_every_epochs == 0:
                with self.window.paused():
                    self.validate()
                check = True  # an early-stop decision travels through the consensus
        reason = None
        if check:
            # one all-reduce: the stop flags, and whether any rank's async write still runs
            reason = self.consensus.agree(busy=self.checkpoints.busy())
            if not self.consensus.peers_busy:
                self.checkpoints.commit()  # every rank's part is on disk
        if reason is None and last:
            reason = "completed"
        if reason is None and self.checkpoint_due(epoch_end):
            with self.window.paused():
                self.save_checkpoint()
        return reason

    @property
    def stop_check_every(self) -> int:
        """train.stop_check_every, 0 resolved: each check reads the all-reduce's result, a
        host sync that drains the GPU's queue, so a GPU checks every 25 steps."""
        return self.cfg.train.stop_check_every or (25 if self.device.type == "cuda" else 1)

    def checkpoint_due(self, epoch_end: bool) -> bool:
        ck, s = self.cfg.checkpoint, self.state
        if epoch_end:
            return bool(ck.every_epochs) and s.epoch % ck.every_epochs == 0
        return bool(ck.every_steps) and s.step % ck.every_steps == 0

    # -- start and finish -----------------------------------------------------------------
    def start(self) -> None:
        cfg, env, plan, s = self.cfg, self.env, self.plan, self.state
        mode = wandb_mode(cfg.tracking.wandb) if env.is_main else None
        if mode is not None:
            self.tracker.wandb = WandbRun(
                self.run_dir,
                mode,
                cfg.tracking.wandb_project,
                cfg.tracking.wandb_entity,
                cfg.run.name,
                s.wandb_id,  # from the checkpoint: a resumed job continues its run
                run_info(cfg, env, self.device, plan, self.engine.num_params),
            )
            s.wandb_id = self.tracker.wandb.id
        if env.is_main and cfg.tracking.tensorboard:
            self.tracker.tensorboard = TensorBoardRun(self.run_dir, s.step)
        self.tracker.print(
            f"{cfg.model.name} ({self.engine.num_params / 1e6:.2f}M params) on {self.device}, "
            f"world size {env.world_size}, global batch {plan.global_batch} = "
            f"{plan.micro_batch} x {plan.grad_accum} accum x {env.world_size} ranks, lr "
            f"{self.engine.lr:.4g}, {self.steps_per_epoch} steps/epoch x {cfg.train.epochs} "
            f"epochs, precision {self.engine.amp_dtype or torch.float32}; run dir {self.run_dir}"
        )
        if self.ema is not None:
            self.tracker.print(self.ema.horizon(plan.global_batch))
        self.tracker.start(s.step)
        self.engine.train()

    def finish(self, reason: str, wall_s: float) -> dict[str, Any]:
        s, cfg = self.state, self.cfg
        if self.profiler is not None:  # a window the run stopped in (or never reached)
            self.report_profile(self.profiler.after(s.step, force=True))
        # training's input is done: a pipeline prefetched for an epoch that will not run
        # gives its GPU memory back before the last evaluation (the position was kept)
        self.train_data.close()
        if reason != "non_finite_loss" and s.last_eval.get("step") != s.step:
            # Stopped mid-epoch: the summary still reports this step's accuracy. It is not an
            # evaluation early stopping counts (a preempted run would count one more).
            self.validate(count=False)
        if self.checkpoints.enabled:
            # A non-finite loss poisoned the weights: the last good checkpoint stays "latest".
            if cfg.checkpoint.on_stop and reason != "non_finite_loss":
                self.save_checkpoint()
            self.checkpoints.close()
        self.val_data.close()
        self.report_stop(reason)
        self.tracker.close()
        self.engine.sync_buffers()
        if self.ema is not None and cfg.checkpoint.final_weights == "ema":
            self.ema.sync_buffers()
        if cfg.checkpoint.save_final:
            if cfg.checkpoint.final_weights == "ema":
                weights = self.ema.state_dict()
            else:
                weights = self.engine.full_state_dict()  # a collective under ZeRO-3
            if self.env.is_main:
                final = self.run_dir / "final"
                save_weights(weights, cfg.model, final)
                save_inference_info(final, cfg, self.train_data.shards.classes)
        if cfg.tracking.ledger and reason != "non_finite_loss":
            self.write_ledger()
        summary = {
            "stop_reason": reason,
            "final_val_top1": s.last_eval.get("val/top1"),
            "final_val_top5": s.last_eval.get("val/top5"),
            "final_val_loss": s.last_eval.get("val/loss"),
            "best_val_top1": s.best_top1 if s.best_top1 > -math.inf else None,
            **(
                {"final_val_ema_top1": s.last_eval.get("val_ema/top1")}
                if self.ema is not None
                else {}
            ),
            "steps": s.step,
            "epochs": s.epoch,
            "samples_seen": s.samples_seen,
            "global_batch": self.plan.global_batch,
            "grad_accum": self.plan.grad_accum,
            "world_size": self.env.world_size,
            "model": cfg.model.name,
            "params": self.engine.num_params,
            "wall_s": round(wall_s, 3),
        }
        self.tracker.summary(summary)
        if self.env.is_main and cfg.tracking.plots:
            from distres.report import plot_curves

            plot_curves(self.run_dir)
        self.tracker.finish(failed=reason == "non_finite_loss")
        return summary

    # -- checkpoints ----------------------------------------------------------------------
    def attach_checkpoints(self, store: CheckpointStore | None) -> None:
        """Checkpoints of this run's parts in `store` (None: checkpoints off). What a
        checkpoint holds is this list: a new piece of state is a new part here, with its
        check in distres.trainer.state."""
        self.checkpoints = CheckpointManager(
            store,
            self.engine,
            shared={
                "train": self.state,
                "engine": self.engine,
                "early_stopping": self.early_stopping,
            },
            ranks={
                "data": self.data,
                "rng": RngStates(self.device),
                "window": self.window,
                "skipped": SkipCounts(self.train_data, self.val_data),
            },
            header=self.checkpoint_header,
            checks=(SHARED_CHECKS, RANK_CHECKS),
            tensors={} if self.ema is None else {"ema": self.ema},
        )

    def metric(self) -> float | None:
        """The monitored metric, when this step was evaluated (for the best checkpoint)."""
        last = self.state.last_eval
        return (
            last.get(self.early_stopping.monitor) if last.get("step") == self.state.step else None
        )

    def checkpoint_header(self) -> dict[str, Any]:
        """What meta.json says besides the parts' states."""
        plan, es = self.plan, self.early_stopping
        return {
            "layout": {
                "world_size": self.env.world_size,
                "micro_batch": plan.micro_batch,
                "grad_accum": plan.grad_accum,
                "global_batch": plan.global_batch,
                "steps_per_epoch": self.steps_per_epoch,
            },
            "model": dataclasses.asdict(self.cfg.model),
            "config": to_yaml(self.cfg),
            "metric": {"name": es.monitor, "mode": es.mode, "value": self.metric()},
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def save_checkpoint(self) -> None:
        t0 = time.perf_counter()
        if self.ema is not None and self.checkpoints.enabled:
            self.ema.sync_buffers()  # one set of BN statistics, whichever rank writes them
        path = self.checkpoints.save(self.state.step, self.metric())
        if path is None:
            return
        how = "staged (writing in the background)" if self.cfg.checkpoint.async_save else "saved"
        self.tracker.print(
            f"checkpoint {how}: {path} (step {self.state.step}, {time.perf_counter() - t0:.2f} s)"
        )

    def restore(self, path: Path, meta: dict) -> None:
        self.checkpoints.load(path, meta, self.env.rank, same_layout(meta, self.env, self.plan))
        s, layout = self.state, meta["layout"]
        if self.env.is_main:
            self.tracker.truncate_after(s.step)
        # The history says where it resumed: [before, now] where the layout changed.
        self.tracker.log(
            {
                "event": "resume",
                "step": s.step,
                "epoch": s.epoch,
                "samples": s.samples_seen,
                "checkpoint": str(path),
                "world_size": [layout["world_size"], self.env.world_size],
                "grad_accum": [layout["grad_accum"], self.plan.grad_accum],
            }
        )
        log.info(
            f"resumed from {path}: step {s.step}, epoch {s.epoch + 1} "
            f"(step {s.epoch_step} of {self.steps_per_epoch}), {s.samples_seen} samples "
            f"seen; written by {layout['world_size']} rank(s), now {self.env.world_size}"
        )

    def validate(self, count: bool = True) -> dict[str, float]:
        s = self.state
        self.val_data.set_epoch(s.epoch)
        self.engine.sync_buffers()
        metrics = evaluate(
            self.engine.module,
            self.val_data,
            self.device,
            self.engine.autocast,
            self.engine.input_dtype,
        )
        if self.ema is not None:
            # the EMA in fp32 under the run's autocast (DeepSpeed's module may be half)
            self.ema.sync_buffers()
            self.val_data.set_epoch(s.epoch)
            amp, device = self.engine.amp_dtype, self.device
            ema = evaluate(self.ema.module, self.val_data, device, lambda: autocast(device, amp))
            metrics.update({k.replace("val/", "val_ema/", 1): v for k, v in ema.items()})
        self.engine.train()
        s.best_top1 = max(s.best_top1, metrics["val/top1"])
        s.last_eval = {**metrics, "step": s.step}
        self.tracker.log(
            {
                "event": "eval",
                "step": s.step,
                "epoch": max(0, s.epoch - 1),
                "samples": s.samples_seen,
                "lr": self.engine.current_lr(),
                **metrics,
            }
        )
        # Metrics are all-reduced, so every rank reaches the same decision; it still travels
        # through the consensus so there is one path to a stop.
        if count and self.early_stopping.update(metrics, s.step):
            self.consensus.early_stop = True
        return metrics
