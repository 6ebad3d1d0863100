"""Early stopping on a monitored validation metric, with state for checkpoints."""

from __future__ import annotations

import math
import os
import signal

import torch
import torch.distributed as dist

from distres.config import EarlyStopConfig


class EarlyStopping:
    """Counts evaluations without an improvement larger than min_delta; patience 0 is off."""

    def __init__(self, cfg: EarlyStopConfig):
        self.monitor, self.mode = cfg.monitor, cfg.resolved_mode
        self.patience, self.min_delta = cfg.patience, cfg.min_delta
        self.best = -math.inf if self.mode == "max" else math.inf
        self.best_step = -1
        self.bad_evals = 0

    def improved(self, value: float) -> bool:
        if self.mode == "max":
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    def update(self, metrics: dict[str, float], step: int) -> bool:
        """Record one evaluation; True when training should stop."""
        value = metrics[self.monitor]
        if self.improved(value):
            self.best, self.best_step, self.bad_evals = value, step, 0
        else:
            self.bad_evals += 1
        return self.patience > 0 and self.bad_evals >= self.patience

    def state_dict(self) -> dict:
        return {
            "best": self.best,
            "best_step": self.best_step,
            "bad_evals": self.bad_evals,
            "monitor": self.monitor,
            "mode": self.mode,
        }

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_step = state["best"], state["best_step"]
        self.bad_evals = state["bad_evals"]

    @staticmethod
    def check_state(state: object) -> str | None:
        """Why a saved state would not load, or None."""
        if not isinstance(state, dict):
            return "not a mapping"
        for key in ("best", "best_step", "bad_evals"):
            if isinstance(state.get(key), bool) or not isinstance(state.get(key), int | float):
                return f"{key}={state.get(key)!r}"
        return None


STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)  # a scheduler's warning: preempted, requeue


class StopConsensus:
    """One stop decision per step boundary, shared by every rank.

    The stop flags travel in one small all-reduce (MAX): an early-stop decision, a stop
    request from a scheduler's signal (SIGUSR1, SIGTERM) or from Ctrl-C (SIGINT; the handlers
    only set a Python flag), a non-finite loss, and a checkpoint due by the wall clock
    (checkpoint.every_minutes: each rank's own clock, so any rank's says so for all). The loss
    flag is set on the device with no host sync; the only sync is the all-reduce's result,
    read once per check. Every rank calls agree() at the same step boundaries, so every rank
    leaves the loop at the same step.
    """

    REASONS = ("non_finite_loss", "preempted", "interrupted", "early_stop")  # by priority

    def __init__(self, device: torch.device):
        self.device = device
        self.non_finite = torch.zeros((), device=device)
        self.early_stop = False
        self.signal: int | None = None
        self.interrupted = False
        self.peers_busy = False
        self.checkpoint_due = False  # set by agree(): some rank's clock says a save is due
        self._previous: dict[int, object] = {}
        self._main = True

    def install_signal_handlers(self) -> None:
        from distres.dist import read_env

        self._main = read_env().is_main  # who says what a Ctrl-C does (one line, not N)
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_interrupt)

    def restore_signal_handlers(self) -> None:
        """The handlers from before the run; after a stop for a signal, stop signals are
        ignored instead: the same warning often arrives twice (Slurm's `scancel --full`
        reaches every rank, and the batch script's trap sends it again), and the default
        action of a late repeat would kill a rank that is on its way out with exit code 3.
        SIGINT gets its previous handler back either way (Python's KeyboardInterrupt)."""
        for sig, handler in self._previous.items():
            if sig == signal.SIGINT or self.signal is None:
                signal.signal(sig, handler)
            else:
                signal.signal(sig, signal.SIG_IGN)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signal = signum

    def _on_interrupt(self, signum: int, frame: object) -> None:
        """Ctrl-C: the first stops every rank at the next step boundary with a checkpoint
        (as a scheduler's signal does). A second one is the kernel's: SIGINT's default action
        ends the process at once, even a rank blocked in a collective or a device wait,
        where no Python handler would run."""
        self.interrupted = True
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if self._main:
            # os.write, not print: a handler runs between any two bytecodes, and print would
            # re-enter a stderr write the main thread may be in the middle of
            os.write(2, b"Ctrl-C: stopping every rank at the next step with a checkpoint "
                        b"(Ctrl-C again to exit at once)\n")  # fmt: skip

    def note_loss(self, loss: torch.Tensor) -> None:
        self.non_finite = torch.maximum(self.non_finite, (~torch.isfinite(loss)).float())

    def agree(self, busy: bool = False, checkpoint_due: bool = False) -> str | None:
        """All-reduce the flags (when distributed); the agreed stop reason, or None.

        `busy` rides along: this rank's async checkpoint write is still running. After the
        call, peers_busy says whether any rank's was, so a commit waits for none of them, and
        checkpoint_due whether any rank's clock says a checkpoint is due.
        """
        # Host values go in as scalar fills (kernel arguments): torch.tensor(x, device=cuda)
        # would be a blocking copy from pageable memory (pytorch issue 120996).
        flags = torch.empty(6, device=self.device)
        flags[0] = self.non_finite
        flags[1] = float(self.signal is not None)
        flags[2] = float(self.interrupted)
        flags[3] = float(self.early_stop)
        flags[4] = float(busy)
        flags[5] = float(checkpoint_due)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        *stops, busy_anywhere, due_anywhere = flags.tolist()
        self.peers_busy = bool(busy_anywhere)
        self.checkpoint_due = bool(due_anywhere)
        for reason, raised in zip(self.REASONS, stops, strict=True):
            if raised:
                return reason
        return None
