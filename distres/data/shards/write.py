"""WebDataset shards: the writer tool, the DALI index files, and the manifest.

    python -m distres.data.shards --src DIR_OR_LIST --out DIR [--shard-size 512MB] [--prefix train]
    python -m distres.data.shards --src DIR_OR_LIST --out s3://bucket/imagenet/train

A shard set is a directory of `<prefix>-NNNNNN.tar` files, a DALI index `<prefix>-NNNNNN.idx`
beside each (made by DALI's own `wds2idx` tool where DALI is installed), and `manifest.json`:

    {"format": "distres-shards/1", "prefix": "train", "num_samples": 1436, "num_skipped": 0,
     "classes": {"0": 0, ...},                      # class name -> index
     "shards": [{"name": "train-000000.tar", "samples": 240, "bytes": ..., "sha256": ...,
                 "index": "train-000000.idx"}],
     "skipped": [{"path": ..., "error": ...}]}

Each sample is `<key>.jpg` (RGB JPEG), `<key>.cls` (the label as ASCII digits, which is how
DALI's webdataset reader sees it too) and `<key>.json` (source path and class name). Readers
trust the manifest for sample counts, so every rank agrees on the steps per epoch before reading
a byte.

The source is an ImageFolder tree (one folder per class; class indices follow the sorted folder
names) or a CSV/TSV list of `path,label` rows (label an integer or a class name; relative paths
are taken from the list's folder). Inputs that are not RGB baseline JPEG (PNG, CMYK, grayscale,
palette, alpha, progressive JPEG) are re-encoded to RGB baseline JPEG, as are images whose longer
side exceeds --max-side; other JPEGs are stored byte for byte. Unreadable files are
reported, skipped and counted. Encoding runs on all cores.

Interrupted runs resume: a shard is written under a temporary name and renamed when complete,
and a journal records the completed shards and the next source item. Re-running the same
command continues after the last complete shard, so no sample is written twice, and the
result is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import re
import sys
import tarfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from distres.data.shards import storage
from distres.data.shards.index import make_index
from distres.data.shards.manifest import MANIFEST, ShardError, write_manifest
from distres.data.shards.scan import default_cache_dir, sha256_file
from distres.data.shards.sources import (
    Item,
    _encode_item,
    list_source,
)
from distres.io import write_json

# Per member: a pax extended header (512 + 512), the member's own header (512) and up to 511
# bytes of padding; a shard closes before the next sample could cross --shard-size.
TAR_HEADER = 2048


def _closed_size(offset: int) -> int:
    """A tar's size on disk once closed: two zero blocks, padded to 10 KiB records."""
    return -(-(offset + 1024) // 10240) * 10240


class TarWriter:
    """The tar webdataset's `TarWriter(path, mtime=0.0)` writes, byte for byte (member names
    and order, owner, mode, the pax header its float mtime brings), from the standard library:
    `import webdataset` imports torch, which was most of this command's start-up (~1.2 s of
    1.5 s on a 2-core machine). Written straight to the file, not through tarfile's
    stream mode: the same bytes with fewer copies."""

    def __init__(self, path: str):
        self.tar = tarfile.TarFile(path, mode="w")  # PAX (tarfile's default), as webdataset's

    @property
    def offset(self) -> int:
        return self.tar.offset

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        for ext in sorted(fields):  # webdataset's order
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(fields[ext]), 0.0, 0o444
            info.uname = info.gname = "bigdata"
            self.tar.addfile(info, io.BytesIO(fields[ext]))

    def close(self) -> None:
        self.tar.close()


class ShardWriter:
    """Samples in, complete shards out: each shard is written as `.tmp`, then renamed, indexed
    and checksummed, and reported to `on_shard` (which the resumable writer journals)."""

    def __init__(
        self,
        out: Path,
        prefix: str,
        max_count: int = 0,
        max_bytes: int = 0,
        first_shard: int = 0,
        on_shard: Callable[[dict], None] | None = None,
    ):
        self.out, self.prefix = out, prefix
        self.max_count, self.max_bytes = max_count, max_bytes
        self.next_shard, self.on_shard = first_shard, on_shard
        self._tar: TarWriter | None = None
        self._count = self._bytes = 0

    def _path(self) -> Path:
        return self.out / f"{self.prefix}-{self.next_shard:06d}.tar"

    def write(self, key: str, jpeg: bytes, label: int, meta: dict | None = None) -> None:
        size = len(jpeg) + 3 * TAR_HEADER + 128  # this sample's upper bound in the tar
        full = self._tar is not None and (
            (self.max_count and self._count >= self.max_count)
            or (self.max_bytes and _closed_size(self._bytes + size) > self.max_bytes)
        )
        if full:
            self.close_shard()
        if self._tar is None:
            # mtime 0: the same input gives byte-identical shards (and checksums).
            self._tar = TarWriter(str(self._path()) + ".tmp")
            self._count = self._bytes = 0
        sample = {"jpg": jpeg, "cls": str(int(label)).encode()}
        if meta is not None:
            sample["json"] = json.dumps(meta, ensure_ascii=False).encode()
        self._tar.write(key, sample)
        self._count += 1
        self._bytes = self._tar.offset  # the real size so far (headers included)

    def close_shard(self) -> dict | None:
        if self._tar is None:
            return None
        self._tar.close()
        self._tar = None
        path = self._path()
        os.replace(str(path) + ".tmp", path)
        entry = {
            "name": path.name,
            "samples": self._count,
            "bytes": path.stat().st_size,
            "sha256": sha256_file(path),
            "index": make_index(path),
        }
        self.next_shard += 1
        if self.on_shard is not None:
            self.on_shard(entry)
        return entry


def write_shards(
    samples: Iterable[tuple[str, bytes, int]],
    out_dir: str | os.PathLike,
    prefix: str,
    classes: dict[str, int],
    samples_per_shard: int,
) -> dict:
    """Write already-encoded (key, jpeg_bytes, label) triples as shards plus the manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = []
    writer = ShardWriter(out, prefix, max_count=samples_per_shard, on_shard=shards.append)
    for key, jpeg, label in samples:
        writer.write(key, jpeg, label)
    writer.close_shard()
    return write_manifest(out, prefix, classes, shards)


# -- sources --------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """'512MB', '1.5GiB', '100k', '4096' -> bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)(i?)b?\s*", text.lower())
    if not m:
        raise ValueError(f"--shard-size {text!r}: expected a size such as 512MB or 1GiB")
    number, unit, binary = m.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " kmgt".index(unit or " "))


