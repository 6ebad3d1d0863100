"""Shards that came without a manifest (`webdataset.ShardWriter`, `tar` in the ImageNet layout):
one pass over each tar's headers counts its samples (grouped by key as webdataset groups
them) and reads the `.cls` members for the class count. The result is cached per tar (path,
size, mtime) under `$DISTRES_CACHE/shard-scan/`, so every rank and every later run reads it
in a blink, and DALI's index files, when a shard has none beside it, are written there too
(DALI's own wds2idx)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
from pathlib import Path

from distres.data.shards import storage
from distres.data.shards.manifest import ShardError
from distres.data.shards.storage import Transfer
from distres.io import atomic_write

_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


def default_cache_dir() -> Path:
    return Path(os.environ.get("DISTRES_CACHE") or Path.home() / ".cache" / "distres")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- reading --------------------------------------------------------------------------------
def split_key(name: str) -> tuple[str | None, str | None]:
    """(key, extension) of a tar member name, as webdataset splits it."""
    m = _KEY.match(name)
    return (m.group(1), m.group(2).lower()) if m else (None, None)


def _cache_stem(tar: Path) -> Path:
    st = tar.stat()
    return _stem(f"{tar.resolve()}\0{st.st_size}\0{st.st_mtime_ns}")


def _stem(key: str) -> Path:
    return default_cache_dir() / "shard-scan" / hashlib.sha256(key.encode()).hexdigest()[:32]


def scan_tar(tar: Path | str, size: int | None = None, tag: str | None = None,
             transfer: Transfer | None = None) -> dict:  # fmt: skip
    """{"samples", "max_label", "bytes"} of a tar, from one pass over its headers (plus the
    small `.cls` members); cached by path, size and mtime (a remote tar: by URL, size and
    ETag). An object store's tar is read with ranged reads that skip the members between
    headers; an HTTP or pipe: tar is streamed once."""
    remote = isinstance(tar, str) and storage.is_remote(tar)
    if remote:
        cached = _stem(f"{tar}\0{size}\0{tag}").with_suffix(".json")
    else:
        tar = Path(tar)
        cached = _cache_stem(tar).with_suffix(".json")
    known = size is not None or not remote
    if known and (result := _cached(cached)) is not None:
        return result
    # a rank of the node scanning this tar now: wait for it, then read its result (only where
    # the result is cached; a pipe: or sizeless URL is scanned by each reader)
    with _scanning(cached) if known else contextlib.nullcontext():
        if known and (result := _cached(cached)) is not None:
            return result
        result = _scan_once(tar, remote, size, transfer)
        with contextlib.suppress(OSError):  # a cache: unwritable (read-only home), lost
            atomic_write(cached, json.dumps(result), durable=False)
    return result


def scan_tars(items: list[tuple], transfer: Transfer | None = None) -> list[dict]:
    """scan_tar of each (tar, size, tag), shared by the ranks of a node: each rank starts at
    its own part of the list (LOCAL_RANK of LOCAL_WORLD_SIZE) and goes round, so the ranks
    scan disjoint parts, then read each other's results from the cache; a tar another rank is
    scanning is waited for (its lock), never scanned twice. With ranks on several nodes
    sharing $DISTRES_CACHE, every rank of the job shares the work the same way."""
    results: list[dict | None] = [None] * len(items)
    for i in node_order(len(items)):
        tar, size, tag = items[i]
        results[i] = scan_tar(tar, size, tag, transfer)
    return results  # type: ignore[return-value]


def node_order(n: int) -> list[int]:
    """0..n-1 starting at this rank's part of the node's and going round: the ranks of a node
    that each visit every item start on disjoint parts (torchrun's LOCAL_RANK of
    LOCAL_WORLD_SIZE, or srun's SLURM_LOCALID of SLURM_NTASKS_PER_NODE)."""
    from distres.dist import read_env  # here: the shards command does without torch

    env = read_env()
    local_world = max(1, env.local_world_size)
    start = n * min(env.local_rank, local_world - 1) // local_world
    return [*range(start, n), *range(start)]


def _cached(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or a damaged entry: scan (again)
        return None


@contextlib.contextmanager
def _scanning(cached: Path):
    """An exclusive flock on <entry>.lock while one rank scans; the kernel drops it when its
    holder dies, so a killed scan never blocks the next start. A filesystem without flock
    (some Lustre and NFS mounts) or a lock file another user owns: scan without it (the
    worst case is a tar scanned twice)."""
    import fcntl

    fd = None
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(cached.with_suffix(".lock"), os.O_RDONLY | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        pass
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _scan_once(tar, remote: bool, size: int | None, transfer: Transfer | None) -> dict:
    if not remote:
        size = tar.stat().st_size
        with open(tar, "rb") as f:
            result = _scan(f, str(tar), size, "r:")
    else:
        transfer = transfer or storage.Transfer()
        out: dict = {}

        def attempt(_):
            if storage.scheme(tar) in ("s3", "gs", "gcs"):
                with storage.open_seekable(tar, transfer) as f:
                    out.update(_scan(f, tar, size, "r:"))
            else:
                with _Stream(tar, transfer.timeout) as f:
                    out.update(_scan(f, tar, size, "r|"))
            return 0

        transfer.run(tar, attempt)
        result = out
    return result


def _scan(f, name: str, size: int | None, mode: str) -> dict:
    samples, max_label, current = 0, -1, None
    try:
        with tarfile.open(fileobj=f, mode=mode) as archive:
            for member in archive:
                if not member.isfile():
                    continue
                if size is not None and member.offset_data + member.size > size:
                    raise ShardError(
                        f"{name}: truncated (member {member.name!r} ends past the file's "
                        f"{size} bytes)"
                    )
                key, ext = split_key(member.name)
                if key is None:
                    continue
                if key != current:
                    samples, current = samples + 1, key
                if ext == "cls":
                    raw = archive.extractfile(member).read(32)
                    # a bad label is the reader's to report, per data.on_bad_sample
                    with contextlib.suppress(UnicodeDecodeError, ValueError):
                        max_label = max(max_label, int(raw.decode("ascii").strip()))
    except storage.RemoteError:
        raise
    except (tarfile.TarError, OSError, EOFError) as e:
        if storage.is_remote(name) and not isinstance(e, tarfile.TarError):
            raise  # a network fault: the transfer retries it
        raise ShardError(f"{name}: unreadable tar ({type(e).__name__}: {e})") from None
    return {"samples": samples, "max_label": max_label, "bytes": size}


class _Stream(io.RawIOBase):
    """A read-only, forward-only file over storage.stream (tarfile's "r|" mode)."""

    def __init__(self, url: str, timeout: float):
        self.chunks, self.buf, self.position = storage.stream(url, 0, timeout), b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self.buf:
            chunk = next(self.chunks, None)
            if chunk is None:
                return 0
            self.buf = chunk
        n = min(len(b), len(self.buf))
        b[:n], self.buf = self.buf[:n], self.buf[n:]
        self.position += n
        return n

    def close(self) -> None:
        close = getattr(self.chunks, "close", None)
        if close is not None:
            close()
        super().close()


def cached_index(tar: Path) -> Path:
    """A DALI index for a tar without one, written once to the cache by DALI's wds2idx."""
    target = _cache_stem(tar).with_suffix(".idx")
    if not target.is_file() and not write_dali_index(tar, target):
        raise ShardError(f"{tar}: no DALI index and DALI's wds2idx is not installed")
    return target


def write_dali_index(tar: Path, target: Path) -> bool:
    """Write DALI's index of `tar` to `target` with DALI's own tool (atomically: concurrent
    ranks may write the same one); False where DALI is not installed."""
    try:
        from wds2idx import IndexCreator  # installed with nvidia-dali
    except ImportError:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".idx.tmp")
    os.close(fd)
    try:
        with IndexCreator(str(tar), tmp, verbose=False) as creator:
            creator.create_index()
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return True
