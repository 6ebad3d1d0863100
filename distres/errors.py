"""One family of errors a user can cause, each kind with its exit code: every command maps an
error to its exit code here and nowhere else, and the README's table is this one (a test
checks them against each other).

    0  completed or stopped early
    1  failed: an error nobody anticipated, or bad data found while training
    2  bad usage: a config key, an argument, or data found bad before training
    3  preempted: every rank stopped at the same step on a signal (requeue)
    4  non-finite training loss (the last good checkpoint stays "latest")
    5  a checkpoint or weights file that cannot be used
    6  an export whose outputs do not match the PyTorch model's (nothing kept)
    7  a write that failed: no space, no permission, a read-only or vanished filesystem
    8  the run directory belongs to another run that is still running
  130  interrupted by Ctrl-C: every rank stopped at the same step, with a checkpoint
"""

from __future__ import annotations

import errno

OK, FAILED, USAGE, PREEMPTED, NON_FINITE, CHECKPOINT, EXPORT, WRITE, LOCKED = range(9)
INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a Ctrl-C
# what each code means (the README's exit-code table, checked against this by a test)
EXIT_CODES: dict[int, str] = {
    OK: "completed or stopped early",
    FAILED: "failed: an unanticipated error, or bad data found while training",
    USAGE: "bad usage: a config key, an argument, or data found bad before training",
    PREEMPTED: "preempted: every rank stopped at the same step on a signal (requeue)",
    NON_FINITE: "non-finite training loss (the last good checkpoint stays latest)",
    CHECKPOINT: "a checkpoint or weights file that cannot be used",
    EXPORT: "an export whose outputs do not match the PyTorch model's (nothing kept)",
    WRITE: "a write that failed: no space, no permission, a read-only or vanished filesystem",
    LOCKED: "the run directory belongs to another run that is still running",
    INTERRUPTED: "interrupted by Ctrl-C: every rank stopped at the same step, with a checkpoint",
}
# how a run that ended without an error ended, by its summary's stop_reason
STOP_CODES: dict[str, int] = {
    "completed": OK,
    "early_stop": OK,
    "preempted": PREEMPTED,
    "interrupted": INTERRUPTED,
    "non_finite_loss": NON_FINITE,
}


class DistresError(Exception):
    """An error a user can act on: its message names the file, shard, key or config field,
    and `label` says what kind it is. A command prints `<command>: <label>: <message>` and
    exits with `exit_code`."""

    exit_code = FAILED
    label = "error"

    def with_exit_code(self, code: int) -> DistresError:
        """This error, exiting with `code` (bad data found before training is a usage error)."""
        self.exit_code = code
        return self


class ConfigError(DistresError, ValueError):
    """A user error in the configuration or the command line."""

    exit_code, label = USAGE, "config error"


class DataError(DistresError, RuntimeError):
    """A sample, shard or shard set that cannot be used; exit 1 while training, 2 before."""

    exit_code, label = FAILED, "data error"


class CheckpointError(DistresError, RuntimeError):
    """A checkpoint that cannot be used; the message names it and why."""

    exit_code, label = CHECKPOINT, "checkpoint error"


class WeightsError(DistresError, ValueError):
    """Weights (final/, a .safetensors or .pth file, inference.json) that cannot be used."""

    exit_code, label = CHECKPOINT, "weights error"


class ExportError(DistresError, ValueError):
    """A serving export that failed or did not match the PyTorch model (nothing was kept)."""

    exit_code, label = EXPORT, "export error"


class WriteError(DistresError, OSError):
    """A file the run could not write; the message names it, why, and what is intact."""

    exit_code, label = WRITE, "write error"


class RunDirLocked(DistresError, RuntimeError):
    """The run directory is another live run's; the message names that run."""

    exit_code, label = LOCKED, "run directory in use"


def why(e: OSError) -> str:
    """An OSError's cause in words a user acts on (ENOSPC: 'no space left on the device')."""
    known = {
        errno.ENOSPC: "no space left on the device",
        errno.EDQUOT: "disk quota exceeded",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.EROFS: "read-only filesystem",
        errno.ENOENT: "no such file or directory (was it removed, or a filesystem unmounted?)",
        errno.EIO: "input/output error",
        errno.ENOTDIR: "a file stands where a directory should be",
        errno.EISDIR: "a directory stands where a file should be",
    }
    return known.get(e.errno, e.strerror or type(e).__name__)


def report(prog: str, e: DistresError) -> int:
    """Print the one line for `e` on stderr; its exit code."""
    import sys

    print(f"{prog}: {e.label}: {e}", file=sys.stderr)
    return e.exit_code


def from_os_error(e: OSError) -> DistresError:
    """An OSError nobody anticipated (a file unreadable or vanished), as one line: exit 1."""
    where = f"{e.filename}: " if e.filename else ""
    return DistresError(f"{where}{why(e)}")
