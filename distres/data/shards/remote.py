"""Shard sets that live in an object store, on a web server or behind a command: what
read_shard_set needs of them (names, sample counts, sizes, the class map), found with as few
requests as the source allows.

- a manifest (`.../manifest.json`, or a prefix holding one): one GET; its shards are then
  checked to exist, with their listed sizes, by one LIST per prefix (s3, gs) or a HEAD each
  (http, in parallel): a 403 or 404 is one line before training, not a fault mid-epoch;
- a brace pattern or a tar URL: the manifest beside the tars when it lists them with the
  same sizes, otherwise each tar is scanned (ranged reads of its headers on an object store)
  and the scan cached by URL, size and ETag, like a local scan;
- a prefix without a manifest (s3, gs): its `.tar` objects, listed.
"""

from __future__ import annotations

import dataclasses
import json
import re
from concurrent.futures import ThreadPoolExecutor

import braceexpand

from distres.data.shards import storage
from distres.data.shards.manifest import MANIFEST, ShardError, check_manifest
from distres.data.shards.scan import scan_tars
from distres.data.shards.storage import RemoteError, Transfer

_SAFE_NAME = re.compile(r"[A-Za-z0-9._/-]+")


@dataclasses.dataclass
class Entry:
    url: str
    samples: int
    size: int | None
    sha256: str | None = None
    index: str | None = None  # the DALI index's URL, where a manifest names one


@dataclasses.dataclass
class Found:
    entries: list[Entry]
    classes: dict[str, int]  # from a manifest; empty: labels scanned (max_label)
    max_label: int
    root: str


def listable(url: str) -> bool:
    return storage.scheme(url) in ("s3", "gs", "gcs")


def read_remote(item: str, transfer: Transfer) -> Found:
    storage.check_scheme(item)
    if item.endswith(".json"):
        return _from_manifest(item, transfer)
    if storage.is_pipe(item) or "{" in item or item.endswith(".tar"):
        return _from_tars(list(braceexpand.braceexpand(item)), item, transfer)
    manifest = storage.join(item, MANIFEST)
    if listable(item):
        listing = storage.listdir(item, transfer)
        if MANIFEST in listing:
            return _from_manifest(manifest, transfer)
        tars = sorted(name for name in listing if name.endswith(".tar"))
        if not tars:
            raise ShardError(f"{item}: no {MANIFEST} and no .tar objects under it")
        return _from_tars([storage.join(item, t) for t in tars], item, transfer, listing)
    try:
        return _from_manifest(manifest, transfer)
    except RemoteError as e:
        if "not found" not in str(e):
            raise
        raise ShardError(
            f"{item}: no {MANIFEST} there, and a web server cannot be listed: name the "
            "tars with a brace pattern (.../train-{000000..000099}.tar)"
        ) from None


