"""The trainer: build (components in dependency order), state (the checkpointed parts),
resume (which checkpoint, and the batch plan for it), loop (the Trainer), records (what it
logs and prints)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from distres.config import Config
from distres.trainer.hooks import Hooks


def resolve_run_dir(cfg: Config) -> Path:
    if not cfg.run.dir:
        cfg.run.dir = f"runs/{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.run.dir)


def run(cfg: Config, hooks: Hooks | None = None) -> dict[str, Any]:
    """Train on this process's rank (read from the launcher's environment); the summary.
    Checks the machine first (preflight), before any process group exists; finds the
    checkpoint to continue from (keeping its global batch on this world size), builds
    everything, trains."""
    from distres.artifacts import layout
    from distres.artifacts.lock import RunDirLock
    from distres.config import plan_batch, save_config
    from distres.dist import from_main, pick_device, process_group, read_env, shared_run_dir
    from distres.errors import WriteError
    from distres.log import setup_logging
    from distres.preflight import preflight
    from distres.trainer.build import build, checkpoint_root
    from distres.trainer.resume import find_checkpoint, keep_streams, replan

    env = read_env()
    setup_logging(env.is_main)
    preflight(cfg)
    plan = plan_batch(cfg, env.world_size)  # a ConfigError here: no process group yet
    device = pick_device(cfg.run.device, env.local_rank)
    with process_group(env, device, always=cfg.engine.name == "deepspeed",
                       timeout_s=cfg.engine.collective_timeout_s):  # fmt: skip
        # Every rank must write to the same run.dir: rank 0's timestamp wins.
        run_dir = shared_run_dir(resolve_run_dir(cfg), env)
        cfg.run.dir = str(run_dir)
        with RunDirLock(run_dir, env):
            problem = None
            if env.is_main:
                try:
                    save_config(cfg, run_dir / layout.CONFIG)
                except WriteError as e:
                    problem = str(e)
            if (problem := from_main(problem, env)) is not None:  # every rank stops with it
                raise WriteError(problem)
            found = find_checkpoint(cfg, env, checkpoint_root(cfg, run_dir))
            if found is not None:
                plan = replan(cfg, plan, found[1])
                keep_streams(cfg, *found)
            trainer = build(cfg, env, device, plan, run_dir, fresh=found is None, hooks=hooks)
            return trainer.fit(found)
