"""Everything a run needs, built from the config in dependency order, in one place: the loaders,
the engine, the components around the loop (tracking and its sinks, early stopping, the stop
consensus, batch augmentation, the EMA, the profiler), what validation evaluates, and the
checkpoints. The loop (distres.trainer.loop) calls them and knows none of their options."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from distres.checkpoint import CheckpointStore
from distres.components.profiling import StepProfiler
from distres.components.sample_log import SampleLog
from distres.components.stopping import EarlyStopping, StopConsensus
from distres.components.tracking import Sinks, Tracker, run_info, tensorboard_problem, wandb_mode
from distres.config import BatchPlan, Config, ConfigError
from distres.data import build_loaders
from distres.data.augment import BatchAugment, spec_from_config
from distres.data.build import host_threads
from distres.dist import DistEnv, from_main
from distres.engine import build_engine
from distres.errors import USAGE, DataError
from distres.precision import autocast, set_tf32
from distres.results.evaluation import EvalTarget
from distres.trainer.hooks import Hooks
from distres.trainer.loop import Trainer
from distres.trainer.state import DataPosition, LossWindow, TrainState, seed_everything

log = logging.getLogger("distres")


def checkpoint_root(cfg: Config, run_dir: Path) -> Path:
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"


def build(
    cfg: Config,
    env: DistEnv,
    device: torch.device,
    plan: BatchPlan,
    run_dir: Path,
    fresh: bool = True,
    hooks: Hooks | None = None,
) -> Trainer:
    """fresh: no checkpoint to resume from (model.init_from applies only then)."""
    if cfg.tracking.tensorboard and (problem := tensorboard_problem()):
        raise ConfigError(problem)
    threads = cfg.run.threads or host_threads(cfg, device, env.local_world_size)
    if threads:
        torch.set_num_threads(threads)
    seed_everything(cfg.run.seed, cfg.run.deterministic)
    set_tf32(device, cfg.train.tf32)
    try:
        train_data, val_data = build_loaders(
            cfg, device, env.rank, env.world_size, env.local_world_size
        )
    except DataError as e:  # found before training: a usage error (exit 2), not a failure
        raise e.with_exit_code(USAGE) from None
    steps_per_epoch = len(train_data) // plan.grad_accum
    if steps_per_epoch == 0:
        raise ConfigError(
            f"train.batch_size={plan.micro_batch} x grad_accum={plan.grad_accum} is more "
            f"than the {train_data.num_samples()} training samples each of "
            f"{env.world_size} rank(s) reads per epoch"
        )
    total_steps = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)

    engine = build_engine(cfg, env, device, plan, steps_per_epoch, fresh)
    early_stopping = EarlyStopping(cfg.early_stop)
    tracker = Tracker(
        run_dir,
        cfg.tracking.progress,
        total_steps,
        cfg.train.epochs,
        cfg.tracking.log_every,
        enabled=env.is_main,
        sinks=sinks(cfg, env, device, plan),
    )
    state, window = TrainState(), LossWindow(device)
    if cfg.data.aug_repeats > env.world_size and env.is_main:
        log.warning(
            f"WARNING: data.aug_repeats={cfg.data.aug_repeats} on {env.world_size} rank(s): "
            "some repeats of a sample land on the same rank (and in the same batch norm "
            "statistics); repeated augmentation is meant for aug_repeats <= world size"
        )
    spec = spec_from_config(cfg)
    trainer = Trainer(
        cfg=cfg,
        env=env,
        device=device,
        plan=plan,
        run_dir=run_dir,
        train_data=train_data,
        val_data=val_data,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        engine=engine,
        early_stopping=early_stopping,
        consensus=StopConsensus(device),
        tracker=tracker,
        state=state,
        window=window,
        data=DataPosition(train_data, state, steps_per_epoch, plan.grad_accum),
        augment=BatchAugment(spec, cfg.run.seed, env.rank, device) if spec.enabled else None,
        profiler=(
            StepProfiler(cfg.tracking.profile_steps, run_dir, env.rank, device)
            if cfg.tracking.profile_steps
            else None
        ),
        hooks=hooks or Hooks(),
        sample_log=(
            SampleLog(run_dir, env.rank, env.world_size, from_main(time.time(), env))
            if cfg.tracking.sample_log
            else None
        ),
        **targets(cfg, env, device, plan, engine),
    )
    trainer.attach_checkpoints(store(cfg, env, run_dir, early_stopping.mode))
    return trainer


def sinks(cfg: Config, env: DistEnv, device: torch.device, plan: BatchPlan) -> Sinks:
    t = cfg.tracking
    return Sinks(
        wandb=wandb_mode(t.wandb) if env.is_main else None,
        project=t.wandb_project,
        entity=t.wandb_entity,
        name=cfg.run.name,
        info=lambda params: run_info(cfg, env, device, plan, params),
        tensorboard=env.is_main and t.tensorboard,
    )


def targets(cfg: Config, env: DistEnv, device: torch.device, plan: BatchPlan, engine) -> dict:
    """What validation evaluates (the weights; their EMA beside them with train.ema_decay),
    which of them final/ holds (checkpoint.final_weights), and the EMA's parts in the run:
    its update after each step, its tensors in the checkpoint, its line at the start."""
    e = engine
    weights = EvalTarget(e.module, e.autocast, e.input_dtype, "val", e.sync_buffers,
                         e.full_state_dict)  # fmt: skip
    if cfg.train.ema_decay <= 0:
        return {"targets": [weights], "final": weights}
    from distres.components.ema import WeightEma

    ema = WeightEma(engine.module, cfg, env)
    amp = engine.amp_dtype
    # the EMA in fp32 under the run's autocast (DeepSpeed's module may be half)
    averaged = EvalTarget(ema.module, lambda: autocast(device, amp), None, "val_ema",
                          ema.sync_buffers, ema.state_dict)  # fmt: skip
    return {
        "targets": [weights, averaged],
        "final": averaged if cfg.checkpoint.final_weights == "ema" else weights,
        "step_hooks": [lambda s: ema.update(s.step, s.samples_seen, plan.global_batch)],
        "tensor_parts": {"ema": ema},
        "notes": [ema.horizon(plan.global_batch)],
    }


def store(cfg: Config, env: DistEnv, run_dir: Path, mode: str) -> CheckpointStore | None:
    if not cfg.checkpoint.enabled:
        return None
    return CheckpointStore(
        checkpoint_root(cfg, run_dir),
        rank=env.rank,
        world_size=env.world_size,
        keep_last=cfg.checkpoint.keep_last,
        keep_best=cfg.checkpoint.keep_best,
        mode=mode,
        async_save=cfg.checkpoint.async_save,
    )
