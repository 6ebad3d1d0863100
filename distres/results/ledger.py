"""The per-sample ledger: every sample's shard, key, label, top-5 predictions with their
probabilities, and loss.

Each rank evaluates its part of a split (every sample exactly once over all ranks, as the
validation does) with a loader that yields each sample's SampleKey, and writes its rows as
sorted runs; rank 0 merges the runs in the shard set's order (shards as the manifest lists
them, samples in tar order) with bounded memory (distres.results.ledger_files), so the ledger
has the same rows in the same order on any world size, and no rank holds all of them.
Written as <dir>/ledger/<split>.parquet (pandas.read_parquet, polars, DuckDB) and
<split>.json (what was evaluated, the split's metrics, the per-class table, the
most-confused pairs and what the pictures show: distres.results.per_class).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from distres.data.api import KeyedBatch, class_names
from distres.errors import DistresError
from distres.io import write_json
from distres.results import ledger_files as files
from distres.results.ledger_files import LedgerError
from distres.results.per_class import ClassStats

__all__ = ["LEDGER_DIR", "TOP_K", "LedgerError", "collect", "read", "write", "write_ledger"]

LEDGER_DIR = "ledger"
TOP_K = 5


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def collect(
    model: nn.Module,
    batches: Iterable[KeyedBatch],
    autocast: Callable[[], AbstractContextManager],
    parts: Path,
    input_dtype: torch.dtype | None = None,
) -> list[Path]:
    """This rank's rows (keys, labels, top-k classes and probabilities, per-sample loss),
    written under `parts` as sorted runs of at most RUN_ROWS rows; returns their paths. The
    model's outputs are logits or log-probabilities (FlipTTA): log_softmax takes either to
    log-probabilities."""
    was_training = model.training
    model.eval()
    rank, _ = _world()
    runs: list[Path] = []
    chunk: dict[str, list] = {n: [] for n in ("shard", "at", "key", "y", "top", "p", "l")}
    held = 0

    def flush() -> None:
        nonlocal held
        if not held:
            return
        # one copy to the host per run, not one per batch
        c = {n: torch.cat(v).cpu().numpy() for n, v in chunk.items() if n not in ("key",
             "shard", "at")}  # fmt: skip
        code = files.sort_code(np.asarray(chunk["shard"]), np.asarray(chunk["at"]))
        path = parts / f"rank{rank:05d}-{len(runs):05d}.parquet"
        runs.append(files.write_run(path, code, chunk["key"], c["y"], c["top"], c["p"], c["l"]))
        for v in chunk.values():
            v.clear()
        held = 0

    for images, y, batch_keys in batches:
        if input_dtype is not None:
            images = images.to(input_dtype)
        with autocast():
            logits = model(images)
        logp = logits.float().log_softmax(1)
        top = logp.topk(min(TOP_K, logp.shape[1]), dim=1)
        chunk["y"].append(y)
        chunk["top"].append(top.indices)
        chunk["p"].append(top.values.exp())
        chunk["l"].append(F.nll_loss(logp, y, reduction="none"))
        for k in batch_keys:
            chunk["shard"].append(k.shard)
            chunk["at"].append(k.at)
            chunk["key"].append(k.key)
        held += len(batch_keys)
        if held >= files.RUN_ROWS:
            flush()
    flush()
    model.train(was_training)
    return runs


def metrics_of(stats: ClassStats) -> dict[str, float]:
    """loss, top-1 and top-5 of the rows (what distres.evaluate reports for the split)."""
    n = int(stats.support.sum())
    if n == 0:
        from distres.data.api import DataError

        raise DataError("the split has no usable sample: no ledger to write")
    return {
        "loss": stats.total_loss / n,
        "top1": float(stats.hit1.sum() / n),
        "top5": float(stats.hit5.sum() / n),
        "samples": n,
    }


def metrics(rows: dict[str, Any]) -> dict[str, float]:
    """metrics_of rows held in memory (label, top, loss arrays)."""
    stats = ClassStats(int(max(rows["label"].max(initial=0), rows["top"].max(initial=0))) + 1)
    stats.update(rows["label"], rows["top"], rows["loss"])
    return metrics_of(stats)


def finish(runs: list[Path], out_dir: str | os.PathLike, split: str, urls: tuple[str, ...],
           info: dict[str, Any]) -> Path:  # fmt: skip
    """Merge every rank's runs into <out_dir>/ledger/<split>.parquet and write <split>.json
    (info, metrics, the per-class table and what the pictures show); returns the .parquet
    path."""
    path = Path(out_dir) / LEDGER_DIR / f"{split}.parquet"
    stats = ClassStats(len(info["classes"]))
    files.merge(runs, path, urls, stats)
    summary = {
        **info,
        "split": split,
        "rows": path.name,
        "metrics": metrics_of(stats),
        **stats.summary(info["classes"]),
    }
    write_json(path.with_suffix(".json"), summary, indent=1)
    return path


def write(rows: dict[str, Any], out_dir: str | os.PathLike, split: str,
          urls: tuple[str, ...], info: dict[str, Any]) -> Path:  # fmt: skip
    """A ledger of rows held in memory ({"keys": [SampleKey], label, top, prob, loss}),
    written the way a distributed evaluation writes it (one run, merged)."""
    parts = Path(out_dir) / LEDGER_DIR / f".parts-{split}-{uuid.uuid4().hex[:8]}"
    keys = rows["keys"]
    code = files.sort_code(np.array([k.shard for k in keys]), np.array([k.at for k in keys]))
    try:
        run = files.write_run(parts / "rank00000-00000.parquet", code, [k.key for k in keys],
                              rows["label"], rows["top"], rows["prob"], rows["loss"])  # fmt: skip
        return finish([run], out_dir, split, urls, info)
    finally:
        shutil.rmtree(parts, ignore_errors=True)


def find(directory: Path) -> list[Path]:
    """The ledgers in a directory (the summary's "rows" file of each <split>.json; a
    JSON-lines ledger of an earlier distres too)."""
    found = []
    for side in sorted(Path(directory).glob("*.json")):
        for suffix in (".parquet", ".jsonl"):
            if side.with_suffix(suffix).is_file():
                found.append(side.with_suffix(suffix))
                break
    return found


def read_summary(path: str | os.PathLike) -> dict[str, Any]:
    """The summary (<split>.json) of a ledger; LedgerError naming the file otherwise."""
    summary = _side(path)
    if not isinstance(summary, dict) or not isinstance(summary.get("classes"), list):
        side = Path(path).with_suffix(".json")
        raise LedgerError(f"{side}: not a ledger summary (no class list)")
    if "confusion" not in summary:  # a JSON-lines ledger of an earlier distres
        _, rows = read(path)
        stats = ClassStats(len(summary["classes"]))
        try:
            stats.update(rows["label"], rows["top"], rows["loss"], _legacy_rows(rows))
        except ValueError as e:
            raise LedgerError(f"{path}: {e}") from None
        summary.update(stats.summary(summary["classes"]))
    return summary


def _side(path: str | os.PathLike) -> Any:
    """The parsed <split>.json beside a ledger; LedgerError naming it otherwise."""
    side = Path(path).with_suffix(".json")
    try:
        return json.loads(side.read_text())
    except FileNotFoundError as e:
        raise LedgerError(f"{e.filename}: missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise LedgerError(f"{side}: unreadable ({e})") from None


def _legacy_rows(rows: dict[str, Any]):
    def take(indices) -> list[dict]:
        return [{"shard": rows["shard"][i], "key": rows["key"][i], "label": int(rows["label"][i]),
                 "pred1": int(rows["top"][i, 0]), "prob1": float(rows["prob"][i, 0]),
                 "loss": float(rows["loss"][i])} for i in indices]  # fmt: skip

    return take


def read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """A ledger, all of its rows in memory (for a small split; files.read_chunks streams):
    (its summary, its rows as arrays with shard and key lists). Reads the Parquet ledger and
    the JSON-lines ledger of earlier versions. LedgerError naming the file otherwise."""
    path = Path(path)
    summary = _side(path)
    if path.suffix == ".jsonl":
        return summary, _read_jsonl(path)
    shard, key, parts = [], [], []
    for batch in files.read_chunks(path):
        shard += batch.column("shard").to_pylist()
        key += batch.column("key").to_pylist()
        parts.append(files.columns_of(batch))
    if not parts:
        raise LedgerError(f"{path}: no rows")
    arrays = {n: np.concatenate([p[n] for p in parts]) for n in ("label", "top", "prob", "loss")}
    return summary, {"shard": shard, "key": key, **arrays}


def _read_jsonl(path: Path) -> dict[str, Any]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError as e:
        raise LedgerError(f"{e.filename}: missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LedgerError(f"{path}: unreadable ({e})") from None
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
    try:
        arrays = {
            "label": np.asarray(label, np.int64),
            "top": np.asarray(top, np.int64).reshape(len(label), -1),
            "prob": np.asarray(prob, np.float32).reshape(len(label), -1),
            "loss": np.asarray(loss, np.float32),
        }
    except ValueError as e:  # ragged top-k lists
        raise LedgerError(f"{path}: rows of different lengths ({e})") from None
    return {"shard": shard, "key": key, **arrays}


def agree(error: BaseException | None) -> None:
    """Every rank learns whether any rank failed, and every rank raises the first failure
    (its rank, kind and message), so none is left waiting in a collective the failed one
    skipped. Sent as strings: any exception, however it was defined, travels."""
    rank, world = _world()
    mine = None
    if error is not None:
        code = getattr(error, "exit_code", 1)
        label = getattr(error, "label", "error")
        mine = (rank, code, label, str(error) or type(error).__name__)
    every = [mine]
    if world > 1:
        every = [None] * world
        dist.all_gather_object(every, mine)
    failed = next((e for e in every if e is not None), None)
    if failed is None:
        return
    if error is not None and failed[0] == rank:
        raise error
    peer, code, label, message = failed
    raised = DistresError(f"rank {peer}: {message}")
    raised.exit_code, raised.label = code, label
    raise raised


def _gather_runs(runs: list[Path] | None, error: Exception | None) -> list[Path] | None:
    """Every rank's run paths on rank 0 (None elsewhere); a rank whose part failed raises
    on every rank (agree)."""
    agree(error)
    rank, world = _world()
    every = [runs]
    if world > 1:
        every = [None] * world
        dist.all_gather_object(every, runs)  # paths: a few bytes a rank
    return [p for r in every for p in r] if rank == 0 else None


def _parts_dir(out_dir: Path, split: str) -> Path:
    """One directory for this evaluation's runs, named by rank 0, which first removes the
    runs an attempt killed before its end left behind (a stale one is never read)."""
    token = [uuid.uuid4().hex[:12]]
    ledgers = Path(out_dir) / LEDGER_DIR
    if _world()[0] == 0:
        for stale in ledgers.glob(f".parts-{split}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        for stale in ledgers.glob(f".{split}.parquet.*.tmp"):
            stale.unlink(missing_ok=True)
    if _world()[1] > 1:
        dist.broadcast_object_list(token, src=0)
    return ledgers / f".parts-{split}-{token[0]}"


def write_ledger(
    model, data, cfg, out_dir: Path, split: str, autocast, info: dict, input_dtype=None
) -> dict | None:
    """Collect every rank's rows of `data` (a keyed loader) as sorted runs, and on rank 0
    merge them into the ledger under out_dir and draw its pictures under out_dir/plots.
    Rank 0 gets the split's metrics (the val/* names distres.evaluate prints) with the
    ledger's and pictures' paths."""
    from distres.results import per_class as class_metrics

    parts = _parts_dir(out_dir, split)
    try:
        runs, failed = collect(model, data, autocast, parts, input_dtype), None
    except Exception as e:  # told to every rank in the gather, raised on all of them
        runs, failed = None, e
    path, error = None, None
    try:
        runs = _gather_runs(runs, failed)
        if runs is not None:
            names = class_names(data.shards.classes, cfg.model.num_classes)
            info = {
                **info,
                "image_size": cfg.data.eval_size,
                "resize": cfg.data.val_resize,
                "classes": names,
            }
            try:
                path = finish(runs, out_dir, split, data.shards.urls, info)
            except Exception as e:  # rank 0's merge: every rank hears of it (agree)
                error = e
    finally:
        if _world()[0] == 0:
            shutil.rmtree(parts, ignore_errors=True)
    agree(error)
    if path is None:
        return None
    summary = json.loads(path.with_suffix(".json").read_text())
    pictures = class_metrics.draw(summary, Path(out_dir) / "plots", commands=True)
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

    data, failed = None, None
    try:
        data = build_eval_loader(cfg, device, env.rank, env.world_size, env.local_world_size,
                                 "val", keys=True)  # fmt: skip
    except Exception as e:  # one rank's loader: every rank hears of it before a collective
        failed = e
    try:
        agree(failed)
        if target.prepare is not None:
            target.prepare()
        return write_ledger(target.model, data, cfg, run_dir, "val", target.autocast,
                            {**info, "tta": "none"}, target.input_dtype)  # fmt: skip
    finally:
        if data is not None:
            data.close()
