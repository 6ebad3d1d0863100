"""What a run reports besides its checkpoints: train records, stop lines, the profile's
table and the ledger at the end. A part of the Trainer (distres.trainer.loop) kept apart
from the loop itself."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from distres.precision import autocast

if TYPE_CHECKING:
    from distres.trainer.loop import Trainer


class Reports:
    """The Trainer's reporting methods (mixed into it)."""

    def write_ledger(self: Trainer) -> None:
        """tracking.ledger: every val sample's row for the weights final/ holds (the EMA with
        checkpoint.final_weights=ema), the per-class table and pictures, into W&B too."""
        from distres.data import build_eval_loader
        from distres.results.ledger import write_ledger

        cfg, env, device = self.cfg, self.env, self.device
        data = build_eval_loader(
            cfg, device, env.rank, env.world_size, env.local_world_size, "val", keys=True
        )
        ema = cfg.checkpoint.final_weights == "ema"
        if ema:
            amp = self.engine.amp_dtype
            model, cast, dtype = self.ema.module, lambda: autocast(device, amp), None
        else:
            model, cast = self.engine.module, self.engine.autocast
            dtype = self.engine.input_dtype
        info = {"checkpoint": None, "step": self.state.step, "ema": ema, "tta": "none"}
        try:
            result = write_ledger(model, data, cfg, self.run_dir, "val", cast, info, dtype)
        except OSError as e:  # rank 0's files (a full disk): the run itself has completed
            self.tracker.print(f"tracking.ledger: not written ({e})")
            result = None
        finally:
            data.close()
        if result is not None:
            self.tracker.ledger(result, self.state.step)

    def report_profile(self: Trainer, record: dict[str, Any] | None) -> None:
        if record is not None:
            from distres.components.profiling import table

            self.tracker.log(record)
            self.tracker.print(table(record))

    def report_stop(self: Trainer, reason: str) -> None:
        s, es = self.state, self.early_stopping
        if reason == "early_stop":
            self.tracker.print(
                f"early stop at step {s.step}: {es.monitor} has not improved "
                f"on {es.best:.4f} for {es.patience} evaluations"
            )
        elif reason == "preempted":
            self.tracker.print(f"stop requested by a signal; all ranks stopped at step {s.step}")
        elif reason == "non_finite_loss":
            self.tracker.print(
                f"non-finite training loss on at least one rank; all ranks stopped at step {s.step}"
            )

    def log_train(self: Trainer) -> None:
        s = self.state
        wait = self.window.data_wait
        mean_loss, steps, elapsed = self.window.drain()
        record = {
            "event": "train",
            "step": s.step,
            "epoch": s.epoch,
            "samples": s.samples_seen,
            "lr": self.engine.current_lr(),
            "train/loss": mean_loss,
            "img_per_s": steps * self.plan.global_batch / max(elapsed, 1e-9),
            "step_time_s": elapsed / max(1, steps),
            # time the loop waited for input / wall time (host clock; on a GPU the wait
            # also absorbs queued kernels, so it reads high when the GPU is the bottleneck)
            "data_wait_frac": min(1.0, wait / max(elapsed, 1e-9)),
            "data/skipped": self.skipped_samples(),
            "image_size": self.cfg.data.train_size(s.epoch),
        }
        norm = self.engine.last_grad_norm
        if norm is not None:
            record["grad_norm"] = float(norm)
        if self.device.type == "cuda":
            record["gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
            # torch's allocator only; the device's own count also holds DALI's pools, NCCL's
            # buffers, the CUDA context (and any other process on the GPU)
            free, total = torch.cuda.mem_get_info(self.device)
            record["gpu_mem_device_gib"] = (total - free) / 2**30
        self.tracker.log(record)

    def skipped_samples(self: Trainer) -> int:
        """Bad samples skipped so far on all ranks (data.on_bad_sample=skip); log steps only."""
        count = self.train_data.skipped + self.val_data.skipped
        if not self.env.distributed:
            return count
        total = torch.tensor([count], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(total)
        return int(total.item())
