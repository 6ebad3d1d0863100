"""Everything a run needs, built from the config in dependency order, in one place."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from distres.checkpoint import CheckpointStore
from distres.config import BatchPlan, Config, ConfigError
from distres.data import build_loaders
from distres.data.batch_augment import BatchAugment, spec_from_config
from distres.data.loaders import host_threads
from distres.dist import DistEnv
from distres.engine import build_engine
from distres.precision import set_tf32
from distres.profiling import StepProfiler
from distres.stopping import EarlyStopping, StopConsensus
from distres.tracking import Tracker, tensorboard_problem
from distres.trainer.loop import Trainer
from distres.trainer.state import (
    DataPosition,
    LossWindow,
    TrainState,
    seed_everything,
)

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
) -> Trainer:
    """fresh: no checkpoint to resume from (model.init_from applies only then)."""
    if cfg.tracking.tensorboard and (problem := tensorboard_problem()):
        raise ConfigError(problem)
    threads = cfg.run.threads or host_threads(cfg, device, env.local_world_size)
    if threads:
        torch.set_num_threads(threads)
    seed_everything(cfg.run.seed, cfg.run.deterministic)
    set_tf32(device, cfg.train.tf32)

    train_data, val_data = build_loaders(
        cfg, device, env.rank, env.world_size, env.local_world_size
    )
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
    )
    state, window = TrainState(), LossWindow(device)
    data = DataPosition(train_data, state, steps_per_epoch, plan.grad_accum)
    store = None
    if cfg.checkpoint.enabled:
        store = CheckpointStore(
            checkpoint_root(cfg, run_dir),
            rank=env.rank,
            world_size=env.world_size,
            keep_last=cfg.checkpoint.keep_last,
            keep_best=cfg.checkpoint.keep_best,
            mode=early_stopping.mode,
            async_save=cfg.checkpoint.async_save,
        )
    if cfg.data.aug_repeats > env.world_size and env.is_main:
        log.warning(
            f"WARNING: data.aug_repeats={cfg.data.aug_repeats} on {env.world_size} rank(s): "
            "some repeats of a sample land on the same rank (and in the same batch norm "
            "statistics); repeated augmentation is meant for aug_repeats <= world size"
        )
    spec = spec_from_config(cfg)
    augment = BatchAugment(spec, cfg.run.seed, env.rank, device) if spec.enabled else None
    ema = None
    if cfg.train.ema_decay > 0:
        from distres.ema import WeightEma

        ema = WeightEma(engine.module, cfg, env)
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
        data=data,
        augment=augment,
        ema=ema,
        profiler=(
            StepProfiler(cfg.tracking.profile_steps, run_dir, env.rank, device)
            if cfg.tracking.profile_steps
            else None
        ),
    )
    trainer.attach_checkpoints(store)
    return trainer
