"""Where checkpoints live, and how one becomes visible: atomic commit, `latest` and `best`,
retention (reading and validation: distres.checkpoint.read). It knows nothing of tensor
formats: the engine writes its tensors (DCP for DDP, DeepSpeed's own files) into the
directory it is given.

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
import json
import logging
import os
import shutil
import signal
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch.distributed as dist

from distres.checkpoint.read import (  # noqa: F401 (read.py's names, one import away)
    BEST,
    FORMAT_VERSION,
    LATEST,
    META,
    _step,
    committed,
    find_resume,
    rank_file,
    read_meta,
    read_rank_state,
    step_name,
    tensor_format,
    validate,
)
from distres.errors import WriteError, why
from distres.io import atomic_write, fsync_dir, sweep, write_json

log = logging.getLogger("distres")

LOW_SPACE = 64 << 20  # bytes free under which a failed write is taken for a full device


# -- writing --------------------------------------------------------------------------------
@dataclasses.dataclass
class _Pending:
    future: Future | None
    tmp: Path
    final: Path
    metric: float | None


class CheckpointStore:
    """Writes, commits and prunes checkpoints, whatever writes their tensors; one per rank,
    every rank calls save() at the same step.

    A write that fails on any rank (no space, no permission, a read-only or vanished
    filesystem) fails on every rank at the same point, as one WriteError naming the
    checkpoint, the cause and what is intact ("latest" is untouched); its temporary directory
    is removed. When the newest checkpoint would not fit in the free space, the ones that
    retention would remove after this save are removed before it."""

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
        problem = None
        if rank == 0:
            try:
                root.mkdir(parents=True, exist_ok=True)
                for stale in root.glob(".tmp-step-*"):  # from a write that crashed or failed
                    shutil.rmtree(stale, ignore_errors=True)
            except OSError as e:
                problem = f"{root}: cannot create the checkpoint directory ({why(e)})"
        if (problem := self._agree(problem)) is not None:
            raise WriteError(problem)

    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.group)

    def _agree(self, problem: str | None) -> str | None:
        """Every rank's problem (None: none) -> the first one, on every rank (a barrier)."""
        if not self.distributed:
            return problem
        problems: list[str | None] = [None] * self.world_size
        dist.all_gather_object(problems, problem, group=self.group)
        return next((p for p in problems if p is not None), None)

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
        problem = None
        if self.rank == 0:
            try:
                self._make_room()
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
            except OSError as e:
                problem = self._explain(tmp, e)
        self._fail_if(self._agree(problem), step, tmp)
        try:
            write_json(tmp / rank_file(self.rank), {"state": rank_state})
            if self.rank == 0:
                write_json(tmp / META, {"format_version": FORMAT_VERSION, "step": step, **meta})
        except WriteError as e:
            problem = str(e)
        self._fail_if(self._agree(problem), step, tmp)
        failpoint("checkpoint.write", step, self.rank)
        future = None
        try:
            future = write(tmp)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # the engine's own types (DCP's CheckpointException is a
            problem = self._explain(tmp, e)  # BaseException, raised on every rank)
        if future is None:  # an async write's collectives are under way on this group: its
            # failure is agreed on in wait(), once they are done
            self._fail_if(self._agree(problem), step, tmp)
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
        problem = None
        if pending.future is not None:
            try:
                pending.future.result()
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:  # DCP's CheckpointException, as above
                problem = self._explain(pending.tmp, e)
        failpoint("checkpoint.commit", _step(pending.final), self.rank)
        # every rank's shard and rank file is written (or one failed, and all know it)
        self._fail_if(self._agree(problem), _step(pending.final), pending.tmp)
        if self.rank == 0:
            try:
                self._commit(pending)
            except OSError as e:
                problem = self._explain(pending.final, e)
                if pending.final.is_dir():  # renamed: a resume finds it, `latest` aside
                    problem = f"committed as {pending.final.name}, but not named latest ({problem})"
        self._fail_if(self._agree(problem), _step(pending.final), pending.tmp)

    def _fail_if(self, problem: str | None, step: int, tmp: Path) -> None:
        """On every rank alike: nothing, or remove the partial checkpoint and raise. `problem`
        is "<what happened> (<why>)"; a bare cause means the checkpoint was not written."""
        if problem is None:
            return
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        self._barrier()
        if not problem.startswith("committed"):
            problem = f"not written ({problem})"
        latest = self.root / LATEST
        named = latest.read_text().strip() if latest.is_file() else ""
        intact = (
            f"latest is still {named}"
            if named and (self.root / named).is_dir()
            else "no checkpoint was committed before it"
        )
        raise WriteError(f"checkpoint step {step}: {problem}; {intact}")

    def _explain(self, where: Path, e: BaseException) -> str:
        """Why a write failed, in a user's words: an OSError's errno, else (the engine's
        formats wrap it, e.g. torch.save's "unexpected pos") the free space, else the error."""
        seen: BaseException | None = e
        while seen is not None:
            if isinstance(seen, OSError) and seen.errno is not None:
                return f"{where}: {why(seen)}"
            seen = seen.__cause__ or seen.__context__
        try:
            free = shutil.disk_usage(self.root).free
        except OSError:
            free = None
        if free is not None and free < LOW_SPACE:
            return f"{where}: no space left on the device ({free / 2**20:.1f} MiB free)"
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"{where}: {type(e).__name__}: {first[:200]}"

    def _make_room(self) -> None:
        """Rank 0, before a write: when the newest checkpoint's size exceeds the free space,
        remove now what retention would remove once this one is committed."""
        done = committed(self.root)
        if len(done) < self.keep_last:
            return
        need = sum(f.stat().st_size for f in done[0].rglob("*") if f.is_file())
        if shutil.disk_usage(self.root).free >= need:
            return
        # never the one `latest` names (nor the best): a write that then fails leaves it
        keep = set(done[: max(1, self.keep_last - 1)]) | self._best()
        for path in done:
            if path not in keep:
                log.warning(f"making room for the next checkpoint: removing {path} early")
                shutil.rmtree(path, ignore_errors=True)

    def _best(self) -> set[Path]:
        if self.keep_best and (self.root / BEST).is_file():
            with contextlib.suppress(OSError, ValueError, KeyError):
                return {self.root / json.loads((self.root / BEST).read_text())["name"]}
        return set()

    def _commit(self, pending: _Pending) -> None:
        sweep(self.root)  # `latest` and `best.json` temporary files a crash left behind
        fsync_dir(pending.tmp)
        if pending.final.exists():  # a re-save of the same step (resumed, then stopped again)
            shutil.rmtree(pending.final)
        os.rename(pending.tmp, pending.final)
        fsync_dir(self.root)
        atomic_write(self.root / LATEST, pending.final.name + "\n")
        if pending.metric is not None and self._better(pending.metric):
            best = {"name": pending.final.name, "metric": pending.metric}
            atomic_write(self.root / BEST, json.dumps(best) + "\n")
        self._prune()

    def _better(self, metric: float) -> bool:
        try:
            best = json.loads((self.root / BEST).read_text())["metric"]
        except (OSError, ValueError, KeyError):
            return True
        return metric > best if self.mode == "max" else metric < best

    def _prune(self) -> None:
        keep = set(committed(self.root)[: self.keep_last]) | self._best()
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
    if at_failpoint(name, step, rank):
        os.kill(os.getpid(), signal.SIGKILL)


def at_failpoint(name: str, step: int, rank: int) -> bool:
    """Whether DISTRES_FAILPOINT names this point (`stop@<step>`: the loop stops there as
    if preempted, with a checkpoint: how a test stops a run by hand at an exact step)."""
    spec = os.environ.get("DISTRES_FAILPOINT", "")
    if not spec:
        return False
    parts = spec.split("@")
    if parts[0] != name or int(parts[1]) != step:
        return False
    return len(parts) < 3 or int(parts[2]) == rank
