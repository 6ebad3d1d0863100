"""Validation metrics from sums, so a distributed evaluation is exact (issue: no padding)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from distres.data.api import Batch


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)):
    """Number of samples whose label is among the top-k logits, for each k (tensors)."""
    k_max = min(max(ks), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices
    hit = top == labels[:, None]
    return [hit[:, : min(k, k_max)].any(dim=1).sum() for k in ks]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    device: torch.device,
    autocast: Callable[[], AbstractContextManager],
    input_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """val/loss, val/top1, val/top5 over every sample all ranks hold, plus val/samples.

    input_dtype: cast the images first (a DeepSpeed bf16/fp16 module holds half weights)."""
    was_training = model.training
    model.eval()
    # loss sum, top-1 hits, top-5 hits: accumulated on the device, one sync at the end; the
    # sample count on the host (a device tensor made from it per batch would be a host copy)
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    count = 0
    for images, labels in batches:
        if input_dtype is not None:
            images = images.to(input_dtype)
        with autocast():
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        top1, top5 = topk_correct(logits, labels)
        sums[:3] += torch.stack([loss.double(), top1.double(), top5.double()])
        count += len(labels)
    sums[3] = float(count)  # a scalar fill, no copy
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    model.train(was_training)
    loss, top1, top5, n = sums.tolist()
    if n == 0:
        raise RuntimeError("validation set is empty")
    return {"val/loss": loss / n, "val/top1": top1 / n, "val/top5": top5 / n, "val/samples": int(n)}


class FlipTTA(nn.Module):
    """Test-time augmentation: the mean of the probabilities of an image and its mirror image,
    returned as log-probabilities (a cross-entropy of them is the loss of the mean)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.model(x).float().log_softmax(1)
        b = self.model(x.flip(3)).float().log_softmax(1)
        return torch.logaddexp(a, b) - math.log(2)


def resize_for(val_size: int, val_resize: int, size: int) -> int:
    """The resize that keeps the run's crop ratio (val_size / val_resize, e.g. 224 / 256) at
    another evaluation size; 0 stays 0 (a centre crop alone)."""
    return round(size * val_resize / val_size) if val_resize else 0


def main(argv: list[str] | None = None) -> int:
    """`python -m distres.evaluate --checkpoint PATH [section.key=value ...]`: top-1, top-5 and
    loss of a checkpoint on a validation set; one process, or every rank under torchrun.
    --sizes evaluates at several resolutions (one table; the crop ratio kept), --tta flip adds
    the mirror image, --ema takes the EMA of the weights, --write-best records the best size in
    the run's final/inference.json (what distres.predict uses). --ledger writes every sample's
    predictions and loss (distres.ledger), the per-class table and two pictures; --split train
    evaluates the training set with the validation transform (its highest-loss samples are the
    mislabelled candidates)."""
    import argparse
    import json
    import sys
    import tempfile

    from distres import checkpoint as ckpt
    from distres.config import ConfigError, load_config
    from distres.data.api import DataError

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
        found = ckpt.find_resume(Path(args.checkpoint), args.checkpoint)
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
        results = _evaluate_checkpoint(
            cfgs, path, args.trust_checkpoint, args.ema, args.tta, args.split, out
        )
        if results is not None and args.write_best is not None:
            final = Path(args.write_best) if args.write_best else Path(cfg.run.dir) / "final"
            best = write_best(final, cfgs, results)
    except ckpt.CheckpointError as e:
        print(f"distres.evaluate: {e}", file=sys.stderr)
        return 5
    except ConfigError as e:
        print(f"distres.evaluate: config error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"distres.evaluate: data error: {e}", file=sys.stderr)
        return 1
    except WriteBestError as e:
        print(f"distres.evaluate: --write-best: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the ledger's directory: not writable, a file in the way, full
        print(f"distres.evaluate: --ledger: {e}", file=sys.stderr)
        return 2
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


def run_dir_of(checkpoint: Path, cfg) -> Path:
    """The run directory a checkpoint belongs to: <run>/checkpoints/step-N, wherever the run
    has moved since, else (checkpoint.dir elsewhere) the run.dir its config names."""
    run = Path(checkpoint).resolve().parent.parent
    return run if (run / "metrics.jsonl").is_file() else Path(cfg.run.dir)


class WriteBestError(ValueError):
    """inference.json that --write-best cannot update; the message names it."""


def write_best(final: Path, cfgs: list, results: list[dict]) -> Path:
    """Record the best evaluation size (and its resize) in `final`/inference.json."""
    import json
    import os

    from distres.export import INFERENCE

    path = final / INFERENCE
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise WriteBestError(
            f"{path}: missing (a run with checkpoint.save_final=true writes it)"
        ) from None
    except (OSError, ValueError) as e:
        raise WriteBestError(f"{path}: unreadable ({e})") from None
    if not isinstance(info, dict):
        raise WriteBestError(f"{path}: not a JSON object")
    index = max(
        range(len(results)), key=lambda i: (results[i]["val/top1"], -cfgs[i].data.eval_size)
    )
    info["image_size"] = cfgs[index].data.eval_size
    info["resize"] = cfgs[index].data.val_resize
    info["sizes_evaluated"] = {
        str(c.data.eval_size): round(m["val/top1"], 6) for c, m in zip(cfgs, results, strict=True)
    }
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(info, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def print_ledger(path: str, pictures: dict[str, str]) -> None:
    """Where the ledger went, and the classes it finds worst."""
    from distres import ledger

    summary, _ = ledger.read(path)
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


def _evaluate_checkpoint(
    cfgs: list,
    path,
    trust: bool = False,
    ema: bool = False,
    tta: str = "none",
    split: str = "val",
    ledger_dir: Path | None = None,
) -> list[dict] | None:
    """Every rank evaluates its part of the split, once per config (size); rank 0 gets the
    metrics. ledger_dir: also every sample's row (distres.ledger), written there by rank 0."""
    from distres import ledger
    from distres.data import build_eval_loader
    from distres.dist import pick_device, process_group, read_env
    from distres.export import checkpoint_weights
    from distres.models import build_model
    from distres.precision import autocast, resolve_precision

    cfg = cfgs[0]
    env = read_env()
    device = pick_device(cfg.run.device, env.local_rank)
    results = []
    with process_group(env, device):
        weights, model_cfg, _ = checkpoint_weights(path, trust, ema)
        model = build_model(model_cfg)
        model.load_state_dict(weights)
        model = model.to(device, memory_format=torch.channels_last)
        if tta == "flip":
            model = FlipTTA(model)
        amp = resolve_precision(cfg.train.precision, device)
        for c in cfgs:
            data = build_eval_loader(
                c,
                device,
                env.rank,
                env.world_size,
                env.local_world_size,
                split,
                ledger_dir is not None,
            )
            if ledger_dir is None:
                results.append(evaluate(model, data, device, lambda: autocast(device, amp)))
            else:
                info = {"checkpoint": str(path), "ema": ema, "tta": tta}
                results.append(
                    ledger.write_ledger(
                        model, data, c, ledger_dir, split, lambda: autocast(device, amp), info
                    )
                )
            data.close()
    return results if env.is_main else None


if __name__ == "__main__":
    from distres.log import exit_process

    exit_process(main())
