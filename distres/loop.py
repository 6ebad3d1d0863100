"""The training loop: build everything from the config, then fit()."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from distres import checkpoint as ckpt
from distres.config import BatchPlan, Config, ConfigError, to_yaml
from distres.data import Batch, build_loaders
from distres.data.loaders import host_threads
from distres.dist import DistEnv
from distres.engine import build_engine
from distres.evaluate import evaluate
from distres.export import save_inference_info, save_weights
from distres.rng import rng_state, set_rng_state
from distres.stopping import EarlyStopping, StopConsensus
from distres.tracking import Tracker, WandbRun, wandb_mode


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
        self.data_wait = 0.0  # host seconds spent waiting for input in this window

    def add(self, loss: torch.Tensor) -> None:
        self.total += loss
        self.steps += 1

    def state_dict(self) -> dict:
        return {"total": self.total.item(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.total.fill_(state["total"])
        self.steps = state["steps"]

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (evaluation, a checkpoint) is not training time: leave it out
        of the window's img/s and step time."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.t0 += time.perf_counter() - t0

    def drain(self) -> tuple[float, int, float]:
        """(mean loss, steps, seconds) since the last drain; one host-device sync."""
        mean = (self.total / max(1, self.steps)).item()
        out = (mean, self.steps, time.perf_counter() - self.t0)
        self.total.zero_()
        self.steps, self.t0 = 0, time.perf_counter()
        self.data_wait = 0.0
        return out


class Trainer:
    """Owns the data, the engine and the bookkeeping of one run on one rank."""

    def __init__(
        self, cfg: Config, run_dir: Path, env: DistEnv, device: torch.device, plan: BatchPlan
    ):
        self.cfg, self.run_dir, self.env, self.device, self.plan = cfg, run_dir, env, device, plan
        threads = cfg.run.threads or host_threads(cfg, device)
        if threads:
            torch.set_num_threads(threads)
        # The same seed on every rank: identical initial weights (DDP also broadcasts them).
        seed_everything(cfg.run.seed, cfg.run.deterministic)
        self.ckpt_root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"
        self.resume_from = self.find_resume()
        if self.resume_from is not None:
            self.check_compatible(*self.resume_from)
            self.plan = plan = self.replan(self.resume_from[1])

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
        self.epoch_step = 0  # optimizer steps done in the current epoch
        self.best_top1 = -math.inf
        self.last_eval: dict[str, float] = {}
        self.stop_reason: str | None = None
        self.window = LossWindow(device)
        self.wandb_id = ""  # set by W&B tracking; kept across resumes
        self.writer = None
        if cfg.checkpoint.enabled:
            self.writer = ckpt.CheckpointWriter(
                self.ckpt_root,
                rank=env.rank,
                world_size=env.world_size,
                keep_last=cfg.checkpoint.keep_last,
                keep_best=cfg.checkpoint.keep_best,
                mode=self.early_stopping.mode,
                async_save=cfg.checkpoint.async_save,
            )
        self.saved_step = -1
        self._data_state: dict | None = None  # a mid-epoch data position to restore
        if self.resume_from is not None:
            self.restore(*self.resume_from)
        mode = wandb_mode(cfg.tracking.wandb) if env.is_main else None
        if mode is not None:
            self.tracker.wandb = WandbRun(
                run_dir,
                mode,
                cfg.tracking.wandb_project,
                cfg.tracking.wandb_entity,
                cfg.run.name,
                self.wandb_id,  # from the checkpoint: a resumed job continues its run
                run_info(cfg, env, device, self.plan, self.engine.num_params),
            )
            self.wandb_id = self.tracker.wandb.id

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
        ck = self.cfg.checkpoint
        try:
            while (
                self.stop_reason is None
                and self.epoch < self.cfg.train.epochs
                and self.step < self.total_steps
            ):
                self.train_epoch()
                if self.epoch_step < self.steps_per_epoch:
                    break  # stopped mid-epoch
                self.epoch += 1
                self.epoch_step = 0
                if self.stop_reason is None and (
                    self.epoch == self.cfg.train.epochs
                    or self.epoch % self.cfg.train.eval_every_epochs == 0
                ):
                    with self.window.paused():
                        self.validate()
                    self.stop_reason = self.agree()
                if (
                    self.stop_reason is None
                    and ck.every_epochs
                    and self.epoch % ck.every_epochs == 0
                ):
                    with self.window.paused():
                        self.save_checkpoint()
        finally:
            self.consensus.restore_signal_handlers()
        self.stop_reason = self.stop_reason or "completed"
        if self.stop_reason != "non_finite_loss" and self.last_eval.get("step") != self.step:
            # Stopped mid-epoch: the summary still reports this step's accuracy. It is not an
            # evaluation early stopping counts (a preempted run would count one more).
            self.validate(count=False)
        if self.writer is not None:
            # A non-finite loss poisoned the weights: the last good checkpoint stays "latest".
            if ck.on_stop and self.stop_reason != "non_finite_loss":
                self.save_checkpoint()
            self.writer.close()
        self.report_stop()
        self.tracker.close()
        self.engine.sync_buffers()
        if self.cfg.checkpoint.save_final:
            weights = self.engine.full_state_dict()  # a collective under ZeRO-3
            if self.env.is_main:
                final = self.run_dir / "final"
                save_weights(weights, self.cfg.model, final)
                save_inference_info(final, self.cfg, self.train_data.shards.classes)
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
        if self.env.is_main and self.cfg.tracking.plots:
            from distres.report import plot_curves

            plot_curves(self.run_dir)
        self.tracker.finish(failed=self.stop_reason == "non_finite_loss")
        return summary

    def optimizer_steps(self) -> Iterator[list[Batch]]:
        """The rest of this epoch's micro-batches, grad_accum at a time (a short tail is
        dropped)."""
        batches = iter(self.train_data)
        k = self.plan.grad_accum
        for _ in range(self.steps_per_epoch - self.epoch_step):
            t0 = time.perf_counter()
            group = list(itertools.islice(batches, k))
            self.window.data_wait += time.perf_counter() - t0
            if len(group) < k:
                return
            yield group

    def train_epoch(self) -> None:
        if self._data_state is not None:  # resumed mid-epoch on the same world size
            self.train_data.load_state_dict(self._data_state)
            self._data_state = None
        elif self.epoch_step == 0:
            self.train_data.set_epoch(self.epoch)
        log_every = self.cfg.tracking.log_every
        check_every = self.cfg.train.stop_check_every
        save_every = self.cfg.checkpoint.every_steps
        for micro_batches in self.optimizer_steps():
            # the gradient norm only on steps that log it (it costs a pass over the grads)
            logs = (self.step + 1) % log_every == 0 or self.step + 1 >= self.total_steps
            loss = self.engine.train_step(micro_batches, grad_norm=logs)
            self.window.add(loss)
            self.consensus.note_loss(loss)
            self.step += 1
            self.epoch_step += 1
            self.samples_seen += self.plan.global_batch
            self.tracker.step(self.step, self.epoch)
            last = self.step >= self.total_steps
            if self.step % log_every == 0 or last:
                self.log_train()
            if self.step % check_every == 0 or last:
                self.stop_reason = self.agree()
            if self.stop_reason is None and last:
                self.stop_reason = "completed"
            if self.stop_reason is not None:
                return
            if (
                save_every
                and self.step % save_every == 0
                and self.epoch_step < self.steps_per_epoch
            ):
                with self.window.paused():
                    self.save_checkpoint()

    def agree(self) -> str | None:
        """The stop consensus; it also tells whether every rank's async checkpoint write has
        finished, and commits it then."""
        writing = self.writer is not None and self.writer.pending is not None
        reason = self.consensus.agree(busy=writing and not self.writer.ready())
        if writing and not self.consensus.peers_busy:
            self.writer.wait()
        return reason

    # -- checkpoints ------------------------------------------------------------------------
    def checkpoint_tensors(self) -> dict[str, Any]:
        """Model and optimizer state as DCP sees them (canonical parameter names)."""
        if self.engine.ddp is not None:
            # DDP broadcasts rank 0's BN buffers at every forward, so rank 0's are the ones
            # that count; make every rank hold them, so whichever rank writes a replicated
            # tensor writes those.
            for buf in self.engine.module.buffers():
                dist.broadcast(buf, src=0)
        model_state, optim_state = get_state_dict(self.engine.module, self.engine.optimizer)
        return {"model": model_state, "optim": optim_state}

    def save_checkpoint(self) -> None:
        if self.writer is None or self.saved_step == self.step:
            return
        es = self.early_stopping
        metric = self.last_eval.get(es.monitor) if self.last_eval.get("step") == self.step else None
        meta = {
            "step": self.step,
            "epoch": self.epoch,
            "epoch_step": self.epoch_step,
            "samples_seen": self.samples_seen,
            "world_size": self.env.world_size,
            "micro_batch": self.plan.micro_batch,
            "grad_accum": self.plan.grad_accum,
            "global_batch": self.plan.global_batch,
            "steps_per_epoch": self.steps_per_epoch,
            "scheduler": _jsonable(self.engine.scheduler.state_dict()),
            "scaler": self.engine.scaler.state_dict(),
            "early_stopping": es.state_dict(),
            "best_top1": self.best_top1 if self.best_top1 > -math.inf else None,
            "last_eval": self.last_eval,
            "metric": {"name": es.monitor, "mode": es.mode, "value": metric},
            "wandb_id": self.wandb_id,
            "format": self.engine.checkpoint_format,
            "zero_stage": self.cfg.engine.zero_stage if self.cfg.engine.name == "deepspeed" else 0,
            "model": dataclasses.asdict(self.cfg.model),
            "config": to_yaml(self.cfg),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        rank_state = {
            "data": self.train_data.state_dict(),
            "rng": rng_state(self.device),
            "window": self.window.state_dict(),
            "skipped": {"train": self.train_data.skipped, "val": self.val_data.skipped},
        }
        t0 = time.perf_counter()
        if self.engine.checkpoint_format == "deepspeed":
            # DeepSpeed's own format (ZeRO partitions, one file per rank); our state rides
            # along as client state too.
            path = self.writer.save(
                self.step,
                meta,
                rank_state,
                metric,
                write=lambda d: self.engine.save_checkpoint(d, {"distres": meta}),
            )
        else:
            path = self.writer.save(
                self.step, meta, rank_state, metric, tensors=self.checkpoint_tensors()
            )
        self.saved_step = self.step
        how = "staged (writing in the background)" if self.cfg.checkpoint.async_save else "saved"
        self.tracker.print(
            f"checkpoint {how}: {path} (step {self.step}, {time.perf_counter() - t0:.2f} s)"
        )

    def find_resume(self) -> tuple[Path, dict] | None:
        """Rank 0 picks the checkpoint (warning about any it skips); every rank gets its
        choice, so all load the same one."""
        choice: list[Any] = [None]
        if self.env.is_main and self.cfg.checkpoint.resume == "none":
            if ckpt.committed(self.ckpt_root):
                choice = [
                    f"checkpoint.resume=none, but {self.ckpt_root} holds checkpoints of an "
                    "earlier run; set another run.dir (or checkpoint.dir), or remove them"
                ]
        elif self.env.is_main:
            try:
                found = ckpt.find_resume(self.ckpt_root, self.cfg.checkpoint.resume)
                choice = [(str(found[0]), found[1]) if found else None]
            except ckpt.CheckpointError as e:
                choice = [[str(e)]]
        if self.env.distributed:
            dist.broadcast_object_list(choice, src=0)
        if isinstance(choice[0], str):
            raise ConfigError(choice[0])
        if isinstance(choice[0], list):  # [message]: a checkpoint that cannot be used
            raise ckpt.CheckpointError(choice[0][0])
        return (Path(choice[0][0]), choice[0][1]) if choice[0] else None

    def check_compatible(self, path: Path, meta: dict) -> None:
        theirs, ours = meta["model"], dataclasses.asdict(self.cfg.model)
        for key in ("name", "num_classes", "in_chans", "plain"):
            if theirs.get(key) != ours[key]:
                raise ConfigError(
                    f"checkpoint {path} holds model.{key}={theirs.get(key)!r}, this run has "
                    f"model.{key}={ours[key]!r}; resume with the same model, or set "
                    "checkpoint.resume=none (or another run.dir) to start fresh"
                )

    def replan(self, meta: dict) -> BatchPlan:
        """Keep the checkpoint's global batch on this world size where it divides."""
        plan, saved = self.plan, meta["global_batch"]
        if plan.global_batch == saved:
            return plan
        per_step = plan.micro_batch * plan.world_size
        if saved % per_step == 0:
            new = BatchPlan(plan.micro_batch, saved // per_step, plan.world_size)
            self._note(
                f"resuming a global batch of {saved} on {plan.world_size} rank(s): "
                f"grad_accum {plan.grad_accum} -> {new.grad_accum}"
            )
            return new
        self._note(
            f"WARNING: the checkpoint's global batch {saved} is not a multiple of "
            f"train.batch_size={plan.micro_batch} x {plan.world_size} ranks; the global batch "
            f"changes to {plan.global_batch} (LR and schedule follow this run's config)"
        )
        return plan

    def restore(self, path: Path, meta: dict) -> None:
        written_by = meta.get("format", "dcp")
        if written_by != self.engine.checkpoint_format:
            raise ConfigError(
                f"checkpoint {path} was written by the {written_by} engine's format; this run "
                f"has engine.name={self.cfg.engine.name}; resume with the same engine, or export "
                "the weights (python -m distres.export) and start a new run"
            )
        if written_by == "deepspeed":
            self.engine.load_checkpoint(path, meta)
        else:
            tensors = self.checkpoint_tensors()
            ckpt.load_tensors(path, tensors)
            set_state_dict(
                self.engine.module,
                self.engine.optimizer,
                model_state_dict=tensors["model"],
                optim_state_dict=tensors["optim"],
            )
        self.engine.scheduler.load_state_dict(meta["scheduler"])
        if meta["scaler"]:
            self.engine.scaler.load_state_dict(meta["scaler"])
        self.early_stopping.load_state_dict(meta["early_stopping"])
        self.best_top1 = -math.inf if meta["best_top1"] is None else meta["best_top1"]
        self.last_eval = meta["last_eval"]
        self.wandb_id = meta["wandb_id"]
        self.step, self.samples_seen = meta["step"], meta["samples_seen"]
        self.epoch, self.epoch_step = meta["epoch"], meta["epoch_step"]
        self.saved_step = self.step
        same_layout = (meta["world_size"], meta["micro_batch"], meta["grad_accum"]) == (
            self.env.world_size,
            self.plan.micro_batch,
            self.plan.grad_accum,
        )
        if same_layout:
            mine = ckpt.read_rank_state(path, self.env.rank)
            if self.epoch_step:
                self._data_state = mine["data"]
            set_rng_state(mine["rng"], self.device)
            self.window.load_state_dict(mine["window"])
            self.train_data.skipped = mine["skipped"]["train"]
            self.val_data.skipped = mine["skipped"]["val"]
        elif self.epoch_step:
            states = [ckpt.read_rank_state(path, r)["data"] for r in range(meta["world_size"])]
            left = self.train_data.resume_from_ranks(
                self.epoch, states, meta["micro_batch"], meta["world_size"]
            )
            self.epoch_step = max(0, self.steps_per_epoch - left // self.plan.grad_accum)
        if self.env.is_main:
            self.tracker.truncate_after(self.step)
        self._note(
            f"resumed from {path}: step {self.step}, epoch {self.epoch + 1} "
            f"(step {self.epoch_step} of {self.steps_per_epoch}), {self.samples_seen} samples "
            f"seen; written by {meta['world_size']} rank(s), now {self.env.world_size}"
        )

    def _note(self, line: str) -> None:
        if self.env.is_main:
            print(f"[distres] {line}", file=sys.stderr, flush=True)

    def log_train(self) -> None:
        wait = self.window.data_wait
        mean_loss, steps, elapsed = self.window.drain()
        record = {
            "event": "train",
            "step": self.step,
            "epoch": self.epoch,
            "samples": self.samples_seen,
            "lr": self.engine.current_lr(),
            "train/loss": mean_loss,
            "img_per_s": steps * self.plan.global_batch / max(elapsed, 1e-9),
            "step_time_s": elapsed / max(1, steps),
            # time the loop waited for input / wall time (host clock; on a GPU the wait
            # also absorbs queued kernels, so it reads high when the GPU is the bottleneck)
            "data_wait_frac": min(1.0, wait / max(elapsed, 1e-9)),
            "data/skipped": self.skipped_samples(),
            "image_size": self.cfg.data.train_size(self.epoch),
        }
        norm = self.engine.last_grad_norm
        if norm is not None:
            record["grad_norm"] = float(norm)
        if self.device.type == "cuda":
            record["gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
        self.tracker.log(record)

    def skipped_samples(self) -> int:
        """Bad samples skipped so far on all ranks (data.on_bad_sample=skip); log steps only."""
        count = self.train_data.skipped + self.val_data.skipped
        if not self.env.distributed:
            return count
        total = torch.tensor([count], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(total)
        return int(total.item())

    def validate(self, count: bool = True) -> dict[str, float]:
        self.val_data.set_epoch(self.epoch)
        self.engine.sync_buffers()
        metrics = evaluate(
            self.engine.module,
            self.val_data,
            self.device,
            self.engine.autocast,
            self.engine.input_dtype,
        )
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
        if count and self.early_stopping.update(metrics, self.step):
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


def _jsonable(state: dict) -> dict:
    """An LR scheduler's state without its callables (ours are rebuilt from the config)."""
    return {k: v for k, v in state.items() if not callable(v)}


def run_info(cfg: Config, env: DistEnv, device: torch.device, plan: BatchPlan, params: int) -> dict:
    """What W&B records once per run: the resolved config and where and how it ran."""
    import os
    import subprocess

    import yaml

    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    return {
        **yaml.safe_load(to_yaml(cfg)),
        "model_params": params,
        "global_batch": plan.global_batch,
        "grad_accum": plan.grad_accum,
        "world_size": env.world_size,
        "git_rev": rev or "unknown",
        "hardware": {
            "device": device.type,
            "gpu": torch.cuda.get_device_name(device) if gpus else None,
            "gpus_per_node": gpus,
            "cpu_count": os.cpu_count(),
        },
        "torch": torch.__version__,
    }
