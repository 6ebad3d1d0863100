"""Sharded, atomic, resumable checkpoints for the DDP engine (torch.distributed.checkpoint).

Layout of one checkpoint, `<run.dir>/checkpoints/step-00000120/`:

    .metadata, __<rank>_0.distcp   DCP: model and optimizer tensors, every rank writing its part
    meta.json                      rank 0: step, epoch, samples seen, schedule, scaler, early
                                   stopping, best metric, W&B run id, config, format version
    rank-00000.json ...            one per rank: data position, RNG states, loss window

It is written as `.tmp-step-00000120/` and becomes visible by one rename, done by rank 0 once
every rank has finished its part; `latest` (a one-line file, replaced atomically) then names
it. A crash mid-write leaves a `.tmp-*` directory that nothing reads. Retention keeps the last
`keep_last` checkpoints plus the best one by the monitored metric.

Nothing is unpickled with a general unpickler: DCP's tensors are read by
torch.load(weights_only=True), its non-tensor items through a load planner that does the same,
and its `.metadata` pickle through an unpickler that only admits DCP's own metadata classes.
Everything else is JSON.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import io
import json
import os
import pickle
import re
import shutil
import signal
import sys
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from distres.data.dali import checkpoint_problem
from distres.rng import rng_problem

# A single-process run saves and loads without a process group on purpose; DCP warns that it
# "assumes the intent" each time (also from async_save's background thread).
warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)

FORMAT_VERSION = 1
STEP_DIR = re.compile(r"^step-(\d{8,})$")
META, LATEST, BEST = "meta.json", "latest", "best.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names it and why."""


