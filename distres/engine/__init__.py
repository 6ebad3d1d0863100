"""Training engines behind one small interface; the config's engine.name picks one.

An engine owns the wrapped model, the optimizer, the LR schedule and the precision policy. The
loop hands it the micro-batches of one optimizer step and gets the step's mean loss back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from distres.config import BatchPlan, Config
    from distres.dist import DistEnv
    from distres.engine.ddp import DDPEngine
    from distres.engine.deepspeed import DeepSpeedEngine


def build_engine(
    cfg: Config, env: DistEnv, device: torch.device, plan: BatchPlan, steps_per_epoch: int
) -> DDPEngine | DeepSpeedEngine:
    if cfg.engine.name == "deepspeed":
        from distres.engine.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(cfg, env, device, plan, steps_per_epoch)
    from distres.engine.ddp import DDPEngine

    return DDPEngine(cfg, env, device, plan, steps_per_epoch)
