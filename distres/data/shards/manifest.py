"""A shard set's manifest.json, its one reader and writer:

{"format": "distres-shards/1", "prefix": "train", "num_samples": 1436, "num_skipped": 0,
 "classes": {"0": 0, ...},                      # class name -> index
 "shards": [{"name": "train-000000.tar", "samples": 240, "bytes": ..., "sha256": ...,
             "index": "train-000000.idx"}],
 "skipped": [{"path": ..., "error": ...}]}
"""

from __future__ import annotations

from pathlib import Path

from distres.errors import USAGE, DataError
from distres.io import read_json_object, write_json

MANIFEST = "manifest.json"
FORMAT = "distres-shards/1"


class ShardError(DataError, ValueError):
    """A shard set or source that cannot be used as described; the message names the file.
    Found before training (shard sets are read then), so a usage error."""

    exit_code = USAGE


def manifest_of(item: str) -> Path | None:
    path = Path(item)
    if path.is_dir() and (path / MANIFEST).is_file():
        return path / MANIFEST
    if path.is_file() and path.suffix == ".json":
        return path
    return None


def read_manifest(path: Path) -> dict:
    manifest = read_json_object(path, ShardError)
    check_manifest(manifest, str(path))
    for shard in manifest["shards"]:
        if not (path.parent / shard["name"]).is_file():
            raise ShardError(f"{path.parent / shard['name']}: listed in {path} but missing")
    return manifest


def check_manifest(manifest: dict, path: str) -> None:
    """A ShardError naming `path` for the first thing wrong in a manifest's contents."""
    if manifest.get("format") != FORMAT:
        raise ShardError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT}")
    shards = manifest.get("shards") or []
    if not shards or not isinstance(shards, list):
        raise ShardError(f"{path}: lists no shards")
    classes = manifest.get("classes")
    if not isinstance(classes, dict) or not all(
        isinstance(v, int) and isinstance(k, str) for k, v in classes.items()
    ):
        raise ShardError(f"{path}: 'classes' must map class names to indices")
    for shard in shards:
        if not isinstance(shard, dict):
            raise ShardError(f"{path}: a shard entry that is not an object: {shard!r}")
        name, samples = shard.get("name"), shard.get("samples")
        if not isinstance(name, str) or not isinstance(samples, int) or samples < 0:
            raise ShardError(f"{path}: a shard entry without a name or sample count: {shard}")
        if Path(name).is_absolute() or ".." in Path(name).parts or "://" in name:
            raise ShardError(f"{path}: shard {name!r} is outside the manifest's directory")
        size = shard.get("bytes")
        if size is not None and (not isinstance(size, int) or size < 0):
            raise ShardError(f"{path}: shard {name!r} has bytes={size!r}")


def listed_in_manifest(tar: Path, seen: dict[Path, dict | None]) -> tuple[dict, dict] | None:
    """The manifest entry of a tar named directly when its directory has a manifest that
    lists it with the same size; None otherwise (the tar is then scanned). `seen` keeps each
    directory's manifest for the call, so a pattern over N shards reads it once, not N times."""
    if tar.parent not in seen:
        manifest, seen[tar.parent] = tar.parent / MANIFEST, None
        if manifest.is_file():
            try:
                m = read_manifest(manifest)
            except ShardError:
                m = None
            if m is not None:
                by_name = {entry["name"]: entry for entry in m["shards"]}
                seen[tar.parent] = {"shards": by_name, "classes": m["classes"]}
    listed = seen[tar.parent]
    entry = listed["shards"].get(tar.name) if listed else None
    if entry is None or entry.get("bytes") != tar.stat().st_size:
        return None
    return entry, listed["classes"]


def write_manifest(
    out: Path, prefix: str, classes: dict[str, int], shards: list[dict], skipped: list[dict] = ()
) -> dict:
    """Write <out>/manifest.json atomically (the writer tool and `shards index` both end here)."""
    manifest = {
        "format": FORMAT,
        "prefix": prefix,
        "num_samples": sum(s["samples"] for s in shards),
        "num_skipped": len(skipped),
        "classes": classes,
        "shards": shards,
        "skipped": list(skipped),
    }
    write_json(Path(out) / MANIFEST, manifest, indent=1)
    return manifest