# -- safe reading ---------------------------------------------------------------------------
class _MetadataUnpickler(pickle.Unpickler):
    """DCP writes `.metadata` with pickle; admit exactly the (module, name) pairs that file is
    made of. No dotted names: pickle protocol 4 would resolve "filesystem" + "os.system"."""

    ALLOWED = frozenset(
        {
            *(
                ("torch.distributed.checkpoint.metadata", name)
                for name in (
                    "Metadata",
                    "MetadataIndex",
                    "StorageMeta",
                    "TensorProperties",
                    "TensorStorageMetadata",
                    "BytesStorageMetadata",
                    "ChunkStorageMetadata",
                    "_MEM_FORMAT_ENCODING",
                )
            ),
            ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
            ("collections", "OrderedDict"),
            ("torch", "Size"),
            ("pathlib", "PosixPath"),
            ("pathlib", "PurePosixPath"),
            ("pathlib", "WindowsPath"),
            ("torch.serialization", "_get_layout"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        admitted = (module, name) in self.ALLOWED or (
            module == "torch"
            and name.isidentifier()
            and isinstance(getattr(torch, name, None), torch.dtype)
        )
        if not admitted:
            raise pickle.UnpicklingError(f"refused to unpickle {module}.{name}")
        return super().find_class(module, name)


class SafeFileSystemReader(dcp.FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any):
        rank = kwargs.get("rank")
        path = Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata")
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing (an incomplete checkpoint)") from None
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: unreadable DCP metadata ({e})") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def load_item(value: io.BytesIO, fqn: str) -> Any:
    """A DCP non-tensor item (optimizer hyper-parameters), read with weights_only=True."""
    try:
        return torch.load(value, weights_only=True)
    except Exception as e:  # UnpicklingError, EOFError, RuntimeError for a damaged item
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"refused the non-tensor item {fqn!r} ({first[:200]})") from None


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner, but non-tensor items (optimizer hyper-parameters) are read with
    torch.load(weights_only=True) instead of a full unpickle."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        obj = load_item(value, read_item.dest_index.fqn)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


# -- where checkpoints are ------------------------------------------------------------------
def step_name(step: int) -> str:
    return f"step-{step:08d}"


def committed(root: Path) -> list[Path]:
    """Committed checkpoints under root, newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def read_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / META).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {META} (not a distres checkpoint?)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / META}: unreadable ({e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {meta.get('format_version')!r}, this distres reads "
            f"{FORMAT_VERSION}"
        )
    return meta


# What a resume reads from meta.json, and the JSON type each must have.
META_KEYS: dict[str, type | tuple[type, ...]] = {
    **dict.fromkeys(
        (
            "step",
            "epoch",
            "epoch_step",
            "samples_seen",
            "world_size",
            "micro_batch",
            "grad_accum",
            "global_batch",
        ),
        int,
    ),
    "model": dict,
    "config": str,
    "scheduler": dict,
    "scaler": dict,
    "early_stopping": dict,
    "best_top1": (int, float, type(None)),
    "last_eval": dict,
    "wandb_id": str,
}
RANK_KEYS = ("data", "rng", "window", "skipped")


def validate(path: Path) -> dict:
    """Everything a resume will read must be there and parse, checked before any collective
    load: meta.json, every rank file (JSON, its data position), and every byte range DCP's
    metadata names, its non-tensor items loaded as a resume would. Returns the meta."""
    meta = read_meta(path)
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{path / META}: incomplete (missing {', '.join(missing)})")
    for key, kind in META_KEYS.items():
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            raise CheckpointError(f"{path / META}: {key}={meta[key]!r} is not a {kind}")
    if meta["world_size"] < 1 or min(meta["micro_batch"], meta["grad_accum"]) < 1:
        raise CheckpointError(f"{path / META}: world_size, micro_batch, grad_accum must be >= 1")
    for rank in range(meta["world_size"]):
        read_rank_state(path, rank)
    if meta.get("format", "dcp") == "deepspeed":
        return _validate_deepspeed(path, meta)
    if meta.get("format", "dcp") != "dcp":
        raise CheckpointError(f"{path / META}: unknown format {meta.get('format')!r}")
    metadata = SafeFileSystemReader(path).read_metadata()
    need: dict[str, int] = {}
    for info in metadata.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in need.items():
        f = path / name
        if not f.is_file() or f.stat().st_size < size:
            have = f.stat().st_size if f.is_file() else "missing"
            raise CheckpointError(f"{f}: truncated ({have} of {size} bytes)")
    for index, info in metadata.storage_data.items():
        if isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            with open(path / info.relative_path, "rb") as f:
                f.seek(info.offset)
                load_item(io.BytesIO(f.read(info.length)), index.fqn)
    return meta


def _validate_deepspeed(path: Path, meta: dict) -> dict:
    from distres.engine.deepspeed import checkpoint_files

    stage = meta.get("zero_stage", 0)
    if stage not in (0, 1, 2, 3):
        raise CheckpointError(f"{path / META}: zero_stage={stage!r}")
    for f in checkpoint_files(path, stage, meta["world_size"]):
        if not f.is_file() or f.stat().st_size == 0:
            raise CheckpointError(f"{f}: missing or empty")
    return meta


def find_resume(root: Path, resume: str) -> tuple[Path, dict] | None:
    """The checkpoint to resume from: `resume` is "auto" (the newest complete one under root,
    skipping corrupt ones with a warning), "none", or a path (a checkpoint, or a directory of
    them)."""
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.exists():
            raise CheckpointError(f"checkpoint.resume={resume}: no such checkpoint")
        if not (path / META).is_file() and committed(path):
            root = path  # a directory of checkpoints: its newest complete one
        else:
            return path, validate(path)
    latest = root / LATEST
    candidates = committed(root)
    if latest.is_file():  # the pointer first; a newer committed dir (crash after rename) next
        named = root / latest.read_text().strip()
        candidates.sort(key=lambda p: (p != named and _step(p) < _step(named), -_step(p)))
    for path in candidates:
        try:
            return path, validate(path)
        except CheckpointError as e:
            print(f"[distres] skipping checkpoint: {e}", file=sys.stderr, flush=True)
    if resume != "auto":
        raise CheckpointError(f"checkpoint.resume={resume}: no complete checkpoint in it")
    return None


def _step(path: Path) -> int:
    m = STEP_DIR.match(path.name)
    return int(m.group(1)) if m else -1


# -- writing --------------------------------------------------------------------------------
@dataclasses.dataclass
class _Pending:
    future: Future | None
    tmp: Path
    final: Path
    metric: float | None


class CheckpointWriter:
    """Writes, commits and prunes checkpoints; one per rank, every rank calls save() at the
    same step."""

    def __init__(
        self,
        root: Path,
        *,
        rank: int,
        world_size: int,
        keep_last: int,
        keep_best: bool,
        mode: str,
        async_save: bool,
    ):
        self.root, self.rank, self.world_size = root, rank, world_size
        self.keep_last, self.keep_best, self.mode = keep_last, keep_best, mode
        self.async_save = async_save
        self.distributed = dist.is_available() and dist.is_initialized()
        # Checkpoint I/O coordinates on its own gloo group: an async write's collectives run
        # in a background thread and must not interleave with the training's all-reduces.
        self.group = dist.new_group(backend="gloo") if self.distributed else None
        self.pending: _Pending | None = None
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".tmp-step-*"):  # from a write that crashed
                shutil.rmtree(stale, ignore_errors=True)
        self._barrier()

    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.group)

    def save(
        self,
        step: int,
        meta: dict[str, Any],
        rank_state: dict[str, Any],
        metric: float | None,
        tensors: dict[str, Any] | None = None,
        write: Callable[[Path], None] | None = None,
    ) -> Path:
        """Write checkpoint `step`: `tensors` through DCP, or `write(directory)` (a collective
        every rank calls, e.g. DeepSpeed's save_checkpoint). Synchronous mode returns after
        the commit; async mode (DCP only) returns once the tensors are staged in host memory
        and the write goes on meanwhile."""
        self.wait()  # one write in flight at a time; commits the previous async one
        final = self.root / step_name(step)
        tmp = self.root / f".tmp-{final.name}"
        if self.rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        self._barrier()
        _write_json(tmp / f"rank-{self.rank:05d}.json", rank_state)
        if self.rank == 0:
            _write_json(tmp / META, {"format_version": FORMAT_VERSION, **meta})
        failpoint("checkpoint.write", step)
        kwargs = {"checkpoint_id": str(tmp), "process_group": self.group}
        if not self.distributed:
            kwargs["no_dist"] = True
        if write is not None:
            write(tmp)
            self.pending = _Pending(None, tmp, final, metric)
            self.wait()
        elif self.async_save:
            future = dcp.async_save(tensors, **kwargs)
            # an AsyncSaveResponse (newer torch) or a Future
            future = getattr(future, "upload_completion", future)
            self.pending = _Pending(future, tmp, final, metric)
        else:
            dcp.save(tensors, **kwargs)
            self.pending = _Pending(None, tmp, final, metric)
            self.wait()
        return final

    def ready(self) -> bool:
        """This rank's part of the pending write is on disk (async mode)."""
        return self.pending is None or self.pending.future is None or self.pending.future.done()

    def wait(self) -> None:
        """Finish the pending write on every rank, then commit it (a collective)."""
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        if pending.future is not None:
            pending.future.result()
        failpoint("checkpoint.commit", _step(pending.final))
        self._barrier()  # every rank's shard and rank file is written
        if self.rank == 0:
            self._commit(pending)
        self._barrier()

    def _commit(self, pending: _Pending) -> None:
        _fsync_dir(pending.tmp)
        if pending.final.exists():  # a re-save of the same step (resumed, then stopped again)
            shutil.rmtree(pending.final)
        os.rename(pending.tmp, pending.final)
        _replace_text(self.root / LATEST, pending.final.name)
        if pending.metric is not None and self._better(pending.metric):
            best = {"name": pending.final.name, "metric": pending.metric}
            _replace_text(self.root / BEST, json.dumps(best))
        self._prune()

    def _better(self, metric: float) -> bool:
        try:
            best = json.loads((self.root / BEST).read_text())["metric"]
        except (OSError, ValueError, KeyError):
            return True
        return metric > best if self.mode == "max" else metric < best

    def _prune(self) -> None:
        keep = set(committed(self.root)[: self.keep_last])
        if self.keep_best and (self.root / BEST).is_file():
            with contextlib.suppress(ValueError, KeyError):
                keep.add(self.root / json.loads((self.root / BEST).read_text())["name"])
        for path in committed(self.root):
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        self.wait()
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None


# -- reading --------------------------------------------------------------------------------
def load_tensors(path: Path, tensors: dict[str, Any]) -> None:
    """Fill `tensors` in place from checkpoint `path` (DCP reshards for any world size)."""
    kwargs = {}
    if not (dist.is_available() and dist.is_initialized()):
        kwargs["no_dist"] = True
    try:
        dcp.load(
            tensors,
            storage_reader=SafeFileSystemReader(path),
            planner=SafeLoadPlanner(),
            **kwargs,
        )
    except CheckpointException as e:
        # DCP wraps each rank's failure (ours included) with its traceback: one line instead.
        causes = [
            failure[0] if isinstance(failure, tuple) else failure for failure in e.failures.values()
        ]
        ours = next((c for c in causes if isinstance(c, CheckpointError)), None)
        if ours is not None:
            raise CheckpointError(f"{path}: {ours}") from None
        first = causes[0] if causes else e
        raise CheckpointError(f"{path}: cannot load ({type(first).__name__}: {first})") from None


def read_rank_state(path: Path, rank: int) -> dict:
    """One rank's JSON state, checked for the parts a resume reads (its data position too)."""
    f = path / f"rank-{rank:05d}.json"
    try:
        state = json.loads(f.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{f}: missing (an incomplete checkpoint)") from None
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError included
        raise CheckpointError(f"{f}: not a rank state ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or any(k not in state for k in RANK_KEYS):
        raise CheckpointError(f"{f}: not a rank state (needs {', '.join(RANK_KEYS)})")
    problem = data_position_problem(state["data"]) or rng_problem(state["rng"])
    if problem:
        raise CheckpointError(f"{f}: cannot be restored ({problem})")
    return state


def data_position_problem(data: object) -> str | None:
    """Why a rank's saved data position would not restore, or None."""
    if not isinstance(data, dict):
        return "not a mapping"
    for key in ("epoch", "batches"):
        value = data.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"{key}={value!r}"
    dali_state = data.get("dali")
    if dali_state is None:
        return None
    if not isinstance(dali_state, str):
        return "the DALI position is not text"
    try:
        raw = base64.b64decode(dali_state, validate=True)
    except (binascii.Error, ValueError):
        return "the DALI position is not base64"
    return checkpoint_problem(raw)


def failpoint(name: str, step: int) -> None:
    """DISTRES_FAILPOINT=<name>@<step>[@<rank>] kills this process (SIGKILL, no cleanup) at
    that point: how the tests crash a rank in the middle of a checkpoint write."""
    spec = os.environ.get("DISTRES_FAILPOINT", "")
    if not spec:
        return
    parts = spec.split("@")
    if parts[0] != name or int(parts[1]) != step:
        return
    rank = int(os.environ.get("RANK", "0"))
    if len(parts) < 3 or int(parts[2]) == rank:
        os.kill(os.getpid(), signal.SIGKILL)


# -- small helpers --------------------------------------------------------------------------
def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
