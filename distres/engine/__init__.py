"""Training engines behind one contract (base.Engine); the config's engine.name picks one:
ddp (DDP, or the bare model on one process) or deepspeed (ZeRO 0-3)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from distres.config import BatchPlan, Config
    from distres.dist import DistEnv
    from distres.engine.ddp import DDPEngine
    from distres.engine.deepspeed import DeepSpeedEngine


def build_engine(
    cfg: Config,
    env: DistEnv,
    device: torch.device,
    plan: BatchPlan,
    steps_per_epoch: int,
    fresh: bool = True,
) -> DDPEngine | DeepSpeedEngine:
    """fresh: a fresh start, not a resume (model.init_from applies only then)."""
    if cfg.engine.name == "deepspeed":
        from distres.engine.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(cfg, env, device, plan, steps_per_epoch, fresh)
    from distres.engine.ddp import DDPEngine

    return DDPEngine(cfg, env, device, plan, steps_per_epoch, fresh)
