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
import hashlib
import json
import os
import re
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = "distres-shards/1"
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_VERIFIED: set[str] = set()  # shards whose checksum this process has checked


class ShardError(ValueError):
    """A shard set or source that cannot be used as described; the message names the file."""


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
        return str(_cached_index(Path(self.urls[i])))


def default_cache_dir() -> Path:
    return Path(os.environ.get("DISTRES_CACHE") or Path.home() / ".cache" / "distres")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def split_key(name: str) -> tuple[str | None, str | None]:
    """(key, extension) of a tar member name, as webdataset splits it."""
    m = _KEY.match(name)
    return (m.group(1), m.group(2).lower()) if m else (None, None)


# -- reading --------------------------------------------------------------------------------
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
        manifest = _manifest_of(item)
        if manifest is not None:
            m = _read_manifest(manifest)
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
            listed = _listed_in_manifest(tar, manifests)
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


def _manifest_of(item: str) -> Path | None:
    path = Path(item)
    if path.is_dir() and (path / MANIFEST).is_file():
        return path / MANIFEST
    if path.is_file() and path.suffix == ".json":
        return path
    return None


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ShardError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ShardError(f"{path}: format {found!r}, expected {FORMAT}")
    shards = manifest.get("shards") or []
    if not shards:
        raise ShardError(f"{path}: lists no shards")
    classes = manifest.get("classes")
    if not isinstance(classes, dict) or not all(
        isinstance(v, int) and isinstance(k, str) for k, v in classes.items()
    ):
        raise ShardError(f"{path}: 'classes' must map class names to indices")
    for shard in shards:
        name, samples = shard.get("name"), shard.get("samples")
        if not isinstance(name, str) or not isinstance(samples, int) or samples < 0:
            raise ShardError(f"{path}: a shard entry without a name or sample count: {shard}")
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ShardError(f"{path}: shard {name!r} is outside the manifest's directory")
        if not (path.parent / name).is_file():
            raise ShardError(f"{path.parent / name}: listed in {path} but missing")
    return manifest


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


def _listed_in_manifest(tar: Path, seen: dict[Path, dict | None]) -> tuple[dict, dict] | None:
    """The manifest entry of a tar named directly when its directory has a manifest that
    lists it with the same size; None otherwise (the tar is then scanned). `seen` keeps each
    directory's manifest for the call, so a pattern over N shards reads it once, not N times."""
    if tar.parent not in seen:
        manifest, seen[tar.parent] = tar.parent / MANIFEST, None
        if manifest.is_file():
            try:
                m = _read_manifest(manifest)
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


# -- scanning tars that have no manifest ----------------------------------------------------
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
    _write_atomic(cached, json.dumps(result).encode())
    return result


def _cached_index(tar: Path) -> Path:
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


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


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
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    os.replace(tmp, out / MANIFEST)
    return manifest
