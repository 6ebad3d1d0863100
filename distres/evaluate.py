"""Validation metrics from sums, so a distributed evaluation is exact (issue: no padding)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager

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


def main(argv: list[str] | None = None) -> int:
    """`python -m distres.evaluate --checkpoint PATH [section.key=value ...]`: top-1, top-5 and
    loss of a checkpoint on a validation set; one process, or every rank under torchrun."""
    import argparse
    import json
    import sys
    import tempfile
    from pathlib import Path

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
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
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
        metrics = _evaluate_checkpoint(cfg, path, args.trust_checkpoint)
    except ckpt.CheckpointError as e:
        print(f"distres.evaluate: {e}", file=sys.stderr)
        return 5
    except ConfigError as e:
        print(f"distres.evaluate: config error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"distres.evaluate: data error: {e}", file=sys.stderr)
        return 1
    if metrics is not None:
        recorded = meta["state"].get("train", {}).get("last_eval", {})
        same_step = recorded.get("step") == meta["step"]
        print(json.dumps({"checkpoint": str(path), "step": meta["step"], **metrics}))
        if same_step:
            print(f"recorded at training time: val/top1 {recorded['val/top1']:.4f}")
    return 0


def _evaluate_checkpoint(cfg, path, trust: bool = False) -> dict[str, float] | None:
    """Every rank evaluates its part of the val set; rank 0 gets the metrics."""
    from distres.data import build_loaders
    from distres.dist import pick_device, process_group, read_env
    from distres.export import checkpoint_weights
    from distres.models import build_model
    from distres.precision import autocast, resolve_precision

    env = read_env()
    device = pick_device(cfg.run.device, env.local_rank)
    with process_group(env, device):
        weights, model_cfg, _ = checkpoint_weights(path, trust)
        model = build_model(model_cfg)
        model.load_state_dict(weights)
        model = model.to(device, memory_format=torch.channels_last)
        train, val = build_loaders(cfg, device, env.rank, env.world_size, env.local_world_size)
        train.close()
        amp = resolve_precision(cfg.train.precision, device)
        metrics = evaluate(model, val, device, lambda: autocast(device, amp))
        val.close()
    return metrics if env.is_main else None


if __name__ == "__main__":
    from distres.log import exit_process

    exit_process(main())
