"""tracking.profile_steps=[start, stop]: a torch.profiler trace of those optimizer steps on
every rank (Chrome / Perfetto JSON, with memory on a GPU) and a table of where their time
went: data wait, forward, backward, optimizer, communication.

The loop and the engines mark their phases with `mark(name)`, which is a no-op context
unless a profile is running: a run without profile_steps pays one global read per phase.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

PHASES = ("data_wait", "forward", "backward", "optimizer")
# collectives as the profiler names them: c10d's record functions (nccl:all_reduce,
# gloo:all_reduce, ...), DeepSpeed's comm ops, and NCCL's kernels on the GPU
COMM_MARKERS = (
    "nccl:",
    "gloo:",
    "c10d::",
    "ncclDevKernel",
    "ncclKernel",
    "all_reduce",
    "allreduce",
    "reduce_scatter",
    "all_gather",
    "broadcast",
)
PROFILE_DIR = "profile"

_active = False


def mark(name: str):
    """A labelled range in the profile (torch.profiler.record_function) while one runs."""
    return torch.profiler.record_function(name) if _active else contextlib.nullcontext()


class StepProfiler:
    """Profiles optimizer steps start..stop (1-based, inclusive) of this rank; `before(n)`
    comes before step n fetches its input, `after(n)` after its optimizer step."""

    def __init__(self, steps: list[int], run_dir: Path, rank: int, device: torch.device):
        self.start, self.stop = steps
        self.out = Path(run_dir) / PROFILE_DIR / f"rank{rank}.json"
        self.device = device
        self.prof: torch.profiler.profile | None = None
        self.t0 = 0.0
        self.first = 0
        self.done = False

    def before(self, step: int) -> None:
        global _active
        if self.done or self.prof is not None or not self.start <= step <= self.stop:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        cuda = self.device.type == "cuda"
        if not cuda:  # Kineto reports the missing GPU as an ERROR line; nothing is wrong
            os.environ.setdefault("KINETO_LOG_LEVEL", "5")
        if cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize(self.device)  # earlier steps' kernels stay out of it
        self.prof = torch.profiler.profile(
            activities=activities, profile_memory=cuda, record_shapes=cuda
        )
        self.prof.start()
        _active, self.first, self.t0 = True, step, time.perf_counter()

    def after(self, step: int, force: bool = False) -> dict[str, Any] | None:
        """At the window's last step (or any step with force: the run stops inside the
        window): stop, write the trace, and return the table's record (None otherwise)."""
        global _active
        if force and self.prof is None and not self.done and step < self.start:
            self.done = True  # the run ended before the window: say so once
            return {
                "event": "profile",
                "step": step,
                "steps": [self.start, self.stop],
                "missed": True,
            }
        if self.prof is None or (step < self.stop and not force):
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the window's kernels belong to it
        wall = time.perf_counter() - self.t0
        self.prof.stop()
        _active, self.done = False, True
        steps = step - self.first + 1
        record = {
            "event": "profile",
            "step": step,
            "steps": [self.first, step],
            "wall_s": wall,
            **step_times(self.prof.events(), self.device.type == "cuda", steps, wall),
        }
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.prof.export_chrome_trace(str(self.out))
        record["trace"] = str(self.out)
        self.prof = None
        return record


def step_times(events, cuda: bool, steps: int, wall: float) -> dict[str, float]:
    """Milliseconds per step in each phase, and in collectives. On a GPU a phase's time is
    its range on the device (kernels run after the host queued them) where the profiler
    recorded one, else the host's; on a CPU, the host's. Communication overlaps the backward
    under DDP, so the phases need not add up to the step."""
    host, device = dict.fromkeys(PHASES, 0.0), dict.fromkeys(PHASES, 0.0)
    comm_host = comm_device = 0.0
    for e in events:
        on_device = getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
        if e.name in host:
            if on_device:
                device[e.name] += e.device_time_total
            else:
                host[e.name] += e.cpu_time_total
        elif _is_comm(e.name):
            if on_device:
                comm_device += e.device_time_total
            elif e.cpu_parent is None or not _is_comm(e.cpu_parent.name):  # outermost only
                comm_host += e.cpu_time_total
    out = {f"{k}_ms": (device[k] if cuda and device[k] else host[k]) / 1e3 / steps for k in PHASES}
    comm = comm_device if cuda and comm_device else comm_host
    out["communication_ms"] = comm / 1e3 / steps
    out["step_ms"] = wall * 1e3 / steps
    return out


def _is_comm(name: str) -> bool:
    return any(m in name for m in COMM_MARKERS)


def table(record: dict[str, Any]) -> str:
    """The record as the lines the run prints."""
    if record.get("missed"):
        start, stop = record["steps"]
        return (
            f"tracking.profile_steps=[{start}, {stop}]: not profiled; the run stopped at step "
            f"{record['step']}, before the window"
        )
    step = record["step_ms"]
    lines = [
        f"where the step time goes (steps {record['steps'][0]}-{record['steps'][1]}, "
        f"{step:.1f} ms/step; trace {record['trace']}):"
    ]
    for name in (*PHASES, "communication"):
        ms = record[f"{name}_ms"]
        note = " (overlaps backward)" if name == "communication" else ""
        lines.append(f"  {name:<14} {ms:9.2f} ms {100 * ms / max(step, 1e-9):5.1f}%{note}")
    return "\n".join(lines)


def load_trace(path: str | Path) -> dict:
    """A written trace, as JSON (what Perfetto and chrome://tracing open)."""
    return json.loads(Path(path).read_text())


class HostSyncs:
    """Host-device synchronisations counted by torch itself (set_sync_debug_mode("warn")
    warns at every call that blocks the host on the device: an .item(), a copy from pageable
    memory, a stream synchronisation), by thread, phase and the line of distres that made
    them. Only on CUDA.

        with HostSyncs() as syncs:
            syncs.phase = "step"
            ...
        syncs.main["step"]  # Counter: "file.py:line" -> syncs the main thread made in it

    The GPU-decode stage's thread synchronises its own side streams on purpose (vision issue
    9606); those land in `others` and never hold the training thread."""

    def __init__(self) -> None:
        import collections

        self.phase = "run"
        self.main: collections.defaultdict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )
        self.others: collections.Counter[str] = collections.Counter()

    def __enter__(self) -> HostSyncs:
        import threading
        import traceback
        import warnings

        self._original = warnings.showwarning
        self._filters = warnings.filters[:]

        def count(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" not in str(message):
                return self._original(message, category, filename, lineno, file, line)
            frames = [f for f in traceback.extract_stack() if "/distres/" in f.filename]
            where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
            if threading.current_thread() is threading.main_thread():
                self.main[self.phase][where] += 1
            else:
                self.others[where] += 1
            return None

        warnings.showwarning = count
        warnings.filterwarnings("always", message=".*synchroniz")  # every one, not once
        if torch.cuda.is_available():  # elsewhere nothing syncs: nothing to count
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc) -> None:
        import warnings

        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = self._original
        warnings.filters[:] = self._filters
