"""`python -m distres.data.shards index SHARDS` (distres.cli.shards): make existing WebDataset
shards readable by distres without rewriting them (shards from webdataset's ShardWriter,
`tar`, another tool): a DALI index beside each tar (DALI's own `wds2idx`, where DALI is
installed) and a manifest.json with counts, a class map and checksums.
"""

from __future__ import annotations

import os
from pathlib import Path

from distres.config import shard_specs
from distres.data.shards.manifest import MANIFEST, ShardError, write_manifest
from distres.data.shards.read import expand_tars
from distres.data.shards.scan import scan_tar, sha256_file, write_dali_index


def make_index(tar_path: Path) -> str | None:
    """Write DALI's index beside a shard with DALI's own tool; None where DALI is absent."""
    idx_path = tar_path.with_suffix(".idx")
    return idx_path.name if write_dali_index(tar_path, idx_path) else None


def index_shards(spec: str, out: Path | None = None, force: bool = False) -> dict:
    """Write manifest.json (counts, class map, checksums) and a DALI index beside each tar of
    existing shards, without rewriting them: shards from webdataset's ShardWriter or `tar`."""
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
