"""The trainer's one seam for code outside it (tests injecting faults, a user's probes): three
moments, each a no-op unless a hook says otherwise. Pass `hooks=` to distres.trainer.run.

    class NaNAt(Hooks):
        def after_step(self, trainer, loss):
            return loss * float("nan") if trainer.state.step + 1 == 7 else loss
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from distres.trainer.loop import Trainer


class Hooks:
    def after_step(self, trainer: Trainer, loss: torch.Tensor) -> torch.Tensor:
        """After an optimizer step's backward and update, before the loss is counted; the
        loss the run counts (and checks for being finite)."""
        return loss

    def after_restore(self, trainer: Trainer) -> None:
        """After every part of a checkpoint is loaded."""

    def after_fit(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        """After the run has finished, every output written."""
