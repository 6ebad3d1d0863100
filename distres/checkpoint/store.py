"""Where checkpoints live, and how one becomes visible: atomic commit, `latest` and `best`,
retention, and validation before any collective load. It knows nothing of tensor formats: the
engine writes its tensors (DCP for DDP, DeepSpeed's own files) into the directory it is given,
and validates them through the module that FORMATS names.

Layout of one checkpoint, `<run.dir>/checkpoints/step-00000120/`:

    meta.json        rank 0: format version, step, the tensor format, the batch layout, the
                     model, the resolved config, the monitored metric, and "state": the
                     state_dicts of the run's shared parts (train state, schedule, early
                     stopping, ...)
    rank-00000.json  one per rank: "state", the state_dicts of its own parts (data position,
                     RNG states, loss window, ...)
    (tensors)        the engine's: DCP's .metadata and __<rank>_0.distcp, or deepspeed/

It is written as `.tmp-step-00000120/` and becomes visible by one rename, done by rank 0 once
every rank has finished its part; `latest` (a one-line file, replaced atomically) then names
it. A crash mid-write leaves a `.tmp-*` directory that nothing reads. Retention keeps the last
`keep_last` checkpoints plus the best one by the monitored metric. Everything here is JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
import os
import re
import shutil
import signal
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch.distributed as dist

log = logging.getLogger("distres")

FORMAT_VERSION = 2  # 2: parts' state_dicts under "state"; the tensor format under "tensors"
STEP_DIR = re.compile(r"^step-(\d{8,})$")
META, LATEST, BEST = "meta.json", "latest", "best.json"
# The module that reads each tensor format (see tensor_format).
FORMATS = {"dcp": "distres.checkpoint.dcp", "deepspeed": "distres.engine.deepspeed"}

Check = Callable[[Any], "str | None"]  # a part's saved state -> why it would not load, or None


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names it and why."""


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
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path / META}: not a JSON object")
    if meta.get("format_version") == 1:
        meta = _from_v1(meta)
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {meta.get('format_version')!r}, this distres reads "
            f"1 and {FORMAT_VERSION}"
        )
    return meta


# Format 1 (distres before the parts): one flat meta.json, rank files without "state".
_V1_TRAIN = ("step", "epoch", "epoch_step", "samples_seen", "best_top1", "last_eval", "wandb_id")
_V1_RANK = ("data", "rng", "window", "skipped")


def _from_v1(old: dict) -> dict:
    """A format-1 meta.json read as format 2 (a run resumes across the upgrade); a key it
    lacks is left out, and validation names it."""
    meta = {k: old[k] for k in ("step", "model", "config", "metric", "time") if k in old}
    meta["format_version"] = FORMAT_VERSION
    meta["layout"] = {k: old[k] for k in LAYOUT if k in old}
    meta["tensors"] = {"format": old.get("format", "dcp"), "zero_stage": old.get("zero_stage", 0)}
    engine = {k: old[k] for k in ("scheduler", "scaler") if k in old}
    meta["state"] = {
        "train": {k: old[k] for k in _V1_TRAIN if k in old},
        "engine": engine,
        **({"early_stopping": old["early_stopping"]} if "early_stopping" in old else {}),
    }
    return meta


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.json"


# What every checkpoint's meta.json holds besides its parts, with the JSON type of each.
HEADER: dict[str, type] = {
    "step": int,
    "tensors": dict,
    "layout": dict,
    "model": dict,
    "config": str,
    "state": dict,
}
LAYOUT = ("world_size", "micro_batch", "grad_accum", "global_batch", "steps_per_epoch")


def validate(
    path: Path, shared: Mapping[str, Check] | None = None, ranks: Mapping[str, Check] | None = None
) -> dict:
    """Everything a resume will read must be there and parse, checked before any collective
    load: meta.json and its header, each shared part named in `shared` (by its check), every
    rank file and each part named in `ranks`, and the engine's tensors (by their format's
    own check). Returns the meta."""
    meta = read_meta(path)
    for key, kind in HEADER.items():
        if key not in meta:
            raise CheckpointError(f"{path / META}: incomplete (missing {key})")
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            raise CheckpointError(f"{path / META}: {key}={meta[key]!r} is not a {kind.__name__}")
    layout = meta["layout"]
    for key in LAYOUT:
        value = layout.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CheckpointError(f"{path / META}: layout.{key}={value!r} is not a count")
    parts = meta["tensors"].get("parts", [])
    if not isinstance(parts, list) or not all(isinstance(p, str) for p in parts):
        raise CheckpointError(f"{path / META}: tensors.parts={parts!r} is not a list of names")
    _check_parts(path / META, meta["state"], shared or {})
    for rank in range(layout["world_size"]):
        read_rank_state(path, rank, ranks or {})
    tensor_format(path, meta).validate_tensors(path, meta)
    return meta


