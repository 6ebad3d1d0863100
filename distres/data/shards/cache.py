"""The node-local cache of remote shards (`data.cache_dir`, `data.cache_limit`).

A remote shard is downloaded once per node, whatever the number of ranks and DataLoader
workers reading it, and read from local disk after that: epoch 2 of a set that fits makes no
request. The protocol is flock(2) on one lock file per shard, which the kernel releases when
its holder dies, so a SIGKILL at any moment leaves nothing the next start must clean:

- a downloader holds the shard's lock exclusively and writes `<name>.part`, renamed to
  `<name>` when complete (and checked: size, and the manifest's sha256 with
  data.verify_checksums): a partial download is never read, a stale `.part` is overwritten;
- a reader holds the lock shared while it reads, so eviction (least recently used first)
  passes over it; a reader waiting for another process's download waits on the lock, and
  gives up only when the `.part` stops growing for the transfer's whole retry budget;
- only files this cache wrote (`<24 hex>-<name>` in `<cache_dir>/shards/`) are ever
  evicted: local shards are never copied, counted or removed.

The limit bounds the finished files; shards being read or downloaded can exceed it by
what is in flight (a limit below the largest shard is refused at start). Prefetching stays
within it: a shard is fetched ahead only when room can be made for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from distres.data.shards import storage
from distres.data.shards.storage import RemoteError, Transfer
from distres.errors import DataError

log = logging.getLogger("distres")

_OURS = re.compile(r"^[0-9a-f]{24}-.+(?<!\.part)(?<!\.lock)$")
_PART = re.compile(r"^[0-9a-f]{24}-.+\.part$")


@dataclasses.dataclass(frozen=True)
class ShardCache:
    """Where remote shards are kept on this node and how they are fetched; picklable (the
    DataLoader workers rebuild their executors from it)."""

    root: Path
    limit: int = 0  # bytes of finished shards; 0: no limit
    prefetch: int = 2  # shards fetched ahead of each reader
    transfer: Transfer = dataclasses.field(default_factory=Transfer)

    @property
    def dir(self) -> Path:
        return Path(self.root) / "shards"

    def path_of(self, url: str) -> Path:
        digest = hashlib.sha256(url.encode()).hexdigest()[:24]
        name = re.sub(r"[^A-Za-z0-9._-]", "_", storage.basename(url))[-100:] or "shard"
        return self.dir / f"{digest}-{name}"

    def check_fits(self, what: str, sizes: dict[str, int | None]) -> None:
        """A ConfigError-like DataError when one shard alone exceeds the limit: it could
        never be cached, and waiting for room would never end."""
        if not self.limit:
            return
        known = {u: s for u, s in sizes.items() if s}
        if known:
            url, size = max(known.items(), key=lambda kv: kv[1])
            if size > self.limit:
                raise CacheLimitError(
                    f"data.cache_limit={self.limit} bytes is smaller than {what} shard {url} "
                    f"({size} bytes): raise the limit to at least one shard"
                )

    # -- reading --------------------------------------------------------------------------
    @contextlib.contextmanager
    def reading(
        self, url: str, size: int | None = None, sha256: str | None = None
    ) -> Iterator[Path]:
        """The local copy of `url`, downloaded here if no process on this node has it,
        kept from eviction until the block ends."""
        path = self.path_of(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = _open_lock(path)
            try:
                self._wait_lock(fd, fcntl.LOCK_SH, path, url)
                if _complete(path, size):
                    os.utime(path)  # most recently used
                    try:
                        yield path
                    finally:
                        _close(fd)  # releases the shared lock
                        fd = -1
                        # shards kept past the limit while read may go now
                        self._make_room(0, keep=None)
                    return
            finally:
                if fd >= 0:
                    _close(fd)
            failed = _FAILED.pop((str(self.root), url), None)
            if failed is not None:  # fetching it ahead spent its retry budget: the answer
                raise failed
            self.fetch(url, size, sha256)

    def fetch(self, url: str, size: int | None = None, sha256: str | None = None,
              ahead: bool = False) -> bool:  # fmt: skip
        """Make sure the node has `url` (one download per node). Fetching ahead never
        waits: False when another process holds the shard (it downloads or reads it) or no
        room can be made for it."""
        path = self.path_of(url)
        if _complete(path, size):
            return True
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _open_lock(path)
        try:
            if ahead:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    return False
            else:
                self._wait_lock(fd, fcntl.LOCK_EX, path, url)
            if _complete(path, size):
                return True
            if not self._make_room(size or 0, keep=path) and ahead:
                return False
            part = path.with_name(path.name + ".part")
            with open(part, "w+b") as f:
                # the .part's mtime moves while the download backs off or is checked:
                # readers waiting for it see a live download
                beat = lambda: os.utime(part)  # noqa: E731
                storage.download(url, f, self.transfer, size, heartbeat=beat)
                if sha256 is not None:
                    beat()
                    f.seek(0)
                    if _sha256(f) != sha256:
                        raise DataError(
                            f"{url}: sha256 differs from its manifest (the shard changed "
                            "or is damaged)"
                        )
            os.replace(part, path)
            _FAILED.pop((str(self.root), url), None)
            # downloads that ran side by side may together have passed the limit: back under
            # it, now that this one is done (only shards nobody reads go)
            self._make_room(0, keep=path)
            return True
        finally:
            _close(fd)

    def _wait_lock(self, fd: int, how: int, path: Path, url: str) -> None:
        """Take the lock; while another process holds it (downloading), wait as long as
        its `.part` keeps growing."""
        part = path.with_name(path.name + ".part")
        patience = self.transfer.patience
        last, since, pause = None, time.monotonic(), 0.01
        while True:
            try:
                fcntl.flock(fd, how | fcntl.LOCK_NB)
                return
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            try:
                st = part.stat()
                grown = (st.st_size, st.st_mtime_ns)  # bytes, or a heartbeat
            except FileNotFoundError:  # not started, or just renamed into place
                grown = None
            if grown != last:
                last, since = grown, time.monotonic()
            elif time.monotonic() - since > patience:
                raise RemoteError(
                    f"{url}: another process on this node has been downloading it with no "
                    f"progress for {patience:g} s (its lock: {path}.lock)"
                )
            time.sleep(pause)
            pause = min(0.02, pause * 2)  # a reader waiting for a prefetch: not long

    # -- eviction -------------------------------------------------------------------------
    def _make_room(self, size: int, keep: Path | None) -> bool:
        """Evict least recently used shards nobody reads until `size` more bytes fit under
        the limit (counting downloads in progress as far as they got); False when they do
        not (what is left is being read or written)."""
        if not self.limit:
            return True
        with _locked(self.dir / ".evict.lock"):
            files = []
            used = 0
            mine = (str(keep), f"{keep}.part")  # counted (not its stale .part), never evicted
            for entry in os.scandir(self.dir):
                ours = _OURS.match(entry.name) is not None
                if not (ours or _PART.match(entry.name)) or entry.path == mine[1]:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    st = entry.stat()
                    used += st.st_size
                    if ours and entry.path != mine[0]:
                        files.append((st.st_mtime, st.st_size, Path(entry.path)))
            for _, nbytes, victim in sorted(files):
                if used + size <= self.limit:
                    break
                if _evict(victim):
                    used -= nbytes
            return used + size <= self.limit

    # -- fetching ahead -------------------------------------------------------------------
    def ahead(self, items: list[tuple[str, int | None, str | None]], threads: int = 0) -> None:
        """Fetch these shards in the background, in order, at most `threads` (default:
        `prefetch`) at once per process and pool size."""
        if self.prefetch <= 0:
            return
        pool = _pool(threads or self.prefetch)
        for url, size, sha in items:
            key = (str(self.root), url)
            if key in _PENDING or key in _FAILED:
                continue
            _PENDING.add(key)
            pool.submit(self._ahead_one, url, size, sha)

    def _ahead_one(self, url: str, size: int | None, sha: str | None) -> None:
        try:
            self.fetch(url, size, sha, ahead=True)
        except RemoteError as e:  # the reader reports it (one budget per shard, not two)
            _FAILED[(str(self.root), url)] = e
        except Exception as e:  # the reader meets it again itself, and reports it
            log.debug(f"prefetch of {url} failed: {e}")
        finally:
            _PENDING.discard((str(self.root), url))


class CacheLimitError(DataError, ValueError):
    exit_code = 2  # a usage error: found before training


_PENDING: set[tuple[str, str]] = set()
_FAILED: dict[tuple[str, str], RemoteError] = {}  # fetched ahead, in vain: the reader's error
_POOLS: dict[tuple[int, int], _Pool] = {}


class _Pool:
    """Daemon threads taking downloads from a queue, in order. Not a ThreadPoolExecutor:
    the interpreter joins its threads at exit, so a run that stops early (max_steps, an
    early stop, a preemption) would first download the rest of its epoch. A download cut
    off at exit leaves a .part that the next one overwrites, and its lock dies with us."""

    def __init__(self, workers: int):
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        for n in range(workers):
            threading.Thread(target=self._run, name=f"distres-prefetch-{n}", daemon=True).start()

    def submit(self, fn, *args) -> None:
        self.queue.put((fn, args))

    def _run(self) -> None:
        while True:
            fn, args = self.queue.get()
            fn(*args)


def _pool(workers: int) -> _Pool:
    key = (os.getpid(), workers)  # a forked worker starts its own
    if key not in _POOLS:
        if not any(k[0] == os.getpid() for k in _POOLS):
            _PENDING.clear()  # the parent's, inherited by a fork
        _POOLS[key] = _Pool(workers)
    return _POOLS[key]


def _sha256(f) -> str:
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


# flock(2) belongs to the open file description, which a fork shares: a DataLoader worker
# forked while a prefetch thread held a shard's lock would keep it held for its whole life.
# The lock fds open in this process are tracked, and a forked child closes its copies.
_FDS: set[int] = set()
_FDS_LOCK = threading.Lock()


def _open_lock(path: Path) -> int:
    with _FDS_LOCK:
        fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        _FDS.add(fd)
    return fd


def _close(fd: int) -> None:
    with _FDS_LOCK:
        _FDS.discard(fd)
        os.close(fd)


def _after_fork_in_child() -> None:
    for fd in _FDS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _FDS.clear()
    _FDS_LOCK.release()


os.register_at_fork(
    before=_FDS_LOCK.acquire,
    after_in_parent=_FDS_LOCK.release,
    after_in_child=_after_fork_in_child,
)


def _complete(path: Path, size: int | None) -> bool:
    try:
        there = path.stat().st_size
    except FileNotFoundError:
        return False
    return size is None or there == size


def _evict(victim: Path) -> bool:
    """Remove a finished shard unless some process reads or writes it now."""
    fd = _open_lock(victim)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        _close(fd)
        return False
    try:
        victim.unlink(missing_ok=True)
        return True
    finally:
        _close(fd)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = _open_lock(path.with_suffix(""))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held only while listing and unlinking: brief
        yield
    finally:
        _close(fd)