# -- the resumable build --------------------------------------------------------------------


def _fingerprint(
    items: list[Item],
    classes: dict[str, int],
    prefix: str,
    max_bytes: int,
    quality: int,
    max_side: int = 0,
) -> str:
    settings = [prefix, max_bytes, quality, classes] + ([max_side] if max_side else [])
    h = hashlib.sha256(json.dumps(settings).encode())
    for item in items:
        h.update(f"{item.path}\0{item.label}\n".encode())
    return h.hexdigest()


def build_shard_set(
    src: str | os.PathLike,
    out: str | os.PathLike,
    shard_size: int,
    prefix: str = "train",
    workers: int = 0,
    quality: int = 95,
    progress: bool = True,
    allow_empty_classes: bool = False,
    max_side: int = 0,
) -> dict:
    """Write the source as a shard set (resuming an interrupted build); the manifest. `out`
    may be a bucket (s3://, gs://): see Bucket."""
    src = Path(src)
    bucket = Bucket(str(out), prefix) if storage.is_remote(str(out)) else None
    out = bucket.stage if bucket is not None else Path(out)
    items, classes = list_source(src, allow_empty_classes)
    if not items:
        raise ShardError(f"--src {src}: no image files found")
    out.mkdir(parents=True, exist_ok=True)
    journal_path = out / f".{prefix}-progress.json"
    if max_side < 0:
        raise ShardError(f"--max-side {max_side}: must be 0 (keep sizes) or a side in pixels")
    fingerprint = _fingerprint(items, classes, prefix, shard_size, quality, max_side)
    state = {"fingerprint": fingerprint, "shards": [], "next_item": 0, "skipped": []}
    if journal_path.is_file():
        previous = json.loads(journal_path.read_text())
        present = bucket.has if bucket is not None else lambda s: _written(out, s)
        if previous.get("fingerprint") == fingerprint and all(
            present(s) for s in previous["shards"]
        ):
            state = previous
    elif bucket is not None:
        bucket.check_no_set()
    elif (out / MANIFEST).is_file():
        manifest = json.loads((out / MANIFEST).read_text())
        if manifest.get("prefix") == prefix:
            raise ShardError(
                f"{out / MANIFEST}: a complete '{prefix}' set is already there; "
                "use another --out or --prefix"
            )
    for stale in out.glob(f"{prefix}-*.tar.tmp"):
        stale.unlink()  # the shard that was open when the last run stopped

    pending: list[dict] = []  # skips not yet covered by a complete shard

    def journal(entry: dict, next_item: int) -> None:
        """A shard is complete: items before next_item (and their skips) are final."""
        state["shards"].append(entry)
        state["next_item"] = next_item
        state["skipped"] += [p for p in pending if p["item"] < next_item]
        pending[:] = [p for p in pending if p["item"] >= next_item]
        write_json(journal_path, state)

    # The writer closes a full shard just before it writes the next sample, so at that moment
    # the first item not in a complete shard is the one being written.
    position = {"item": state["next_item"]}
    writer = ShardWriter(
        out,
        prefix,
        max_bytes=shard_size,
        first_shard=len(state["shards"]),
        on_shard=lambda entry: journal(
            bucket.put(entry) if bucket is not None else entry, position["item"]
        ),
    )
    root = src if src.is_dir() else src.parent
    todo = [(i, items[i], quality, max_side) for i in range(state["next_item"], len(items))]
    with _progress(progress, len(items), state["next_item"]) as advance:
        for index, jpeg, error in _encode_all(todo, workers):
            item = items[index]
            if error is not None:
                print(f"skipped {item.path}: {error}", file=sys.stderr)
                pending.append({"path": item.path, "error": error, "item": index})
            else:
                position["item"] = index
                meta = {"path": os.path.relpath(item.path, root), "class": item.class_name}
                writer.write(f"{index:09d}", jpeg, item.label, meta)
            advance()
        position["item"] = len(items)
        if writer.close_shard() is None:
            state["skipped"] += pending  # nothing was open: the last skips end the source
    manifest = write_manifest(
        out,
        prefix,
        classes,
        state["shards"],
        [{"path": s["path"], "error": s["error"]} for s in state["skipped"]],
    )
    if bucket is not None:
        bucket.put_manifest()  # last: a set without its manifest is not mistaken for whole
    journal_path.unlink(missing_ok=True)
    return manifest


