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

import os
from dataclasses import dataclass
from pathlib import Path

from distres.data.shards.manifest import (
    MANIFEST,
    ShardError,
    listed_in_manifest,
    manifest_of,
    read_manifest,
)
from distres.data.shards.scan import cached_index, scan_tar, sha256_file

__all__ = ["MANIFEST", "ShardError", "ShardSet", "expand_tars", "read_shard_set"]

_VERIFIED: set[str] = set()  # shards whose checksum this process has checked


@dataclass(frozen=True)
class ShardSet:
    """What a reader needs: the shard paths, their sample counts and the class map; the
    manifest's checksums and DALI index files where there are some (None: not known)."""

    root: Path
    urls: tuple[str, ...]
    counts: tuple[int, ...]
    classes: dict[str, int]
    sha256: tuple[str | None, ...] = ()
    indexes: tuple[str | None, ...] = ()

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def verify(self, i: int) -> None:
        """Check shard i against its manifest checksum, once per process."""
        url = self.urls[i]
        if url in _VERIFIED:
            return
        want = self.sha256[i] if self.sha256 else None
        if want is None:
            raise ShardError(
                f"{url}: data.verify_checksums=true but no checksum is known for it (index "
                "the set with python -m distres.data.shards index, which records them)"
            )
        if sha256_file(Path(url)) != want:
            raise ShardError(
                f"{url}: sha256 differs from its manifest (the shard changed or is damaged)"
            )
        _VERIFIED.add(url)

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


def read_shard_set(spec: str | os.PathLike | list) -> ShardSet:
    """Open a shard set from a manifest (or a directory holding one), a directory of tars, a
    brace pattern, one tar, or a list of these ('::'-joined in one string, as webdataset)."""
    from distres.config import shard_specs

    specs = shard_specs(spec if isinstance(spec, list) else str(spec))
    if not specs:
        raise ShardError("no shard set given")
    urls: list[str] = []
    counts: list[int] = []
    sums: list[str | None] = []
    indexes: list[str | None] = []
    classes: dict[str, int] = {}
    max_label = -1
    roots: list[Path] = []
    manifests: dict[Path, dict | None] = {}
    for item in specs:
        manifest = manifest_of(item)
        if manifest is not None:
            m = read_manifest(manifest)
            roots.append(manifest.parent)
            if classes and m["classes"] != classes:
                raise ShardError(f"{manifest}: its class map differs from {roots[0] / MANIFEST}")
            classes = classes or m["classes"]
            for shard in m["shards"]:
                urls.append(str(manifest.parent / shard["name"]))
                counts.append(int(shard["samples"]))
                sums.append(shard.get("sha256"))
                index = shard.get("index")
                indexes.append(str(manifest.parent / index) if index else None)
            continue
        for tar in expand_tars(item):
            roots.append(tar.parent)
            listed = listed_in_manifest(tar, manifests)
            if listed is not None:
                entry, known = listed
                counts.append(int(entry["samples"]))
                sums.append(entry.get("sha256"))
                index = entry.get("index")
                indexes.append(str(tar.parent / index) if index else None)
                classes = classes or known
            else:
                scan = scan_tar(tar)
                counts.append(scan["samples"])
                max_label = max(max_label, scan["max_label"])
                sums.append(None)
                indexes.append(None)
            urls.append(str(tar))
    if not urls:
        raise ShardError(f"{specs[0]}: lists no shards")
    for i in range(len(classes), max_label + 1):
        classes[str(i)] = i
    root = Path(os.path.commonpath([str(r) for r in roots])) if roots else Path(specs[0])
    return ShardSet(root, tuple(urls), tuple(counts), classes, tuple(sums), tuple(indexes))


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
