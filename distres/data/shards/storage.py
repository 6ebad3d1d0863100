"""Where shards live: a local path, an object store (`s3://`, `gs://`), a web server
(`http(s)://`) or a command's output (`pipe:CMD`, webdataset's convention).

Object stores and HTTP go through fsspec (s3fs, gcsfs, its own aiohttp client), so the
ecosystem's own credentials and endpoints apply: `AWS_*` variables, profiles and
`AWS_ENDPOINT_URL` (MinIO, moto, R2...) through botocore; GCS's application default
credentials through google-auth. Every transfer is bounded: a read timeout turns a stalled
socket into an error, and `Transfer` retries 5xx answers, resets and truncated bodies with
backoff, resuming at the byte it reached, for at most `retries` attempts in a row without
progress. 401/403/404 and missing credentials are never retried: they are one line naming
the URL (`RemoteError.fatal`).
"""

from __future__ import annotations

import dataclasses
import os
import select
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import BinaryIO

from distres.data.shards.clients import filesystem
from distres.errors import DataError, DistresError, WriteError

REMOTE_SCHEMES = ("s3", "gs", "gcs", "http", "https")
CHUNK = 1 << 20  # bytes per read of a stream; the block of a ranged (seekable) header scan
BLOCK = 16 << 20  # bytes per ranged GET of an object store download


class RemoteError(DataError):
    """A remote shard or manifest that could not be read; the message names the URL.
    `fatal`: retrying cannot help (not found, access denied, no credentials)."""

    def __init__(self, message: str, fatal: bool = False):
        super().__init__(message)
        self.fatal = fatal


def is_pipe(url: str) -> bool:
    return url.startswith("pipe:")


def scheme(url: str) -> str:
    head, sep, _ = url.partition("://")
    return head.lower() if sep and head.isalnum() else ""


def is_remote(url: str) -> bool:
    """Read through a client or a command (and cached on the node), not opened as a file."""
    return is_pipe(url) or scheme(url) in REMOTE_SCHEMES


def check_scheme(url: str) -> None:
    s = scheme(url)
    if s and s not in (*REMOTE_SCHEMES, "file"):
        raise DataError(
            f"{url}: unsupported scheme {s}:// (shards can live at a local path, s3://, gs://, "
            "http(s):// or pipe:CMD)"
        )


def join(base: str, name: str) -> str:
    """`name` beside `base` (a directory URL or path)."""
    return base.rstrip("/") + "/" + name if "://" in base else os.path.join(base, name)


def parent(url: str) -> str:
    return url.rsplit("/", 1)[0] if "://" in url else os.path.dirname(url)


def basename(url: str) -> str:
    if is_pipe(url):  # the last word of the command that looks like a file name
        words = [w for w in url[5:].split() if "." in w.rsplit("/", 1)[-1]]
        return (words[-1] if words else url[5:]).rstrip("/").rsplit("/", 1)[-1]
    return url.rstrip("/").rsplit("/", 1)[-1]


@dataclasses.dataclass(frozen=True)
class Transfer:
    """How hard a remote read tries: `retries` attempts in a row without progress, waiting
    `backoff` seconds (doubling, at most 10) between them; `timeout`: seconds a connection
    or a socket read may stall."""

    retries: int = 5
    timeout: float = 60.0
    backoff: float = 0.5

    @property
    def patience(self) -> float:
        """The longest a transfer can go without a byte: every attempt stalling for the
        timeout, with the longest backoff between them."""
        return (self.timeout + 10.0) * (self.retries + 1)

    def run(
        self,
        url: str,
        attempt: Callable[[int], int],
        heartbeat: Callable[[], None] | None = None,
    ) -> int:
        """Call attempt(offset) until it returns without raising; it returns the offset it
        reached, and a retry resumes there. Progress resets the count of failures. A
        distres error that is not a remote one (a local write that failed) is not retried;
        `heartbeat` is called before each wait (those waiting for this transfer watch it)."""
        failures, offset, wait = 0, 0, self.backoff
        while True:
            try:
                return attempt(offset)
            except Progress as p:  # an attempt that broke off after some bytes
                error, reached = p.error, p.offset
            except Exception as e:
                error, reached = e, offset
            if isinstance(error, DistresError) and not isinstance(error, RemoteError):
                raise error
            error = classify(url, error)
            if error.fatal:
                raise error from None
            if reached > offset:
                failures, offset, wait = 0, reached, self.backoff
            failures += 1
            if failures >= self.retries:
                raise RemoteError(
                    f"{url}: gave up after {failures} attempts at byte {offset} ({error})"
                ) from None
            if heartbeat is not None:
                heartbeat()
            time.sleep(wait)
            wait = min(10.0, wait * 2)


