"""`python -m distres.data.shards --src SRC --out DIR` writes an ImageFolder tree or a
path,label list as WebDataset shards (distres.data.shards.write); `python -m
distres.data.shards index SHARDS` indexes existing shards in place (distres.data.shards.index)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distres import errors
from distres.data.shards.index import index_shards
from distres.data.shards.manifest import MANIFEST
from distres.data.shards.write import build_shard_set, parse_size

PROG = "distres.data.shards"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["index"]:
        return index_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m distres.data.shards",
        description="Write an ImageFolder tree or a path,label list as WebDataset shards with "
        "DALI index files and a manifest (run once for train, once for val).",
    )
    parser.add_argument("--src", required=True, help="ImageFolder root, or a .csv/.tsv list")
    parser.add_argument(
        "--out",
        required=True,
        help="output directory for this split, or a bucket prefix (s3://bucket/train, gs://)",
    )
    parser.add_argument("--shard-size", default="512MB", help="upper bound per shard (512MB)")
    parser.add_argument(
        "--prefix",
        default=None,
        help="shard name prefix (default: --out's folder name, e.g. train)",
    )
    parser.add_argument("--workers", type=int, default=0, help="encoding processes (0: all cores)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality for re-encoding")
    parser.add_argument(
        "--max-side",
        type=int,
        default=0,
        help="re-encode images whose longer side exceeds this many pixels at that size "
        "(FFCV's max_resolution; 0: keep every size)",
    )
    parser.add_argument(
        "--allow-empty-classes",
        action="store_true",
        help="keep a class folder without images as a class with no samples",
    )
    args = parser.parse_args(argv)
    try:
        size = parse_size(args.shard_size)
        manifest = build_shard_set(
            args.src,
            args.out,
            size,
            prefix=args.prefix or args.out.rstrip("/").rsplit("/", 1)[-1],
            workers=args.workers,
            quality=args.quality,
            progress=sys.stderr.isatty(),
            allow_empty_classes=args.allow_empty_classes,
            max_side=args.max_side,
        )
    except errors.DistresError as e:
        return errors.report(PROG, e)
    except OSError as e:  # a file nobody anticipated (unreadable, vanished)
        return errors.report(PROG, errors.from_os_error(e))
    except ValueError as e:  # --shard-size
        print(f"{PROG}: {e}", file=sys.stderr)
        return errors.USAGE
    print(
        f"{manifest['num_samples']} samples in {len(manifest['shards'])} shards, "
        f"{len(manifest['classes'])} classes, {manifest['num_skipped']} skipped -> "
        f"{args.out.rstrip('/')}/{MANIFEST}"
    )
    return 0


def index_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m distres.data.shards index",
        description="Index existing WebDataset shards in place: manifest.json and DALI index "
        "files beside them (the tars are not rewritten).",
    )
    parser.add_argument("shards", help="a directory of tars, a brace pattern, or a tar")
    parser.add_argument("--out", help="where manifest.json goes (default: the tars' directory)")
    parser.add_argument("--force", action="store_true", help="replace an existing manifest")
    args = parser.parse_args(argv)
    try:
        manifest = index_shards(args.shards, Path(args.out) if args.out else None, args.force)
    except errors.DistresError as e:
        return errors.report(f"{PROG} index", e)
    except OSError as e:  # a file nobody anticipated (unreadable, vanished)
        return errors.report(f"{PROG} index", errors.from_os_error(e))
    print(
        f"{manifest['num_samples']} samples in {len(manifest['shards'])} shards, "
        f"{len(manifest['classes'])} classes -> manifest.json"
    )
    return 0
