"""Early stopping on a monitored validation metric, with state for checkpoints."""

from __future__ import annotations

import math

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