def tensor_format(path: Path, meta: dict) -> Any:
    """The module that reads this checkpoint's tensors: validate_tensors(path, meta) and
    consolidated_weights(path, meta, model, trust)."""
    fmt = meta["tensors"].get("format")
    if fmt not in FORMATS:
        raise CheckpointError(f"{path / META}: unknown tensor format {fmt!r}")
    return importlib.import_module(FORMATS[fmt])


def _check_parts(where: Path, state: dict, checks: Mapping[str, Check]) -> None:
    for name, check in checks.items():
        if name not in state:
            raise CheckpointError(f"{where}: no state for {name!r}")
        problem = check(state[name])
        if problem:
            raise CheckpointError(f"{where}: {name} cannot be restored ({problem})")


def read_rank_state(path: Path, rank: int, checks: Mapping[str, Check] | None = None) -> dict:
    """One rank's parts (name -> state), each part in `checks` checked."""
    f = path / rank_file(rank)
    try:
        saved = json.loads(f.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{f}: missing (an incomplete checkpoint)") from None
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError included
        raise CheckpointError(f"{f}: not a rank state ({type(e).__name__}: {e})") from None
    if isinstance(saved, dict) and "state" not in saved and all(k in saved for k in _V1_RANK):
        saved = {"state": saved}  # format 1
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict):
        raise CheckpointError(f'{f}: not a rank state (no "state" mapping)')
    _check_parts(f, saved["state"], checks or {})
    return saved["state"]


def find_resume(
    root: Path, resume: str, check: Callable[[Path], dict] | None = None
) -> tuple[Path, dict] | None:
    """The checkpoint to resume from, with its meta: `resume` is "auto" (the newest complete
    one under root, skipping with a warning any that `check` refuses), "none", or a path (a
    checkpoint, or a directory of them). `check` (default: validate with no part checks)
    returns the meta or raises CheckpointError."""
    check = check or validate
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.exists():
            raise CheckpointError(f"checkpoint.resume={resume}: no such checkpoint")
        if not (path / META).is_file() and committed(path):
            root = path  # a directory of checkpoints: its newest complete one
        else:
            return path, check(path)
    latest = root / LATEST
    candidates = committed(root)
    if latest.is_file():  # the pointer first; a newer committed dir (crash after rename) next
        named = root / latest.read_text().strip()
        candidates.sort(key=lambda p: (p != named and _step(p) < _step(named), -_step(p)))
    for path in candidates:
        try:
            return path, check(path)
        except CheckpointError as e:
            log.warning(f"skipping checkpoint: {e}")
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


class CheckpointStore:
    """Writes, commits and prunes checkpoints, whatever writes their tensors; one per rank,
    every rank calls save() at the same step."""

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
        write: Callable[[Path], Future | None],
    ) -> Path:
        """Write checkpoint `step`: the JSON parts here, the tensors by `write(directory)` (a
        collective every rank calls; the engine's format). If `write` returns a Future (an
        async write), this returns once it is under way and the commit waits for it;
        otherwise it returns after the commit."""
        self.wait()  # one write in flight at a time; commits the previous async one
        final = self.root / step_name(step)
        tmp = self.root / f".tmp-{final.name}"
        if self.rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        self._barrier()
        _write_json(tmp / rank_file(self.rank), {"state": rank_state})
        if self.rank == 0:
            _write_json(tmp / META, {"format_version": FORMAT_VERSION, "step": step, **meta})
        failpoint("checkpoint.write", step, self.rank)
        future = write(tmp)
        self.pending = _Pending(future, tmp, final, metric)
        if future is None:
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
        failpoint("checkpoint.commit", _step(pending.final), self.rank)
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


# -- crash points and small helpers ---------------------------------------------------------
def failpoint(name: str, step: int, rank: int) -> None:
    """DISTRES_FAILPOINT=<name>@<step>[@<rank>] kills this process (SIGKILL, no cleanup) at
    that point: how the tests crash a rank in the middle of a checkpoint write."""
    spec = os.environ.get("DISTRES_FAILPOINT", "")
    if not spec:
        return
    parts = spec.split("@")
    if parts[0] != name or int(parts[1]) != step:
        return
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