class Progress(Exception):
    """An attempt that failed after reading up to `offset` (the retry resumes there)."""

    def __init__(self, error: BaseException, offset: int):
        super().__init__(str(error))
        self.error, self.offset = error, offset


def classify(url: str, e: BaseException) -> RemoteError:
    if isinstance(e, RemoteError):
        return e
    # the status first: fsspec's HTTP client reports any failed HEAD (a 503, a timeout)
    # as a FileNotFoundError caused by it
    status = _status(e)
    name = type(e).__name__
    text = str(e)
    if status == 404 or (status is None and isinstance(e, FileNotFoundError)):
        return RemoteError(f"{url}: not found (404)", fatal=True)
    denied = text.startswith(("Forbidden", "Unauthorized"))  # gcsfs: a bare OSError
    if status in (401, 403) or (status is None and (isinstance(e, PermissionError) or denied)):
        return RemoteError(
            f"{url}: access denied ({status or name}: check the credentials and their rights "
            "on it)",
            fatal=True,
        )
    if name in ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"):
        return RemoteError(f"{url}: no credentials found ({e})", fatal=True)
    return RemoteError(f"{url}: {name}: {text[:300] or 'no detail'}")


def _status(e: BaseException | None, depth: int = 0) -> int | None:
    """The HTTP status behind an error, the clients' wrappers looked through."""
    if e is None or depth > 4:
        return None
    found = _own_status(e)
    return found if found is not None else _status(e.__cause__ or e.__context__, depth + 1)


