"""One run per run directory at a time.

Rank 0 holds an exclusive POSIX record lock (fcntl.lockf) on `<run.dir>/.lock` for the run's
lifetime and writes who holds it there (host, pid, Slurm job, since when). A POSIX lock
belongs to the process, not to its forked children (DataLoader workers), and works over NFS.
A second start on the same directory (a double submit, a second terminal) finds the lock held
and stops in one line
naming that run, before it reads or writes anything; every rank of it stops with it. A holder
that is gone (a crash, a SIGKILL, a requeued job's old attempt) holds nothing: the kernel
released its lock with its last descriptor, so the next start takes it over without a word.
Taking the lock also sweeps what crashed writes left in the run directory (temporary files
beside final/, the ledger, summary.json; a checkpoint's `.tmp-step-*` directories are the
checkpoint store's to remove, also at the start).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

import torch.distributed as dist

from distres.artifacts import layout
from distres.dist import DistEnv
from distres.errors import RunDirLocked, WriteError, why
from distres.io import sweep

log = logging.getLogger("distres")
_HELD: set[str] = set()  # the run directories this process holds


def holder() -> dict:
    """Who this process is, as the lock file records it."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def describe(info: dict) -> str:
    job = f", Slurm job {info['slurm_job']}" if info.get("slurm_job") else ""
    return f"pid {info.get('pid')} on {info.get('host')}{job}, since {info.get('since')}"


class RunDirLock:
    """with RunDirLock(run_dir, env): the run owns run_dir (a collective: every rank learns
    whether rank 0 got the lock)."""

    def __init__(self, run_dir: Path, env: DistEnv):
        self.run_dir, self.env = Path(run_dir), env
        self.fd: int | None = None
        self.key = ""

    def __enter__(self) -> RunDirLock:
        problem = self._acquire() if self.env.is_main else None
        if self.env.distributed:
            box = [problem]
            dist.broadcast_object_list(box, src=0)
            problem = box[0]
        if problem is not None:
            self.release()
            kind, message = problem
            raise (RunDirLocked if kind == "locked" else WriteError)(message)
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _acquire(self) -> tuple[str, str] | None:
        """Rank 0: take the lock, or (kind, message) saying why not."""
        path = self.run_dir / layout.LOCK
        key = str(path.resolve())
        if key in _HELD:  # POSIX locks do not see the same process twice
            return "locked", f"{self.run_dir} is being written by a run in this process"
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            return "write", f"{self.run_dir}: cannot create the run directory's lock ({why(e)})"
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):  # no POSIX locks on this filesystem
                log.warning(f"{path}: this filesystem takes no locks ({why(e)}); nothing stops "
                            "a second run from writing the same run.dir")  # fmt: skip
                os.close(fd)
                return None
            info = self._record(fd)
            job = os.environ.get("SLURM_JOB_ID")
            if job is not None and info.get("slurm_job") == job:
                # this job's own earlier attempt (a requeue after a node failure, whose lock
                # a network filesystem may keep for a lease period): it is gone
                log.warning(f"{path}: held by this Slurm job's earlier attempt; taking over")
                os.close(fd)
                return None
            os.close(fd)
            return "locked", (
                f"{self.run_dir} is being written by another run ({describe(info)}); "
                "wait for it, stop it, or give this run another run.dir"
            )
        self.fd, self.key = fd, key
        _HELD.add(key)
        with contextlib.suppress(OSError):  # the record is for people; a full disk must not stop us
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder()).encode(), 0)
        for folder in (self.run_dir, self.run_dir / layout.FINAL, self.run_dir / layout.LEDGER,
                       self.run_dir / layout.PLOTS):  # fmt: skip
            if folder.is_dir():
                sweep(folder)
        return None

    @staticmethod
    def _record(fd: int) -> dict:
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def release(self) -> None:
        if self.fd is not None:
            # the record stays (who held it last); the lock goes with the descriptor
            os.close(self.fd)
            self.fd = None
            _HELD.discard(self.key)
