"""`python -m MODULE args...` for the tests, forked from a process that has already imported
torch and distres's dependencies (a fork server), instead of a new interpreter each time.

A new interpreter spends ~6 s of CPU importing torch, torchvision, DCP and dynamo before a
command does anything: over the suite's ~50 single-process commands that is about five
minutes of a 2-core CI machine. Here the module still runs as `__main__` the way `python -m`
runs it (runpy), in a process of its own with the test's argv, environment, working
directory, stdout, stderr and exit status; only those imports are shared, done once per
session by the server (multiprocessing's forkserver, which forks each command from a
single-threaded process). Nothing of distres runs in the server: every command starts from
modules that are imported but untouched, as in a new process.

What a new interpreter alone can show (import-time behaviour, `python -X ...`, the exit path
of an uncaught exception as Python prints it) uses `run_cli(..., fresh=True)`.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing as mp
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

# Imported once in the server. The entry modules themselves are not (runpy runs them as
# __main__, as `python -m` does); DALI and W&B neither (threads, environment read at import).
PRELOAD = [
    "numpy",
    "torch",
    "torch._dynamo",
    "torch.distributed.checkpoint",
    "torch.distributed.checkpoint.state_dict",
    "torchvision",
    "torchvision.transforms.v2",
    "safetensors.torch",
    "omegaconf",
    "webdataset",
    "distres.config",
    "distres.trainer",
    "distres.engine.ddp",
    "distres.data.torch.loader",
    "distres.evaluate",
    "distres.checkpoint",
    "torch.distributed.run",  # torchrun's agent; the ranks it forks (--run-path) start here too
]

_context = None


def _server():
    global _context
    if _context is None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        _context = ctx
    return _context


def _run_as_main(module: str, argv: list[str], cwd: str, env: dict, out: str, err: str) -> None:
    """In the forked child: become `python -m module argv...` (or `python module argv...` for
    a path ending in .py) and exit with its status."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    # multiprocessing set this process's default start method to the server's (forkserver):
    # back to the platform's default, as in a new interpreter (DataLoader workers use it)
    mp.set_start_method(None, force=True)
    if env.get("OMP_NUM_THREADS", "").isdigit():  # read by OpenMP when torch loaded, in the server
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    # unbuffered text streams on the new fds, as PYTHONUNBUFFERED=1 gives a new interpreter
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.argv = [module, *argv]
    sys.modules.pop(module, None)
    code = 0
    try:
        if module.endswith(".py"):  # a script: `python path/to/script.py argv...`
            sys.path.insert(0, os.path.dirname(os.path.abspath(module)))
            runpy.run_path(module, run_name="__main__")
        else:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()  # as an interpreter's exit does (logging, W&B, children)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def children(pid: int) -> list[int]:
    """Direct children of pid (torchrun starts its workers in their own sessions, so killing
    the agent's process group would leave them running)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL pid and every process below it, the leaves first."""
    for child in children(pid):
        kill_tree(child)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def start_module(module: str, args: list[str], *, cwd: Path, env: dict, out: str, err: str):
    """Start `python -m module args...` (stdout and stderr to the files out and err); the
    multiprocessing Process, whose pid is the command's."""
    proc = _server().Process(
        target=_run_as_main, args=(module, list(args), str(cwd), env, out, err)
    )
    proc.start()
    return proc


def run_module(module: str, args: list[str], *, cwd: Path, env: dict, timeout: float):
    """Like subprocess.run([python, -m, module, *args], capture_output=True, text=True)."""
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
        proc = start_module(module, args, cwd=cwd, env=env, out=out, err=err)
        proc.join(timeout)
        if proc.exitcode is None:
            kill_tree(proc.pid)  # torchrun's ranks too: they would outlive their agent
            proc.join(30)
            raise subprocess.TimeoutExpired([module, *args], timeout)
        read = lambda p: Path(p).read_text() if os.path.exists(p) else ""  # noqa: E731
        return subprocess.CompletedProcess(
            [sys.executable, "-m", module, *args], proc.exitcode, read(out), read(err)
        )