def _own_status(e: BaseException) -> int | None:
    for attr in ("status", "code"):
        value = getattr(e, attr, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value
    response = getattr(e, "response", None)
    if isinstance(response, dict):  # botocore's ClientError
        value = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return value if isinstance(value, int) else None
    return None


# -- object stores and HTTP (fsspec, through clients.py) ------------------------------------
def info(url: str, transfer: Transfer) -> dict:
    """{"size": bytes or None, "tag": an ETag or mtime or None} of one object (a HEAD)."""
    fs, path = filesystem(url, transfer.timeout)
    out: dict = {}

    def attempt(_):
        out.update(fs.info(path))
        return 0

    transfer.run(url, attempt)
    size = out.get("size")
    tag = out.get("ETag") or out.get("etag") or out.get("LastModified") or out.get("mtime")
    return {"size": int(size) if size is not None else None, "tag": str(tag) if tag else None}


def listdir(url: str, transfer: Transfer) -> dict[str, dict]:
    """{name: {"size", "tag"}} of the objects directly under a bucket prefix (s3, gs); one
    LIST (paged by the client)."""
    fs, path = filesystem(url, transfer.timeout)
    entries: list = []

    def attempt(_):
        entries[:] = fs.ls(path.rstrip("/"), detail=True, refresh=True)
        return 0

    try:
        transfer.run(url, attempt)
    except RemoteError as e:
        if "not found" in str(e):
            return {}
        raise
    out = {}
    for e in entries:
        if e.get("type") == "directory":
            continue
        tag = e.get("ETag") or e.get("etag") or e.get("LastModified") or e.get("mtime")
        out[e["name"].rsplit("/", 1)[-1]] = {"size": e.get("size"), "tag": str(tag)}
    return out


def read_bytes(url: str, transfer: Transfer, limit: int = 256 << 20) -> bytes:
    """A whole small object (a manifest, an index), retried."""
    buf = bytearray()

    def attempt(offset: int) -> int:
        del buf[offset:]
        for chunk in stream(url, offset, transfer.timeout):
            buf.extend(chunk)
            if len(buf) > limit:
                raise RemoteError(f"{url}: larger than {limit} bytes", fatal=True)
        return len(buf)

    transfer.run(url, _progressing(attempt, lambda: len(buf)))
    return bytes(buf)


def download(
    url: str,
    dest: BinaryIO,
    transfer: Transfer,
    size: int | None = None,
    heartbeat: Callable[[], None] | None = None,
) -> int:
    """Copy `url` into the open file `dest`, resuming at the byte reached after a fault;
    with a known `size`, a body that ends short is a fault (retried) and a longer one an
    error. A write to `dest` that fails (a full disk) is a WriteError, never retried.
    Returns the bytes written."""

    def attempt(offset: int) -> int:
        dest.seek(offset)
        dest.truncate()
        for chunk in stream(url, offset, transfer.timeout):
            try:
                dest.write(chunk)
            except OSError as e:
                raise WriteError(
                    f"{getattr(dest, 'name', 'the cache')}: cannot write {url}'s bytes "
                    f"({e.strerror or e}); free space or set data.cache_limit"
                ) from None
        reached = dest.tell()
        if size is not None and reached != size:
            raise Progress(
                RemoteError(f"{url}: body ended at byte {reached} of {size} (truncated)")
                if reached < size
                else RemoteError(f"{url}: {reached} bytes, its listing says {size}", fatal=True),
                reached,
            )
        return reached

    return transfer.run(url, _progressing(attempt, dest.tell), heartbeat=heartbeat)


def _progressing(attempt: Callable[[int], int], where: Callable[[], int]) -> Callable[[int], int]:
    """attempt, its failures tagged with the offset they reached."""

    def run(offset: int) -> int:
        try:
            return attempt(offset)
        except (Progress, WriteError):
            raise
        except Exception as e:
            raise Progress(e, where()) from None

    return run


def stream(url: str, offset: int, timeout: float) -> Iterator[bytes]:
    """The bytes of `url` from `offset` on, in chunks, in one request (or one command run)."""
    if is_pipe(url):
        yield from _pipe(url[5:], offset, timeout)
        return
    fs, path = filesystem(url, timeout)
    if scheme(url) in ("http", "https"):
        # one plain streaming GET (a server need not take Range requests)
        with fs.open(path, "rb", block_size=0) as f:
            if offset:
                _discard(f, offset)
            while chunk := f.read(CHUNK):
                yield chunk
        return
    # an object store: one ranged GET per BLOCK, with no HEAD before it (a short block is
    # the end; an empty range answers 416 or nothing)
    while True:
        try:
            chunk = fs.cat_file(path, start=offset, end=offset + BLOCK)
        except OSError as e:
            if _status(e) == 416 or "InvalidRange" in str(e):
                return
            raise
        if chunk:
            yield chunk
        if len(chunk) < BLOCK:
            return
        offset += len(chunk)


def _discard(f, n: int) -> None:
    while n > 0:
        got = f.read(min(n, CHUNK))
        if not got:
            raise EOFError(f"body ended before byte {n}")
        n -= len(got)


def _pipe(command: str, offset: int, timeout: float) -> Iterator[bytes]:
    """A command's standard output (webdataset's pipe:); a failed or stalled command is a
    fault, retried from the start (the bytes already written are skipped)."""
    # stderr to a file: a command that talks a lot there (curl's progress meter) must not
    # block on a full pipe nobody reads
    err = tempfile.TemporaryFile()  # noqa: SIM115 (closed in the finally below)
    proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=err, bufsize=0)
    try:
        fd, skip = proc.stdout.fileno(), offset
        while True:
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                raise TimeoutError(f"no output for {timeout:g} s")
            chunk = os.read(fd, CHUNK)
            if not chunk:
                break
            if skip:
                cut = min(skip, len(chunk))
                chunk, skip = chunk[cut:], skip - cut
            if chunk:
                yield chunk
        rc = proc.wait(timeout=timeout)
        if rc != 0:
            err.seek(max(0, err.seek(0, 2) - 400))
            said = err.read().decode(errors="replace").strip().replace("\n", " ")
            raise RemoteError(f"pipe:{command}: exit status {rc}" + (f" ({said})" if said else ""))
        if skip:
            raise EOFError(f"output ended before byte {offset}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        err.close()


def open_seekable(url: str, transfer: Transfer) -> BinaryIO:
    """A read-only file object over an object-store object (ranged reads of `CHUNK` blocks):
    reading tar headers without fetching the members between them. (A web server need not
    take ranges, and a command cannot seek: those are streamed.)"""
    fs, path = filesystem(url, transfer.timeout)
    return fs.open(path, "rb", block_size=CHUNK, cache_type="readahead")


def upload(local: str, url: str, transfer: Transfer) -> None:
    """Put a local file at `url` (s3, gs), retried as a whole."""
    if scheme(url) not in ("s3", "gs", "gcs"):
        raise DataError(f"{url}: can only write to s3:// or gs:// (or a local directory)")
    fs, path = filesystem(url, transfer.timeout)

    def attempt(_):
        fs.put_file(local, path)
        return 0

    transfer.run(url, attempt)
