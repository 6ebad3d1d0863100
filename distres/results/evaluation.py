"""Evaluation: metrics from sums, so a distributed evaluation is exact (no padding, each
sample once), of an EvalTarget (a model with its autocast and input dtype: the weights, or
their EMA) or of a checkpoint."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from distres.data.api import Batch


@dataclasses.dataclass
class EvalTarget:
    """What an evaluation runs: a model, the autocast it runs under, the dtype its input is
    cast to (a DeepSpeed half module), and `prefix` for its metrics (val, val_ema). The
    trainer's weights are one, their EMA another; `prepare` brings the model's buffers to
    one state on every rank first; `weights` gives what final/ holds when it is chosen."""

    model: nn.Module
    autocast: Callable[[], AbstractContextManager]
    input_dtype: torch.dtype | None = None
    prefix: str = "val"
    prepare: Callable[[], None] | None = None
    weights: Callable[[], dict] | None = None  # its state_dict for final/ (ZeRO-3: a collective)

    def evaluate(self, batches: Iterable[Batch], device: torch.device) -> dict[str, float]:
        if self.prepare is not None:
            self.prepare()
        metrics = evaluate(self.model, batches, device, self.autocast, self.input_dtype)
        return {k.replace("val/", f"{self.prefix}/", 1): v for k, v in metrics.items()}


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


def evaluate_checkpoint(
    cfgs: list,
    path,
    trust: bool = False,
    ema: bool = False,
    tta: str = "none",
    split: str = "val",
    ledger_dir: Path | None = None,
) -> list[dict] | None:
    """Every rank evaluates its part of the split, once per config (size); rank 0 gets the
    metrics. ledger_dir: also every sample's row (distres.results.ledger), written there by
    rank 0."""
    from distres.artifacts.consolidate import checkpoint_weights
    from distres.data import build_eval_loader
    from distres.dist import pick_device, process_group, read_env
    from distres.models import build_model
    from distres.precision import autocast, resolve_precision
    from distres.results import ledger

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
