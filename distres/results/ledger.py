"""The per-sample ledger: every sample's shard, key, label, top-5 predictions with their
probabilities, and loss.

Each rank evaluates its part of a split (every sample exactly once over all ranks, as the
validation does) with a loader that yields each sample's SampleKey; rank 0 gathers the parts
and writes them in the shard set's order (shards as the manifest lists them, samples in tar
order), so the ledger has the same rows in the same order on any world size. Written as
<dir>/ledger/<split>.jsonl (one JSON object per sample: pandas.read_json(lines=True) reads
it) and <split>.json (what was evaluated, the split's metrics, and the per-class table,
distres.results.per_class).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from distres.data.api import KeyedBatch, SampleKey, class_names
from distres.errors import USAGE, DistresError
from distres.io import atomic_write, write_json

LEDGER_DIR = "ledger"
TOP_K = 5


class LedgerError(DistresError, ValueError):
    """A ledger file that cannot be read; the message names it."""

    exit_code, label = USAGE, "ledger error"


@torch.no_grad()
def collect(
    model: nn.Module,
    batches: Iterable[KeyedBatch],
    autocast: Callable[[], AbstractContextManager],
    input_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """This rank's rows: keys, labels, top-k classes and probabilities, and per-sample loss
    (numpy arrays, on the host). The model's outputs are logits or log-probabilities (FlipTTA):
    log_softmax takes either to log-probabilities."""
    was_training = model.training
    model.eval()
    keys: list[SampleKey] = []
    labels, tops, probs, losses = [], [], [], []
    for images, y, batch_keys in batches:
        if input_dtype is not None:
            images = images.to(input_dtype)
        with autocast():
            logits = model(images)
        logp = logits.float().log_softmax(1)
        k = min(TOP_K, logp.shape[1])
        top = logp.topk(k, dim=1)
        # kept on the device until the end: one copy to the host, not one per batch
        labels.append(y)
        tops.append(top.indices)
        probs.append(top.values.exp())
        losses.append(F.nll_loss(logp, y, reduction="none"))
        keys.extend(batch_keys)
    model.train(was_training)
    if not keys:
        return {"keys": [], **_empty()}
    return {
        "keys": keys,
        "label": torch.cat(labels).cpu().numpy(),
        "top": torch.cat(tops).cpu().numpy(),
        "prob": torch.cat(probs).cpu().numpy(),
        "loss": torch.cat(losses).cpu().numpy(),
    }


def _empty() -> dict[str, np.ndarray]:
    """A rank with no sample of the split (more ranks than samples); gather leaves it out."""
    k = TOP_K
    return {
        "label": np.zeros(0, np.int64),
        "top": np.zeros((0, k), np.int64),
        "prob": np.zeros((0, k), np.float32),
        "loss": np.zeros(0, np.float32),
    }


def gather(part: dict[str, Any]) -> dict[str, Any] | None:
    """Every rank's rows on rank 0, merged in the shard set's order (None on other ranks).
    One gather_object of numpy arrays and keys (pickled between this job's own ranks)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(part, parts, dst=0)
        if parts is None:
            return None
    else:
        parts = [part]
    parts = [p for p in parts if len(p["keys"])] or parts[:1]
    keys = [k for p in parts for k in p["keys"]]
    merged = {
        name: np.concatenate([p[name] for p in parts]) for name in ("label", "top", "prob", "loss")
    }
    order = sorted(range(len(keys)), key=lambda i: (keys[i].shard, keys[i].at))
    return {"keys": [keys[i] for i in order], **{n: a[order] for n, a in merged.items()}}


def metrics(rows: dict[str, Any]) -> dict[str, float]:
    """loss, top-1 and top-5 of the rows (what distres.evaluate reports for the split)."""
    n = len(rows["label"])
    if n == 0:
        from distres.data.api import DataError

        raise DataError("the split has no usable sample: no ledger to write")
    hit = rows["top"] == rows["label"][:, None]
    return {
        "loss": float(rows["loss"].astype(np.float64).sum() / n),
        "top1": float(hit[:, 0].sum() / n),
        "top5": float(hit[:, :TOP_K].any(axis=1).sum() / n),
        "samples": n,
    }


def _short(x: float) -> float:
    return float(f"{x:.7g}")  # float32's precision, not float64's 17 digits


def write(
    rows: dict[str, Any],
    out_dir: str | os.PathLike,
    split: str,
    urls: tuple[str, ...],
    info: dict[str, Any],
) -> Path:
    """<out_dir>/ledger/<split>.jsonl (atomically) and <split>.json (info, metrics and the
    per-class table); returns the .jsonl path."""
    from distres.results.per_class import per_class

    path = Path(out_dir) / LEDGER_DIR / f"{split}.jsonl"
    lines = []
    for i, key in enumerate(rows["keys"]):
        record = {
            "shard": urls[key.shard],
            "key": key.key,
            "label": int(rows["label"][i]),
            "top5": rows["top"][i].tolist(),
            "prob": [_short(p) for p in rows["prob"][i].tolist()],
            "loss": _short(float(rows["loss"][i])),
        }
        lines.append(json.dumps(record) + "\n")
    atomic_write(path, "".join(lines))
    summary = {
        **info,
        "split": split,
        "rows": path.name,
        "metrics": metrics(rows),
        "per_class": per_class(rows["label"], rows["top"], rows["loss"], info["classes"]),
    }
    write_json(path.with_suffix(".json"), summary, indent=1)
    return path


def table(rows: dict[str, Any], urls: tuple[str, ...]) -> dict[str, Any]:
    """Gathered rows in the form `read` returns (shard paths and keys as lists)."""
    return {
        "shard": [urls[k.shard] for k in rows["keys"]],
        "key": [k.key for k in rows["keys"]],
        **{n: rows[n] for n in ("label", "top", "prob", "loss")},
    }


def read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """A ledger written by `write`: (its summary, its rows as arrays with shard and key
    lists). LedgerError naming the file otherwise."""
    path = Path(path)
    side = path.with_suffix(".json")
    try:
        summary = json.loads(side.read_text())
        lines = path.read_text().splitlines()
    except FileNotFoundError as e:
        raise LedgerError(f"{e.filename}: missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise LedgerError(f"{side}: unreadable ({e})") from None
    shard, key, label, top, prob, loss = [], [], [], [], [], []
    for n, line in enumerate(lines, 1):
        try:
            r = json.loads(line)
            shard.append(str(r["shard"]))
            key.append(str(r["key"]))
            label.append(int(r["label"]))
            top.append([int(c) for c in r["top5"]])
            prob.append([float(p) for p in r["prob"]])
            loss.append(float(r["loss"]))
        except (ValueError, KeyError, TypeError) as e:
            raise LedgerError(f"{path}: line {n} is not a ledger row ({e!r})") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("classes"), list):
        raise LedgerError(f"{side}: not a ledger summary (no class list)")
    try:
        arrays = {
            "label": np.asarray(label, np.int64),
            "top": np.asarray(top, np.int64).reshape(len(label), -1),
            "prob": np.asarray(prob, np.float32).reshape(len(label), -1),
            "loss": np.asarray(loss, np.float32),
        }
    except ValueError as e:  # ragged top-k lists
        raise LedgerError(f"{path}: rows of different lengths ({e})") from None
    return summary, {"shard": shard, "key": key, **arrays}


def write_ledger(
    model, data, cfg, out_dir: Path, split: str, autocast, info: dict, input_dtype=None
) -> dict | None:
    """Collect every rank's rows of `data` (a keyed loader), and on rank 0 write the ledger
    under out_dir and draw its pictures under out_dir/plots. Rank 0 gets the split's metrics
    (the val/* names distres.evaluate prints) with the ledger's and pictures' paths."""
    from distres.results import per_class as class_metrics

    rows = gather(collect(model, data, autocast, input_dtype))
    if rows is None:
        return None
    names = class_names(data.shards.classes, cfg.model.num_classes)
    info = {
        **info,
        "image_size": cfg.data.eval_size,
        "resize": cfg.data.val_resize,
        "classes": names,
    }
    path = write(rows, out_dir, split, data.shards.urls, info)
    summary = json.loads(path.with_suffix(".json").read_text())
    pictures = class_metrics.draw(summary, table(rows, data.shards.urls), Path(out_dir) / "plots")
    m = summary["metrics"]
    return {
        "val/loss": m["loss"],
        "val/top1": m["top1"],
        "val/top5": m["top5"],
        "val/samples": m["samples"],
        "ledger": str(path),
        "pictures": {k: str(v) for k, v in pictures.items()},
    }


def write_run_ledger(target, cfg, env, device, run_dir: Path, info: dict) -> dict | None:
    """A training run's ledger at its end (tracking.ledger): every val sample's row for
    `target` (an EvalTarget: the weights final/ holds), from a keyed loader of its own."""
    from distres.data import build_eval_loader

    data = build_eval_loader(cfg, device, env.rank, env.world_size, env.local_world_size,
                             "val", keys=True)  # fmt: skip
    try:
        if target.prepare is not None:
            target.prepare()
        return write_ledger(target.model, data, cfg, run_dir, "val", target.autocast,
                            {**info, "tta": "none"}, target.input_dtype)  # fmt: skip
    finally:
        data.close()
