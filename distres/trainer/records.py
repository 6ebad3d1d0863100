"""What the trainer writes down and says: its metrics.jsonl records (train, eval, resume), the
lines it prints (start, stop, resume), the summary at the end, and the monitored metric for
the best checkpoint. Functions of the trainer's state; the trainer decides when."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from distres.components.stopping import EarlyStopping
    from distres.trainer.loop import Trainer
    from distres.trainer.state import TrainState


def start_line(t: Trainer) -> str:
    cfg, plan = t.cfg, t.plan
    return (
        f"{cfg.model.name} ({t.engine.num_params / 1e6:.2f}M params) on {t.device}, "
        f"world size {t.env.world_size}, global batch {plan.global_batch} = "
        f"{plan.micro_batch} x {plan.grad_accum} accum x {t.env.world_size} ranks, lr "
        f"{t.engine.lr:.4g}, {t.steps_per_epoch} steps/epoch x {cfg.train.epochs} "
        f"epochs, precision {t.engine.amp_dtype or torch.float32}; run dir {t.run_dir}"
    )


def train_record(t: Trainer) -> dict[str, Any]:
    """The log interval's record: loss, lr, throughput, input wait, skipped samples (a
    collective when distributed), memory on a GPU. Drains the loss window."""
    s = t.state
    wait = t.window.data_wait
    mean_loss, steps, elapsed = t.window.drain()
    record = {
        "event": "train",
        "step": s.step,
        "epoch": s.epoch,
        "samples": s.samples_seen,
        "lr": t.engine.current_lr(),
        "train/loss": mean_loss,
        "img_per_s": steps * t.plan.global_batch / max(elapsed, 1e-9),
        "step_time_s": elapsed / max(1, steps),
        # time the loop waited for input / wall time (host clock; on a GPU the wait
        # also absorbs queued kernels, so it reads high when the GPU is the bottleneck)
        "data_wait_frac": min(1.0, wait / max(elapsed, 1e-9)),
        "data/skipped": skipped_samples(t),
        "image_size": t.cfg.data.train_size(s.epoch),
    }
    norm = t.engine.last_grad_norm
    if norm is not None:
        record["grad_norm"] = float(norm)
    if t.device.type == "cuda":
        record["gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated(t.device) / 2**30
        torch.cuda.reset_peak_memory_stats(t.device)
        # torch's allocator only; the device's own count also holds DALI's pools, NCCL's
        # buffers, the CUDA context (and any other process on the GPU)
        free, total = torch.cuda.mem_get_info(t.device)
        record["gpu_mem_device_gib"] = (total - free) / 2**30
    return record


def skipped_samples(t: Trainer) -> int:
    """Bad samples skipped so far on all ranks (data.on_bad_sample=skip); log steps only."""
    count = t.train_data.skipped + t.val_data.skipped
    if not t.env.distributed:
        return count
    total = torch.tensor([count], dtype=torch.int64, device=t.device)
    torch.distributed.all_reduce(total)
    return int(total.item())


def eval_record(t: Trainer, metrics: dict[str, float]) -> dict[str, Any]:
    s = t.state
    return {
        "event": "eval",
        "step": s.step,
        "epoch": max(0, s.epoch - 1),
        "samples": s.samples_seen,
        "lr": t.engine.current_lr(),
        **metrics,
    }


def resume_record(t: Trainer, path: Path, meta: dict) -> dict[str, Any]:
    """Where the history resumed: [before, now] where the layout changed."""
    s, layout = t.state, meta["layout"]
    return {
        "event": "resume",
        "step": s.step,
        "epoch": s.epoch,
        "samples": s.samples_seen,
        "checkpoint": str(path),
        "world_size": [layout["world_size"], t.env.world_size],
        "grad_accum": [layout["grad_accum"], t.plan.grad_accum],
    }


def resume_line(t: Trainer, path: Path, meta: dict) -> str:
    s = t.state
    return (
        f"resumed from {path}: step {s.step}, epoch {s.epoch + 1} "
        f"(step {s.epoch_step} of {t.steps_per_epoch}), {s.samples_seen} samples "
        f"seen; written by {meta['layout']['world_size']} rank(s), now {t.env.world_size}"
    )


def stop_line(reason: str, s: TrainState, es: EarlyStopping) -> str | None:
    if reason == "early_stop":
        return (
            f"early stop at step {s.step}: {es.monitor} has not improved "
            f"on {es.best:.4f} for {es.patience} evaluations"
        )
    if reason == "preempted":
        return f"stop requested by a signal; all ranks stopped at step {s.step}"
    if reason == "interrupted":
        return (
            f"interrupted (Ctrl-C); all ranks stopped at step {s.step} with a checkpoint: "
            "the same command resumes from it"
        )
    if reason == "non_finite_loss":
        return f"non-finite training loss on at least one rank; all ranks stopped at step {s.step}"
    return None


def metric(t: Trainer) -> float | None:
    """The monitored metric, when this step was evaluated (for the best checkpoint)."""
    last = t.state.last_eval
    return last.get(t.early_stopping.monitor) if last.get("step") == t.state.step else None


def summary(t: Trainer, reason: str, wall_s: float) -> dict[str, Any]:
    """summary.json: how the run ended, its last evaluation (each target's top-1), its size."""
    s = t.state
    others = {
        f"final_{target.prefix}_top1": s.last_eval.get(f"{target.prefix}/top1")
        for target in t.targets
        if target.prefix != "val"
    }
    return {
        "stop_reason": reason,
        "final_val_top1": s.last_eval.get("val/top1"),
        "final_val_top5": s.last_eval.get("val/top5"),
        "final_val_loss": s.last_eval.get("val/loss"),
        "best_val_top1": s.best_top1 if s.best_top1 > -math.inf else None,
        **others,
        "steps": s.step,
        "epochs": s.epoch,
        "samples_seen": s.samples_seen,
        "global_batch": t.plan.global_batch,
        "grad_accum": t.plan.grad_accum,
        "world_size": t.env.world_size,
        "model": t.cfg.model.name,
        "params": t.engine.num_params,
        "wall_s": round(wall_s, 3),
    }
