"""`python -m distres.data.shards index SHARDS` (distres.cli.shards): make existing WebDataset
shards readable by distres without rewriting them (shards from webdataset's ShardWriter,
`tar`, another tool): a DALI index beside each tar (DALI's own `wds2idx`, where DALI is
installed) and a manifest.json with counts, a class map and checksums.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from distres.config import shard_specs
from distres.data.shards import storage
from distres.data.shards.cache import ShardCache
from distres.data.shards.manifest import MANIFEST, ShardError, write_manifest
from distres.data.shards.read import expand_tars
from distres.data.shards.scan import scan_tar, sha256_file, write_dali_index


def make_index(tar_path: Path) -> str | None:
    """Write DALI's index beside a shard with DALI's own tool; None where DALI is absent."""
    idx_path = tar_path.with_suffix(".idx")
    return idx_path.name if write_dali_index(tar_path, idx_path) else None


def index_shards(spec: str, out: Path | None = None, force: bool = False) -> dict:
    """Write manifest.json (counts, class map, checksums) and a DALI index beside each tar of
    existing shards, without rewriting them: shards from webdataset's ShardWriter or `tar`.
    Shards in a bucket (s3://, gs://) are read through the node-local cache and their index
    files and manifest uploaded beside them (the manifest last)."""
    items = shard_specs(spec)
    if any(storage.is_remote(item) for item in items):
        return _index_bucket(items, force)
    tars = [t for item in shard_specs(spec) for t in expand_tars(item)]
    root = out or Path(os.path.commonpath([str(t.resolve().parent) for t in tars]))
    if (root / MANIFEST).is_file() and not force:
        raise ShardError(f"{root / MANIFEST}: already there; pass --force to replace it")
    entries, max_label = [], -1
    for tar in tars:
        scan = scan_tar(tar)
        max_label = max(max_label, scan["max_label"])
        entries.append(
            {
                "name": os.path.relpath(tar.resolve(), root.resolve()),
                "samples": scan["samples"],
                "bytes": tar.stat().st_size,
                "sha256": sha256_file(tar),
                "index": (
                    os.path.relpath(tar.with_suffix(".idx").resolve(), root.resolve())
                    if make_index(tar)
                    else None
                ),
            }
        )
    classes = {str(i): i for i in range(max_label + 1)}
    root.mkdir(parents=True, exist_ok=True)
    return write_manifest(root, Path(entries[0]["name"]).stem.rsplit("-", 1)[0], classes, entries)


def _index_bucket(items: list[str], force: bool) -> dict:
    import braceexpand

    transfer, urls = storage.Transfer(), []
    for item in items:
        if storage.scheme(item) not in ("s3", "gs", "gcs"):
            raise ShardError(f"{item}: only shards in s3:// or gs:// can be indexed in place")
        if "{" in item or item.endswith(".tar"):
            urls += list(braceexpand.braceexpand(item))
        else:
            names = sorted(n for n in storage.listdir(item, transfer) if n.endswith(".tar"))
            urls += [storage.join(item, n) for n in names]
    if not urls:
        raise ShardError(f"{items[0]}: no .tar objects")
    root = storage.parent(urls[0])
    if any(storage.parent(u) != root for u in urls):
        raise ShardError(f"{items[0]}: index one bucket prefix at a time (tars under {root})")
    listing = storage.listdir(root, transfer)
    if MANIFEST in listing and not force:
        raise ShardError(f"{storage.join(root, MANIFEST)}: already there; pass --force")
    with tempfile.TemporaryDirectory(prefix="distres-index-") as stage:
        cache = ShardCache(Path(stage) / "cache", transfer=transfer)  # one tar at a time
        entries, max_label = [], -1
        for url in urls:
            name = storage.basename(url)
            if name not in listing:
                raise ShardError(f"{url}: not found")
            with cache.reading(url, listing[name]["size"]) as local:
                scan = scan_tar(local)
                idx = Path(stage) / (Path(name).stem + ".idx")
                has_index = write_dali_index(local, idx)
                entries.append({"name": name, "samples": scan["samples"],
                                "bytes": scan["bytes"], "sha256": sha256_file(local),
                                "index": idx.name if has_index else None})  # fmt: skip
            local.unlink()
            max_label = max(max_label, scan["max_label"])
            if has_index:
                storage.upload(str(idx), storage.join(root, idx.name), transfer)
        classes = {str(i): i for i in range(max_label + 1)}
        prefix = Path(entries[0]["name"]).stem.rsplit("-", 1)[0]
        manifest = write_manifest(Path(stage), prefix, classes, entries)
        storage.upload(str(Path(stage) / MANIFEST), storage.join(root, MANIFEST), transfer)
    return manifest
