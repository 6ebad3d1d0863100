"""WebDataset shard writing and the manifest that describes a shard set.

A shard set is a directory of `<prefix>-NNNNNN.tar` files plus `manifest.json`:

    {"format": "distres-shards/1", "prefix": "train", "num_samples": 1436,
     "classes": {"0": 0, ...},                      # class name -> index
     "shards": [{"name": "train-000000.tar", "samples": 240, "bytes": ..., "sha256": ...}]}

Each sample is `<key>.jpg` (RGB JPEG) and `<key>.cls` (the label as ASCII digits, which is how
DALI's webdataset reader sees it too). Readers trust the manifest for sample counts, so every
rank can agree on the number of steps per epoch before reading a byte.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds

MANIFEST = "manifest.json"
FORMAT = "distres-shards/1"


class ShardError(ValueError):
    """A shard set that cannot be read as described; the message names the file."""


@dataclass(frozen=True)
class ShardSet:
    """What a reader needs: the shard paths, their sample counts and the class map."""

    root: Path
    urls: tuple[str, ...]
    counts: tuple[int, ...]
    classes: dict[str, int]

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_shards(
    samples: Iterable[tuple[str, bytes, int]],
    out_dir: str | os.PathLike,
    prefix: str,
    classes: dict[str, int],
    samples_per_shard: int,
) -> dict:
    """Write (key, jpeg_bytes, label) triples as tar shards, then the manifest.

    Tar members get mtime 0 so the same input gives byte-identical shards (and checksums).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = []
    writer, path, count = None, None, 0

    def close() -> None:
        if writer is not None:
            writer.close()
            shards.append(
                {
                    "name": path.name,
                    "samples": count,
                    "bytes": path.stat().st_size,
                    "sha256": _sha256(path),
                }
            )

    for key, jpeg, label in samples:
        if writer is None or count == samples_per_shard:
            close()
            path = out / f"{prefix}-{len(shards):06d}.tar"
            writer, count = wds.TarWriter(str(path), mtime=0.0), 0
        writer.write({"__key__": key, "jpg": jpeg, "cls": str(int(label)).encode()})
        count += 1
    close()
    manifest = {
        "format": FORMAT,
        "prefix": prefix,
        "num_samples": sum(s["samples"] for s in shards),
        "classes": classes,
        "shards": shards,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    return manifest


def read_shard_set(spec: str | os.PathLike) -> ShardSet:
    """Open a shard set from its directory or its manifest file."""
    path = Path(spec)
    manifest_path = path / MANIFEST if path.is_dir() else path
    if not manifest_path.is_file():
        raise ShardError(
            f"{manifest_path}: no shard manifest (write shard sets with "
            "python -m distres.data.shards)"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{manifest_path}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise ShardError(f"{manifest_path}: format {manifest.get('format')!r}, expected {FORMAT}")
    root = manifest_path.parent
    shards = manifest.get("shards") or []
    if not shards:
        raise ShardError(f"{manifest_path}: lists no shards")
    urls = []
    for shard in shards:
        shard_path = root / shard["name"]
        if not shard_path.is_file():
            raise ShardError(f"{shard_path}: listed in {manifest_path} but missing")
        urls.append(str(shard_path))
    return ShardSet(
        root, tuple(urls), tuple(int(s["samples"]) for s in shards), dict(manifest["classes"])
    )
