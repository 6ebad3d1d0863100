"""`python -m distres.evaluate --checkpoint PATH [section.key=value ...]`: see main()."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from distres import errors
from distres.artifacts.final import record_best_size
from distres.artifacts.layout import run_dir_of
from distres.results.evaluation import evaluate_checkpoint, resize_for
from distres.trainer.state import PARTS

PROG = "distres.evaluate"


def main(argv: list[str] | None = None) -> int:
    """`python -m distres.evaluate --checkpoint PATH [section.key=value ...]`: top-1, top-5 and
    loss of a checkpoint on a validation set; one process, or every rank under torchrun.
    --sizes evaluates at several resolutions (one table; the crop ratio kept), --tta flip adds
    the mirror image, --ema takes the EMA of the weights, --write-best records the best size in
    the run's final/inference.json (what distres.predict uses). --ledger writes every sample's
    predictions and loss (distres.results.ledger), the per-class table and two pictures;
    --split train evaluates the training set with the validation transform (its highest-loss
    samples are the mislabelled candidates)."""
    from distres import checkpoint as ckpt
    from distres.config import load_config

    parser = argparse.ArgumentParser(prog="python -m distres.evaluate", description=main.__doc__)
    parser.add_argument("--checkpoint", required=True, help="a step-N checkpoint or a dir of them")
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="DeepSpeed checkpoints: load with DeepSpeed's full unpickler (only for "
        "checkpoints you wrote)",
    )
    parser.add_argument(
        "--sizes",
        help="evaluation sizes, e.g. 160,192,224,256,288 (FixRes: a model trained at 176 is "
        "best evaluated larger); each keeps the run's val_resize / val_size ratio",
    )
    parser.add_argument("--tta", choices=("none", "flip"), default="none", help="test-time aug.")
    parser.add_argument("--ema", action="store_true", help="the EMA of the weights")
    parser.add_argument(
        "--write-best",
        nargs="?",
        const="",
        default=None,
        metavar="FINAL_DIR",
        help="with --sizes: write the best size (by val/top1) into FINAL_DIR/inference.json "
        "(default: the run's final/), so that distres.predict uses it",
    )
    parser.add_argument(
        "--split", choices=("val", "train"), default="val", help="which shard set to evaluate"
    )
    parser.add_argument(
        "--ledger",
        action="store_true",
        help="write OUT/ledger/SPLIT.jsonl (every sample: shard, key, label, top-5, loss), "
        "SPLIT.json (metrics, per-class table) and OUT/plots/{confusion,hardest}_SPLIT.png",
    )
    parser.add_argument(
        "--out", help="--ledger's directory (default: the run directory the checkpoint is in)"
    )
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    if args.ledger and args.sizes is not None:
        parser.error("--ledger evaluates one size: drop --sizes (set data.val_size=N instead)")
    if args.out is not None and not args.ledger:
        parser.error("--out is where --ledger writes: add --ledger")
    sizes: list[int] = []
    if args.sizes is not None:
        try:
            sizes = [int(x) for x in args.sizes.split(",")]
        except ValueError:
            parser.error(f"--sizes {args.sizes}: expected sizes in pixels, e.g. 160,224,288")
        if not sizes or min(sizes) < 8 or len(set(sizes)) != len(sizes):
            parser.error(f"--sizes {args.sizes}: distinct sizes of at least 8 pixels")
    if args.write_best is not None and not sizes:
        parser.error("--write-best needs --sizes")
    try:
        # the run's parts declared: a format-1 checkpoint's train state is read too
        check = lambda path: ckpt.validate(path, PARTS)  # noqa: E731
        found = ckpt.find_resume(Path(args.checkpoint), args.checkpoint, check)
        if found is None:
            raise ckpt.CheckpointError(f"{args.checkpoint}: no complete checkpoint")
        path, meta = found
        # The run's own config (data set, sizes, precision), then the overrides.
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
            f.write(meta["config"])
            f.flush()
            cfg = load_config(f.name, args.overrides)
            cfgs = [cfg]
            if sizes:
                d = cfg.data
                cfgs = [
                    load_config(
                        f.name,
                        [
                            *args.overrides,
                            f"data.val_size={size}",
                            f"data.val_resize={resize_for(d.eval_size, d.val_resize, size)}",
                        ],
                    )
                    for size in sizes
                ]
        out = None
        if args.ledger:
            out = Path(args.out) if args.out else run_dir_of(path, cfg)
        results = evaluate_checkpoint(
            cfgs, path, args.trust_checkpoint, args.ema, args.tta, args.split, out
        )
        if results is not None and args.write_best is not None:
            final = Path(args.write_best) if args.write_best else Path(cfg.run.dir) / "final"
            sizes = [(c.data.eval_size, c.data.val_resize) for c in cfgs]
            best = record_best_size(final, sizes, [m["val/top1"] for m in results])
    except errors.DistresError as e:
        return errors.report(PROG, e)
    except OSError as e:  # a file nobody anticipated (unreadable, vanished)
        return errors.report(PROG, errors.from_os_error(e))
    if results is None:  # not rank 0
        return 0
    head = {"checkpoint": str(path), "step": meta["step"], "tta": args.tta, "ema": args.ema}
    if args.split != "val":
        head["split"] = args.split
    if not sizes:
        metrics = results[0]
        if args.split != "val":  # train/top1 here is not training's (augmented) accuracy
            metrics = {k.replace("val/", f"{args.split}/", 1): v for k, v in metrics.items()}
        print(json.dumps({**head, **metrics}))
        if args.ledger:
            print_ledger(metrics.pop("ledger"), metrics.pop("pictures"))
        recorded = meta["state"].get("train", {}).get("last_eval", {})
        plain = not (args.ema or args.tta != "none" or args.split != "val")
        if recorded.get("step") == meta["step"] and plain:
            print(f"recorded at training time: val/top1 {recorded['val/top1']:.4f}")
        return 0
    rows = [
        {"size": c.data.eval_size, "resize": c.data.val_resize, **m}
        for c, m in zip(cfgs, results, strict=True)
    ]
    top = max(rows, key=lambda r: (r["val/top1"], -r["size"]))
    print(json.dumps({**head, "sizes": rows, "best": top["size"]}))
    print(f"{'size':>6} {'resize':>6} {'top1':>8} {'top5':>8} {'loss':>8}")
    for r in rows:
        mark = "  <- best" if r is top else ""
        print(
            f"{r['size']:>6} {r['resize'] or '-':>6} {r['val/top1']:>8.4f} {r['val/top5']:>8.4f} "
            f"{r['val/loss']:>8.4f}{mark}"
        )
    if args.write_best is not None:
        print(f"{best}: image_size {top['size']}, resize {top['resize']}")
    return 0


def print_ledger(path: str, pictures: dict[str, str]) -> None:
    """Where the ledger went, and the classes it finds worst."""
    from distres.results import ledger

    summary = ledger.read_summary(path)
    worst = sorted(
        (r for r in summary["per_class"] if r["support"]),
        key=lambda r: (r["top1"], -r["support"]),
    )[:5]
    print(f"ledger: {path} ({summary['metrics']['samples']} samples)")
    print(
        "worst classes (top-1, support): "
        + ", ".join(f"{r['name']} {r['top1']:.3f} ({r['support']})" for r in worst)
    )
    for name, picture in pictures.items():
        print(f"{name}: {picture}")
