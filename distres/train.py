"""`python -m distres.train [--config configs/NAME.yaml] [section.key=value ...]`

Exit codes: 0 completed or stopped early; 1 failed (an error, or bad data mid-run);
2 bad config or data found before training; 3 preempted (SIGUSR1/SIGTERM: every rank stopped
at the same step, so the job may be requeued); 4 non-finite loss; 5 a checkpoint that cannot
be used (the one checkpoint.resume=PATH names, or a damaged one).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from distres.config import Config, ConfigError, help_text, load_config, plan_batch, save_config

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PREEMPTED, EXIT_NON_FINITE = 0, 1, 2, 3, 4
EXIT_CHECKPOINT = 5
EXIT_CODES = {
    "completed": EXIT_OK,
    "early_stop": EXIT_OK,
    "preempted": EXIT_PREEMPTED,
    "non_finite_loss": EXIT_NON_FINITE,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m distres.train",
        description="Train a ResNet. With no arguments: ResNet-20 on the built-in digits set.",
        epilog="config keys (section.key=default  doc):\n" + help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML preset, e.g. configs/resnet50_imagenet.yaml")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    # DeepSpeed's launcher appends --local_rank=N; the rank comes from the environment anyway.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def resolve_run_dir(cfg: Config) -> Path:
    if not cfg.run.dir:
        cfg.run.dir = f"runs/{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.run.dir)


def run(cfg: Config) -> dict[str, Any]:
    """Train on this process's rank (read from the launcher's environment); the summary.
    Checks the machine first (preflight), before any process group exists."""
    from distres.dist import pick_device, process_group, read_env, shared_run_dir
    from distres.log import setup_logging
    from distres.preflight import preflight
    from distres.trainer import run as run_trainer

    env = read_env()
    setup_logging(env.is_main)
    preflight(cfg)
    plan = plan_batch(cfg, env.world_size)  # a ConfigError here: no process group yet
    device = pick_device(cfg.run.device, env.local_rank)
    with process_group(env, device, always=cfg.engine.name == "deepspeed"):
        # Every rank must write to the same run.dir: rank 0's timestamp wins.
        run_dir = shared_run_dir(resolve_run_dir(cfg), env)
        cfg.run.dir = str(run_dir)
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / "config.yaml")
        return run_trainer(cfg, env, device, plan, run_dir)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        # Heavy imports after the config is known to be good: a bad config fails in a blink.
        from distres.checkpoint import CheckpointError
        from distres.data.api import DataError
        from distres.data.shardset import ShardError

        summary = run(cfg)
    except ConfigError as e:  # first: the names below are imported only after the config
        print(f"distres: config error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except CheckpointError as e:
        print(f"distres: checkpoint error: {e}", file=sys.stderr)
        return EXIT_CHECKPOINT
    except ShardError as e:
        print(f"distres: data error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except DataError as e:
        print(f"distres: data error: {e}", file=sys.stderr)
        return EXIT_FAILED
    top1 = summary["final_val_top1"]
    if _is_main():
        print(
            f"final val top-1 {top1:.4f} (best {summary['best_val_top1']:.4f}) after "
            f"{summary['steps']} steps in {summary['wall_s']:.1f} s; stop: "
            f"{summary['stop_reason']}; outputs in {cfg.run.dir}"
            if top1 is not None
            else f"stopped ({summary['stop_reason']}) after {summary['steps']} steps; "
            f"outputs in {cfg.run.dir}",
            flush=True,
        )
    return EXIT_CODES.get(summary["stop_reason"], EXIT_FAILED)


def _is_main() -> bool:
    from distres.dist import read_env

    return read_env().is_main


if __name__ == "__main__":
    from distres.log import exit_process

    exit_process(main())