def _get_manifest(url: str, transfer: Transfer) -> dict:
    raw = storage.read_bytes(url, transfer)
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        raise ShardError(f"{url}: not JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise ShardError(f"{url}: not a JSON object")
    check_manifest(manifest, url)
    return manifest


def _from_manifest(url: str, transfer: Transfer) -> Found:
    m = _get_manifest(url, transfer)
    base = storage.parent(url)
    if storage.is_pipe(url):
        # its names would be appended to a shell command: plain file names only
        for shard in m["shards"]:
            for name in (shard["name"], shard.get("index") or ""):
                if not _SAFE_NAME.fullmatch(name or "x"):
                    raise ShardError(
                        f"{url}: shard name {name!r} is not a plain file name (letters, "
                        "digits, . _ - /), which a pipe: manifest's names must be"
                    )
    entries = []
    for shard in m["shards"]:
        index = shard.get("index")
        entries.append(
            Entry(
                storage.join(base, shard["name"]),
                int(shard["samples"]),
                shard.get("bytes"),
                shard.get("sha256"),
                storage.join(base, index) if index else None,
            )
        )
    sizes = _sizes([e.url for e in entries], transfer)
    for e in entries:
        there = sizes[e.url]["size"]
        if e.size is not None and there is not None and there != e.size:
            raise ShardError(
                f"{e.url}: {there} bytes, but {url} lists {e.size} (the shard changed after "
                "its manifest was written)"
            )
        e.size = e.size if e.size is not None else there
    return Found(entries, dict(m["classes"]), -1, base)


def _from_tars(
    urls: list[str], item: str, transfer: Transfer, listing: dict | None = None
) -> Found:
    if storage.is_pipe(item):
        sizes = {u: {"size": None, "tag": None} for u in urls}
    elif listing is not None:
        sizes = {u: listing[storage.basename(u)] for u in urls}
    else:
        sizes = _sizes(urls, transfer)
    manifests: dict[str, dict | None] = {}
    entries, classes, max_label = [], {}, -1
    listings = [
        None if storage.is_pipe(u) else _beside(u, sizes[u]["size"], manifests, transfer)
        for u in urls
    ]
    unlisted = [(u, sizes[u]["size"], sizes[u]["tag"])
                for u, listed in zip(urls, listings, strict=True) if listed is None]  # fmt: skip
    scans = iter(scan_tars(unlisted, transfer))
    for url, listed in zip(urls, listings, strict=True):
        size = sizes[url]["size"]
        if listed is not None:
            shard, known = listed
            index = shard.get("index")
            base = storage.parent(url)
            entries.append(Entry(url, int(shard["samples"]), size, shard.get("sha256"),
                                 storage.join(base, index) if index else None))  # fmt: skip
            classes = classes or known
            continue
        scan = next(scans)
        max_label = max(max_label, scan["max_label"])
        entries.append(Entry(url, scan["samples"], size if size is not None else scan["bytes"]))
    root = item if storage.is_pipe(item) else storage.parent(urls[0])
    return Found(entries, classes, max_label, root)


def _beside(url: str, size: int | None, seen: dict, transfer: Transfer):
    """The manifest entry for `url` in its directory's manifest when it lists it with the
    same size (None otherwise: the tar is scanned); each directory's manifest read once."""
    base = storage.parent(url)
    if base not in seen:
        seen[base] = None
        try:
            m = _get_manifest(storage.join(base, MANIFEST), transfer)
            seen[base] = {"shards": {s["name"]: s for s in m["shards"]}, "classes": m["classes"]}
        except (RemoteError, ShardError):
            # no usable manifest there: the tar is scanned. (A bucket that only lets its
            # tars be read answers 403 for a missing key: not a reason to stop.)
            pass
    listed = seen[base]
    shard = listed["shards"].get(storage.basename(url)) if listed else None
    if shard is None or (size is not None and shard.get("bytes") != size):
        return None
    return shard, listed["classes"]


def _sizes(urls: list[str], transfer: Transfer) -> dict[str, dict]:
    """{url: {"size", "tag"}}, every one present: one LIST per prefix on an object store,
    a HEAD each (in parallel) on a web server; a missing one is a RemoteError naming it."""
    out: dict[str, dict] = {}
    pipes = [u for u in urls if storage.is_pipe(u)]
    for u in pipes:
        out[u] = {"size": None, "tag": None}
    listed = [u for u in urls if listable(u)]
    for base in dict.fromkeys(storage.parent(u) for u in listed):
        listing = storage.listdir(base, transfer)
        for u in listed:
            if storage.parent(u) == base:
                if storage.basename(u) not in listing:
                    raise RemoteError(f"{u}: not found (404)", fatal=True)
                out[u] = listing[storage.basename(u)]
    heads = [u for u in urls if u not in out]
    if heads:
        with ThreadPoolExecutor(min(16, len(heads))) as pool:
            for u, head in zip(heads, pool.map(lambda u: storage.info(u, transfer), heads),
                               strict=True):  # fmt: skip
                out[u] = head
    return out
