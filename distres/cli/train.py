"""`python -m distres.train [--config configs/NAME.yaml] [section.key=value ...]`

Exit codes: distres.errors (0 completed or stopped early, 1 failed, 2 bad config or data found
before training, 3 preempted, 4 non-finite loss, 5 a checkpoint that cannot be used, 7 a write
that failed, 8 the run directory is another live run's, 130 interrupted by Ctrl-C).
"""

from __future__ import annotations

import argparse
import sys

from distres import errors
from distres.config import help_text, load_config

PROG = "distres"


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        # Heavy imports after the config is known to be good: a bad config fails in a blink.
        from distres.trainer import run

        summary = run(cfg)
    except errors.DistresError as e:
        return errors.report(PROG, e)
    except OSError as e:  # a file nobody anticipated (unreadable, vanished)
        return errors.report(PROG, errors.from_os_error(e))
    except KeyboardInterrupt:  # before the training loop's handler, or after it
        print(f"{PROG}: interrupted (Ctrl-C) outside training: nothing to checkpoint",
              file=sys.stderr)  # fmt: skip
        return errors.INTERRUPTED
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
    return errors.STOP_CODES.get(summary["stop_reason"], errors.FAILED)


def _is_main() -> bool:
    from distres.dist import read_env

    return read_env().is_main
