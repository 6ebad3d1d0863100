"""`python -m distres.train [--config configs/NAME.yaml] [section.key=value ...]`"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from distres.config import Config, ConfigError, help_text, load_config, save_config

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m distres.train",
        description="Train a ResNet. With no arguments: ResNet-20 on the built-in digits set.",
        epilog="config keys (section.key=default  doc):\n" + help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML preset, e.g. configs/resnet50_imagenet.yaml")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    return parser.parse_args(argv)


def resolve_run_dir(cfg: Config) -> Path:
    if not cfg.run.dir:
        cfg.run.dir = f"runs/{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.run.dir)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"distres: config error: {e}", file=sys.stderr)
        return EXIT_USAGE

    # Heavy imports after the config is known to be good: a bad config fails in a blink.
    from distres.data.shards import ShardError
    from distres.data.torch_loader import DataError
    from distres.dist import pick_device, process_group, read_env
    from distres.loop import Trainer

    env = read_env()
    run_dir = resolve_run_dir(cfg)
    device = pick_device(cfg.run.device, env.local_rank)
    with process_group(env, device):
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / "config.yaml")
        try:
            summary = Trainer(cfg, run_dir, env, device).fit()
        except (ShardError, DataError) as e:
            print(f"distres: data error: {e}", file=sys.stderr)
            return EXIT_USAGE if isinstance(e, ShardError) else EXIT_FAILED
    if env.is_main:
        top1 = summary["final_val_top1"]
        print(
            f"final val top-1 {top1:.4f} (best {summary['best_val_top1']:.4f}) after "
            f"{summary['steps']} steps in {summary['wall_s']:.1f} s; stop: "
            f"{summary['stop_reason']}; outputs in {run_dir}"
            if top1 is not None
            else f"stopped ({summary['stop_reason']}) after {summary['steps']} steps; "
            f"outputs in {run_dir}"
        )
    return EXIT_OK if summary["stop_reason"] in ("completed", "early_stop") else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
