"""Files written whole or not at all, with one policy for the whole library, and JSON
objects read with one-line errors.

A write goes to a temporary file beside its target (same directory, so the same
filesystem), is flushed and fsynced, renamed over the target, and the directory is fsynced:
a reader sees the old file or the new one, never a part, and a crash leaves at most a
`.<name>.<random>.tmp` beside it, which `sweep` removes (a run does so at its start, in the
run directory, final/ and the ledger; the checkpoint store at each commit).
A write that fails (no space, no permission, a read-only or vanished filesystem) removes its
temporary file and raises WriteError naming the target and the cause.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

from distres.errors import WriteError, why

TMP_SUFFIX = ".tmp"


def atomic_write(path: str | os.PathLike, data: bytes | str, *, durable: bool = True) -> Path:
    """Write `data` to `path` whole or not at all (see the module doc). durable=False skips
    the fsyncs (for files a crash may lose: plots, caches)."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # a random name (concurrent writers of one target never share it), the mode a plain
        # open would give (the umask's, not mkstemp's 0600: outputs stay readable as before)
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}{TMP_SUFFIX}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise WriteError(f"{path}: cannot write ({why(e)})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise WriteError(f"{path}: cannot write ({why(e)})") from None
    if durable:
        fsync_dir(path.parent)
    return path


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = None,
               durable: bool = True) -> Path:  # fmt: skip
    # ASCII (non-ASCII as escapes): any reader's locale decodes it
    text = json.dumps(obj, indent=indent)
    return atomic_write(path, text + ("\n" if indent is not None else ""), durable=durable)


def read_json_object(path: str | os.PathLike, error: type[Exception] = ValueError) -> dict:
    """A JSON object from `path`, or `error` naming the file and what is wrong with it."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: missing") from None
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError included
        raise error(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise error(f"{path}: not a JSON object")
    return obj


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sweep(directory: str | os.PathLike) -> int:
    """Remove the temporary files crashed writes left in `directory`; how many."""
    n = 0
    for tmp in Path(directory).glob(f".*{TMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            tmp.unlink()
            n += 1
    return n
