"""The trainer: build (components in dependency order), state (the checkpointed parts),
resume (which checkpoint, and the batch plan for it), loop (the Trainer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from distres.config import BatchPlan, Config
from distres.dist import DistEnv


def run(
    cfg: Config, env: DistEnv, device: torch.device, plan: BatchPlan, run_dir: Path
) -> dict[str, Any]:
    """One run on this rank: find the checkpoint to continue from (and keep its global
    batch on this world size), build everything, train; the summary."""
    from distres.trainer.build import build, checkpoint_root
    from distres.trainer.resume import find_checkpoint, replan

    found = find_checkpoint(cfg, env, checkpoint_root(cfg, run_dir))
    if found is not None:
        plan = replan(plan, found[1])
    return build(cfg, env, device, plan, run_dir, fresh=found is None).fit(found)