def _written(out: Path, entry: dict) -> bool:
    return (out / entry["name"]).is_file() and sha256_file(out / entry["name"]) == entry["sha256"]


class Bucket:
    """`--out s3://bucket/prefix` (or gs://): shards are written in a local staging folder
    (under the cache directory, with the journal that resumes an interrupted build), each
    uploaded with its index as soon as it is complete and then removed locally, and the
    manifest uploaded last, so a half-written set is never mistaken for a complete one."""

    def __init__(self, url: str, prefix: str):
        if storage.scheme(url) not in ("s3", "gs", "gcs"):
            raise ShardError(f"--out {url}: shards can be written to a directory, s3:// or gs://")
        self.url, self.prefix = url.rstrip("/"), prefix
        self.transfer = storage.Transfer()
        key = hashlib.sha256(f"{self.url}\0{prefix}".encode()).hexdigest()[:16]
        self.stage = default_cache_dir() / "upload" / key

    def put(self, entry: dict) -> dict:
        for name in (entry["name"], entry.get("index")):
            if name:
                local = self.stage / name
                storage.upload(str(local), storage.join(self.url, name), self.transfer)
                local.unlink()
        return entry

    def has(self, entry: dict) -> bool:
        listing = storage.listdir(self.url, self.transfer)
        return (listing.get(entry["name"]) or {}).get("size") == entry["bytes"]

    def check_no_set(self) -> None:
        if MANIFEST not in storage.listdir(self.url, self.transfer):
            return
        there = json.loads(storage.read_bytes(storage.join(self.url, MANIFEST), self.transfer))
        if there.get("prefix") == self.prefix:
            raise ShardError(
                f"{storage.join(self.url, MANIFEST)}: a complete '{self.prefix}' set is "
                "already there; use another --out or --prefix"
            )

    def put_manifest(self) -> None:
        local = self.stage / MANIFEST
        storage.upload(str(local), storage.join(self.url, MANIFEST), self.transfer)
        local.unlink()


def _encode_all(todo: list, workers: int) -> Iterator[tuple[int, bytes | None, str | None]]:
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(todo) < 64:
        yield from map(_encode_item, todo)
        return
    with mp.get_context("spawn").Pool(workers) as pool:
        # imap keeps source order, so keys, shard contents and checksums are deterministic.
        yield from pool.imap(_encode_item, todo, chunksize=16)


class _progress:
    """A rich bar on stderr (a TTY), or nothing; used as `with _progress(...) as advance`."""

    def __init__(self, enabled: bool, total: int, done: int):
        self.enabled, self.total, self.done = enabled, total, done

    def __enter__(self) -> Callable[[], None]:
        if not self.enabled:
            return lambda: None
        from rich.console import Console
        from rich.progress import Progress

        self.bar = Progress(console=Console(stderr=True))
        self.bar.start()
        task = self.bar.add_task("writing shards", total=self.total, completed=self.done)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.stop()
