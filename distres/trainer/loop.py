"""The training loop: restore, then optimizer steps with one boundary policy after each
(log / close the epoch and evaluate / agree on a stop / checkpoint, each at its cadence),
then finish (final evaluation, checkpoint, weights, ledger, summary). The components it calls
are built by distres.trainer.build; it knows none of their options."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from distres.artifacts.final import save_inference_info, save_weights
from distres.checkpoint import CheckpointStore
from distres.checkpoint.manager import CheckpointManager
from distres.checkpoint.store import at_failpoint
from distres.components.profiling import StepProfiler, mark, table
from distres.components.sample_log import SampleLog
from distres.components.stopping import EarlyStopping, StopConsensus
from distres.components.tracking import Tracker
from distres.config import BatchPlan, Config
from distres.data.api import Batch, Loader
from distres.data.augment import BatchAugment
from distres.dist import DistEnv
from distres.engine.base import Engine
from distres.errors import DistresError
from distres.results.evaluation import EvalTarget
from distres.trainer import records
from distres.trainer.hooks import Hooks
from distres.trainer.resume import same_layout, shard_change
from distres.trainer.state import DataPosition, LossWindow, TrainState, checkpoint_header, run_parts

log = logging.getLogger("distres")


@dataclasses.dataclass(eq=False)
class Trainer:
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
    # what validation evaluates (the weights, then their EMA), and which one final/ holds
    targets: list[EvalTarget] = dataclasses.field(default_factory=list)
    final: EvalTarget | None = None
    # after each optimizer step, in order (the EMA's update)
    step_hooks: list[Callable[[TrainState], None]] = dataclasses.field(default_factory=list)
    tensor_parts: dict[str, Any] = dataclasses.field(default_factory=dict)  # the EMA
    notes: list[str] = dataclasses.field(default_factory=list)  # printed at the start
    # color jitter, random erasing, mixup/cutmix on the device (None: none of them is on);
    # its draws are functions of the step, so the checkpoint's step is all its state
    augment: BatchAugment | None = None
    profiler: StepProfiler | None = None  # tracking.profile_steps
    sample_log: SampleLog | None = None  # tracking.sample_log
    hooks: Hooks = dataclasses.field(default_factory=Hooks)
    checkpoints: CheckpointManager | None = None  # attach_checkpoints; None: off
    clock: Callable[[], float] = time.monotonic  # checkpoint.every_minutes (a test's fake)
    last_save_at: float = 0.0

    def __post_init__(self) -> None:
        if not self.targets:
            e = self.engine
            self.targets = [EvalTarget(e.module, e.autocast, e.input_dtype, "val",
                                       e.sync_buffers, e.full_state_dict)]  # fmt: skip
        self.final = self.final or self.targets[0]
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
            summary = self.finish(reason or "completed", time.perf_counter() - t0)
        finally:
            self.consensus.restore_signal_handlers()
        self.hooks.after_fit(self, summary)
        return summary

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
        if self.sample_log is not None:
            micro_batches = self.sample_log.take(s.step + 1, s.epoch, micro_batches)
        if self.augment is not None:
            micro_batches = self.augment(micro_batches, s.step)
        loss = self.hooks.after_step(self, self.engine.train_step(micro_batches, grad_norm=logs))
        self.window.add(loss)
        self.consensus.note_loss(loss)
        s.step += 1
        s.epoch_step += 1
        s.samples_seen += self.plan.global_batch
        for hook in self.step_hooks:
            hook(s)
        if self.profiler is not None:
            self.report_profile(self.profiler.after(s.step))
        self.tracker.step(s.step, s.epoch)

    def boundary(self) -> str | None:
        """After every optimizer step, each at its cadence: log; at an epoch's end, evaluate;
        agree on a stop (the one place a stop reason is decided); checkpoint."""
        s, cfg = self.state, self.cfg
        last = s.step >= self.total_steps
        if s.step % cfg.tracking.log_every == 0 or last:
            self.tracker.log(records.train_record(self))
        check = s.step % self.stop_check_every == 0 or last
        epoch_end = s.epoch_step == self.steps_per_epoch
        if epoch_end:
            s.epoch, s.epoch_step = s.epoch + 1, 0
            if not last and s.epoch % cfg.train.eval_every_epochs == 0:
                with self.window.paused():
                    self.validate()
                check = True  # an early-stop decision travels through the consensus
        reason, timed = None, False
        if at_failpoint("stop", s.step, self.env.rank):
            self.consensus.signal, check = signal.SIGTERM, True
        if check:
            # one all-reduce: the stop flags, whether any rank's async write still runs, and
            # whether any rank's clock says a checkpoint is due (the ranks' clocks differ)
            reason = self.consensus.agree(busy=self.checkpoints.busy(),
                                          checkpoint_due=self.clock_due())  # fmt: skip
            timed = self.consensus.checkpoint_due
            if not self.consensus.peers_busy:
                self.checkpoints.commit()  # every rank's part is on disk
        if reason is None and last:
            reason = "completed"
        if reason is None and (timed or self.checkpoint_due(epoch_end)):
            with self.window.paused():
                self.save_checkpoint()
        return reason

    @property
    def stop_check_every(self) -> int:
        """train.stop_check_every, 0 resolved: each check reads the all-reduce's result, a
        host sync that drains the GPU's queue, so a GPU checks every 25 steps."""
        return self.cfg.train.stop_check_every or (25 if self.device.type == "cuda" else 1)

    def clock_due(self) -> bool:
        """checkpoint.every_minutes: this rank's clock says a checkpoint is due."""
        minutes = self.cfg.checkpoint.every_minutes
        return bool(minutes) and self.clock() - self.last_save_at >= 60 * minutes

    def checkpoint_due(self, epoch_end: bool) -> bool:
        ck, s = self.cfg.checkpoint, self.state
        if epoch_end:
            return bool(ck.every_epochs) and s.epoch % ck.every_epochs == 0
        return bool(ck.every_steps) and s.step % ck.every_steps == 0

    # -- start and finish -----------------------------------------------------------------
    def start(self) -> None:
        self.last_save_at = self.clock()  # every_minutes counts from the start
        self.tracker.open(self.state, self.engine.num_params)
        self.tracker.print(records.start_line(self))
        for note in self.notes:
            self.tracker.print(note)
        self.tracker.start(self.state.step)
        self.engine.train()

    def finish(self, reason: str, wall_s: float) -> dict[str, Any]:
        """Everything after the last step, one concern a line; the summary."""
        poisoned = reason == "non_finite_loss"  # the weights are not worth keeping
        if self.profiler is not None:  # a window the run stopped in (or never reached)
            self.report_profile(self.profiler.after(self.state.step, force=True))
        # training's input is done: a pipeline prefetched for an epoch that will not run
        # gives its GPU memory back before the last evaluation (the position was kept)
        self.train_data.close()
        if self.sample_log is not None:
            self.sample_log.close()
        unevaluated = not poisoned and self.state.last_eval.get("step") != self.state.step
        # A stop by a signal or Ctrl-C is checkpointed before the evaluation below: that
        # averages the ranks' BN buffers (EvalTarget.prepare), which a run never stopped does
        # not do at this step, so the resumed run would not be the same run.
        first = reason in ("preempted", "interrupted")
        if first:
            self.final_checkpoint(save=True)
        if unevaluated:
            # Stopped mid-epoch: the summary still reports this step's accuracy. It is not an
            # evaluation early stopping counts (a preempted run would count one more).
            self.validate(count=False)
        if not first:
            self.final_checkpoint(save=not poisoned)
        self.val_data.close()
        if (line := records.stop_line(reason, self.state, self.early_stopping)) is not None:
            self.tracker.print(line)
        self.tracker.close()
        self.write_final_weights()
        if self.cfg.tracking.ledger and not poisoned:
            self.write_ledger()
        summary = records.summary(self, reason, wall_s)
        self.tracker.summary(summary)
        if self.env.is_main and self.cfg.tracking.plots:
            self.plot_curves()
        self.tracker.finish(failed=poisoned)
        return summary

    def plot_curves(self) -> None:
        from distres.results.report import plot_curves

        try:
            plot_curves(self.run_dir)
        except OSError as e:  # a picture (WriteError too): the run's outcome stands
            self.tracker.print(f"tracking.plots: not drawn ({e})")

    def final_checkpoint(self, save: bool) -> None:
        """checkpoint.on_stop: the stop step (not after a non-finite loss: the last good
        checkpoint stays "latest"); then the last async write is committed."""
        if self.checkpoints.enabled:
            if save and self.cfg.checkpoint.on_stop:
                self.save_checkpoint()
            self.checkpoints.close()

    def write_final_weights(self) -> None:
        """final/: the weights checkpoint.final_weights names (a collective under ZeRO-3)."""
        if not self.cfg.checkpoint.save_final:
            return
        if self.final.prepare is not None:
            self.final.prepare()
        weights = self.final.weights()
        if self.env.is_main:
            final = self.run_dir / "final"
            try:
                save_weights(weights, self.cfg.model, final)
                save_inference_info(final, self.cfg, self.train_data.shards.classes)
            except OSError as e:  # WriteError too: the run has completed, its checkpoints stand
                self.tracker.print(f"final weights: not written ({e})")

    def write_ledger(self) -> None:
        """tracking.ledger: every val sample's row for the weights final/ holds, the
        per-class table and pictures (and into W&B)."""
        from distres.results.ledger import write_run_ledger

        info = {"checkpoint": None, "step": self.state.step, "ema": self.final.prefix != "val"}
        try:
            result = write_run_ledger(self.final, self.cfg, self.env, self.device,
                                      self.run_dir, info)  # fmt: skip
        except (OSError, DistresError) as e:  # every rank raises it (the ledger agrees on
            # its outcome): the run has completed, its ledger is what failed
            self.tracker.print(f"tracking.ledger: not written ({e})")
            return
        if result is not None:
            self.tracker.ledger(result, self.state.step)

    def report_profile(self, record: dict[str, Any] | None) -> None:
        if record is not None:
            self.tracker.log(record)
            self.tracker.print(table(record))

    # -- checkpoints ----------------------------------------------------------------------
    def attach_checkpoints(self, store: CheckpointStore | None) -> None:
        """Checkpoints of this run's parts (distres.trainer.state.PARTS) in `store` (None:
        checkpoints off)."""
        specs, parts = run_parts(self)
        header = lambda: checkpoint_header(self)  # noqa: E731
        self.checkpoints = CheckpointManager(store, self.engine, specs, parts, header)

    def save_checkpoint(self) -> None:
        t0 = time.perf_counter()
        self.last_save_at = self.clock()
        path = self.checkpoints.save(self.state.step, records.metric(self))
        if path is None:
            return
        how = "staged (writing in the background)" if self.cfg.checkpoint.async_save else "saved"
        self.tracker.print(
            f"checkpoint {how}: {path} (step {self.state.step}, {time.perf_counter() - t0:.2f} s)"
        )

    def restore(self, path: Path, meta: dict) -> None:
        change = shard_change(self.cfg, path, meta, self.train_data)
        same = same_layout(meta, self.env, self.plan)
        self.checkpoints.load(path, meta, self.env.rank, same, skip=("data",) if change else ())
        s = self.state
        if change:  # data.allow_shard_change: the epoch restarts on the new set
            s.epoch_step = 0
            log.warning(
                f"WARNING: {change}; data.allow_shard_change=true: epoch {s.epoch} restarts "
                f"at its beginning on the new set (step {s.step} so far)"
            )
        if self.env.is_main:
            self.tracker.truncate_after(s.step)
        self.tracker.log(records.resume_record(self, path, meta))
        log.info(records.resume_line(self, path, meta))
        self.hooks.after_restore(self)

    def validate(self, count: bool = True) -> dict[str, float]:
        s, metrics = self.state, {}
        for target in self.targets:
            self.val_data.set_epoch(s.epoch)
            metrics.update(target.evaluate(self.val_data, self.device))
        self.engine.train()
        s.best_top1 = max(s.best_top1, metrics["val/top1"])
        s.last_eval = {**metrics, "step": s.step}
        self.tracker.log(records.eval_record(self, metrics))
        # Metrics are all-reduced, so every rank reaches the same decision; it still travels
        # through the consensus so there is one path to a stop.
        if count and self.early_stopping.update(metrics, s.step):
            self.consensus.early_stop = True
        return metrics
