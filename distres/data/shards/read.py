"""Reading shard sets: a manifest, a directory of tars, a brace pattern, one tar, or a list.

A shard set written by `python -m distres.data.shards` (or indexed in place by its `index`
command) has a `manifest.json`: sample counts, the class map, checksums and the DALI index of
each shard. Shards from elsewhere (`webdataset.ShardWriter`, `tar` in the ImageNet layout:
`KEY.jpg`, `KEY.cls`, optional `KEY.json`) are read as they are: one pass over each tar's
headers counts its samples (grouped by key as webdataset groups them) and reads the `.cls`
members for the class count. The result is cached per tar (path, size, mtime) under
`$DISTRES_CACHE/shard-scan/`, so every rank and every later run reads it in a blink, and DALI's
index files, when a shard has none beside it, are written there too (DALI's own wds2idx).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from distres.data.shards import storage
from distres.data.shards.cache import CacheLimitError, ShardCache
from distres.data.shards.manifest import (
    MANIFEST,
    ShardError,
    listed_in_manifest,
    manifest_of,
    read_manifest,
)
from distres.data.shards.remote import read_remote
from distres.data.shards.scan import cached_index, default_cache_dir, scan_tars, sha256_file
from distres.data.shards.storage import RemoteError

__all__ = ["MANIFEST", "ShardError", "ShardSet", "expand_tars", "read_shard_set"]

_VERIFIED: set[str] = set()  # shards whose checksum this process has checked


@dataclass(frozen=True)
class ShardSet:
    """What a reader needs: the shard URLs (local paths or remote URLs), their sample counts
    and the class map; the manifest's checksums and DALI index files, and each shard's size,
    where they are known (None: not known); the node-local cache remote shards go through."""

    root: Path | str
    urls: tuple[str, ...]
    counts: tuple[int, ...]
    classes: dict[str, int]
    sha256: tuple[str | None, ...] = ()
    indexes: tuple[str | None, ...] = ()
    sizes: tuple[int | None, ...] = ()
    cache: ShardCache | None = None

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def remote(self) -> bool:
        return any(storage.is_remote(u) for u in self.urls)

    def size(self, i: int) -> int | None:
        return self.sizes[i] if self.sizes else None

    def checksum(self, i: int) -> str | None:
        return self.sha256[i] if self.sha256 else None

    def shard_cache(self) -> ShardCache:
        return self.cache or ShardCache(default_cache_dir())

    def verify(self, i: int) -> None:
        """Check shard i against its manifest checksum, once per process (a remote shard:
        when it is downloaded, see `local`)."""
        url = self.urls[i]
        if url in _VERIFIED:
            return
        want = self.checksum(i)
        if want is None:
            raise ShardError(
                f"{url}: data.verify_checksums=true but no checksum is known for it (index "
                "the set with python -m distres.data.shards index, which records them)"
            )
        if storage.is_remote(url):
            return
        if sha256_file(Path(url)) != want:
            raise ShardError(
                f"{url}: sha256 differs from its manifest (the shard changed or is damaged)"
            )
        _VERIFIED.add(url)

    @contextlib.contextmanager
    def local(self, i: int, verify: bool = False) -> Iterator[Path]:
        """Shard i as a local file for the block's duration: itself, or (remote) its copy in
        the node-local cache, downloaded if this node has none (checked against the
        manifest's checksum when `verify`), kept from eviction meanwhile."""
        url = self.urls[i]
        if not storage.is_remote(url):
            yield Path(url)
            return
        sha = self.checksum(i) if verify else None
        with self.shard_cache().reading(url, self.size(i), sha) as path:
            yield path

    def prefetch(self, ids: list[int], verify: bool = False, threads: int = 0) -> None:
        """Start fetching these remote shards into the node-local cache (local ones need
        nothing), in order, `threads` at once (0: data.prefetch)."""
        todo = [(self.urls[i], self.size(i), self.checksum(i) if verify else None)
                for i in ids if storage.is_remote(self.urls[i])]  # fmt: skip
        if todo:
            self.shard_cache().ahead(todo, threads)

    def localized(self, verify: bool = False) -> ShardSet:
        """The same set with every remote shard replaced by its node-local copy (DALI reads
        files): all of them fetched now, so the cache must hold the whole set."""
        if not self.remote:
            return self
        cache = self.shard_cache()
        total = sum(s or 0 for s in self.sizes) if self.sizes else 0
        if cache.limit and total > cache.limit:
            raise CacheLimitError(
                f"{self.root}: data.backend=dali reads local files, so every remote shard is "
                f"kept in the node-local cache, but the set's {total} bytes exceed "
                f"data.cache_limit={cache.limit}; raise the limit or use data.backend=torch, "
                "which streams through a smaller cache"
            )
        urls = []
        for i, url in enumerate(self.urls):
            if storage.is_remote(url):
                cache.fetch(url, self.size(i), self.checksum(i) if verify else None)
                url = str(cache.path_of(url))
            urls.append(url)
        return dataclasses.replace(self, urls=tuple(urls), indexes=())

    def fingerprint(self) -> dict:
        """What a checkpoint records of the set it read: shard names and sample counts in
        order (`digest`), and, where every shard's is known, their checksums and sizes
        (compared only where both sides know them: indexing a set later, or reading it
        through pipe:, changes nothing). Where the shards live is not part of it: the same
        shards moved from a disk to a bucket are the same set."""

        def digest(values: list) -> str:
            return hashlib.sha256(json.dumps(values).encode()).hexdigest()

        names = [storage.basename(u) for u in self.urls]
        out = {
            "shards": len(self.urls),
            "samples": self.num_samples,
            "first": names[0],
            "last": names[-1],
            "digest": digest([names, list(self.counts)]),
        }
        for key, values in (("sha256", self.sha256), ("bytes", self.sizes)):
            if values and all(v is not None for v in values):
                out[key] = digest(list(values))
        return out

    def dali_index(self, i: int) -> str:
        """Shard i's DALI index file: the manifest's, one beside the tar, or one written to
        the cache by DALI's own tool."""
        known = self.indexes[i] if self.indexes else None
        if known and Path(known).is_file():
            return known
        beside = Path(self.urls[i]).with_suffix(".idx")
        if beside.is_file():
            return str(beside)
        return str(cached_index(Path(self.urls[i])))


def read_shard_set(spec: str | os.PathLike | list, cache: ShardCache | None = None) -> ShardSet:
    """Open a shard set from a manifest (or a directory holding one), a directory of tars, a
    brace pattern, one tar, or a list of these ('::'-joined in one string, as webdataset);
    each local or remote (s3://, gs://, http(s)://, pipe:). Remote shards are read through
    `cache` (None: the default cache directory, no limit)."""
    from distres.config import shard_specs

    specs = shard_specs(spec if isinstance(spec, list) else str(spec))
    if not specs:
        raise ShardError("no shard set given")
    transfer = cache.transfer if cache is not None else storage.Transfer()
    urls: list[str] = []
    counts: list[int] = []
    sums: list[str | None] = []
    indexes: list[str | None] = []
    sizes: list[int | None] = []
    classes: dict[str, int] = {}
    max_label = -1
    roots: list[str] = []
    manifests: dict[Path, dict | None] = {}
    for item in specs:
        if storage.is_remote(item):
            try:
                found = read_remote(item, transfer)
            except RemoteError as e:
                if e.fatal:  # not found, access denied: the user's to fix, before training
                    raise ShardError(str(e)) from None
                raise
            roots.append(found.root)
            if found.classes and classes and found.classes != classes:
                raise ShardError(f"{item}: its class map differs from {roots[0]}'s")
            classes = classes or found.classes
            max_label = max(max_label, found.max_label)
            for e in found.entries:
                urls.append(e.url)
                counts.append(e.samples)
                sums.append(e.sha256)
                indexes.append(e.index)
                sizes.append(e.size)
            continue
        storage.check_scheme(item)
        manifest = manifest_of(item)
        if manifest is not None:
            m = read_manifest(manifest)
            roots.append(str(manifest.parent))
            if classes and m["classes"] != classes:
                raise ShardError(f"{manifest}: its class map differs from {roots[0]}'s")
            classes = classes or m["classes"]
            for shard in m["shards"]:
                urls.append(str(manifest.parent / shard["name"]))
                counts.append(int(shard["samples"]))
                sums.append(shard.get("sha256"))
                index = shard.get("index")
                indexes.append(str(manifest.parent / index) if index else None)
                sizes.append(shard.get("bytes"))
            continue
        tars = expand_tars(item)
        listings = [listed_in_manifest(tar, manifests) for tar in tars]
        unlisted = [(tar, None, None) for tar, listed in zip(tars, listings, strict=True)
                    if listed is None]  # fmt: skip
        scans = iter(scan_tars(unlisted))
        for tar, listed in zip(tars, listings, strict=True):
            roots.append(str(tar.parent))
            if listed is not None:
                entry, known = listed
                counts.append(int(entry["samples"]))
                sums.append(entry.get("sha256"))
                index = entry.get("index")
                indexes.append(str(tar.parent / index) if index else None)
                classes = classes or known
            else:
                scan = next(scans)
                counts.append(scan["samples"])
                max_label = max(max_label, scan["max_label"])
                sums.append(None)
                indexes.append(None)
            sizes.append(tar.stat().st_size)
            urls.append(str(tar))
    if not urls:
        raise ShardError(f"{specs[0]}: lists no shards")
    for i in range(len(classes), max_label + 1):
        classes[str(i)] = i
    shards = ShardSet(_root(roots, specs[0]), tuple(urls), tuple(counts), classes, tuple(sums),
                      tuple(indexes), tuple(sizes), cache)  # fmt: skip
    if shards.remote:
        remote = {u: s for u, s in zip(urls, sizes, strict=True) if storage.is_remote(u)}
        shards.shard_cache().check_fits(str(shards.root), remote)
    return shards


def _root(roots: list[str], first: str) -> Path | str:
    """The set's place in messages: the common directory (or URL prefix) of its shards."""
    if not roots:
        return Path(first)
    if any(storage.is_remote(r) for r in roots):
        parts = [r.split("/") for r in roots]
        common = []
        for words in zip(*parts, strict=False):
            if len(set(words)) > 1:
                break
            common.append(words[0])
        joined = "/".join(common)
        return joined if "://" in joined or joined.startswith("pipe:") else roots[0]
    return Path(os.path.commonpath(roots))


def expand_tars(item: str) -> list[Path]:
    """The tars a directory, a brace pattern or a file name stands for, each one present."""
    import braceexpand

    path = Path(item)
    if path.is_dir():
        tars = sorted(p for p in path.iterdir() if p.suffix == ".tar" and p.is_file())
        if not tars:
            raise ShardError(f"{path}: no {MANIFEST} and no .tar files")
        return tars
    tars = [Path(p) for p in braceexpand.braceexpand(item)]
    for tar in tars:
        if not tar.is_file():
            raise ShardError(f"{tar}: no such shard (from {item!r})")
    return tars
