"""Shards that came without a manifest (`webdataset.ShardWriter`, `tar` in the ImageNet layout):
one pass over each tar's headers counts its samples (grouped by key as webdataset groups
them) and reads the `.cls` members for the class count. The result is cached per tar (path,
size, mtime) under `$DISTRES_CACHE/shard-scan/`, so every rank and every later run reads it
in a blink, and DALI's index files, when a shard has none beside it, are written there too
(DALI's own wds2idx)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tarfile
import tempfile
from pathlib import Path

from distres.data.shards.manifest import ShardError
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
    key = f"{tar.resolve()}\0{st.st_size}\0{st.st_mtime_ns}"
    return default_cache_dir() / "shard-scan" / hashlib.sha256(key.encode()).hexdigest()[:32]


def scan_tar(tar: Path) -> dict:
    """{"samples", "max_label", "bytes"} of a tar, from one pass over its headers (plus the
    small `.cls` members); cached by path, size and mtime."""
    cached = _cache_stem(tar).with_suffix(".json")
    if cached.is_file():
        try:
            return json.loads(cached.read_text())
        except ValueError:
            pass  # a damaged cache entry: scan again
    size = tar.stat().st_size
    samples, max_label, current = 0, -1, None
    try:
        with tarfile.open(tar, mode="r:") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                if member.offset_data + member.size > size:
                    raise ShardError(
                        f"{tar}: truncated (member {member.name!r} ends past the file's "
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
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ShardError(f"{tar}: unreadable tar ({type(e).__name__}: {e})") from None
    result = {"samples": samples, "max_label": max_label, "bytes": size}
    atomic_write(cached, json.dumps(result), durable=False)  # a cache: a crash may lose it
    return result


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
