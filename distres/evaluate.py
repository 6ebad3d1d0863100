"""Validation metrics from sums, so a distributed evaluation is exact (issue: no padding)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from distres.data.batch import Batch


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
    # loss sum, top-1 hits, top-5 hits, samples: accumulated on the device, one sync at the end.
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    for images, labels in batches:
        if input_dtype is not None:
            images = images.to(input_dtype)
        with autocast():
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        top1, top5 = topk_correct(logits, labels)
        sums += torch.stack(
            [
                loss.double(),
                top1.double(),
                top5.double(),
                torch.tensor(len(labels), dtype=torch.float64, device=device),
            ]
        )
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    model.train(was_training)
    loss, top1, top5, n = sums.tolist()
    if n == 0:
        raise RuntimeError("validation set is empty")
    return {"val/loss": loss / n, "val/top1": top1 / n, "val/top5": top5 / n, "val/samples": int(n)}
