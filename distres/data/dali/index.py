"""DALI's index files and pipeline checkpoints, checked before DALI sees them (DALI asserts in
C++ on what it cannot read), and the search for the image a failed batch could not decode
(DALI's error names neither shard nor key)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from distres.data.api import DataError, SampleKey
from distres.data.shards.read import ShardSet
from distres.data.shards.scan import default_cache_dir, node_order
from distres.io import atomic_write

IMAGE_EXTS = ("jpg", "jpeg", "png")  # the image member of a sample, first found wins


def _index_problem(line: str, tar_size: int) -> tuple[str | None, str]:
    """(what is wrong with one sample of a DALI index, or None; the sample's key). A line is
    `ext offset size name` per member (DALI's wds2idx format v1.2)."""
    parts = line.split()
    if len(parts) % 4 or not parts:
        return "malformed index line", line[:40]
    members = [parts[j : j + 4] for j in range(0, len(parts), 4)]
    key = members[0][3].split(".", 1)[0]
    exts = {m[0].lower() for m in members}
    try:
        end = max(int(m[1]) + int(m[2]) for m in members)
    except ValueError:
        return "malformed index line", key
    if end > tar_size:
        return f"lies past the end of the tar ({end} > {tar_size} bytes: truncated?)", key
    if not exts & set(IMAGE_EXTS):
        return "no .jpg/.jpeg/.png member", key
    if "cls" not in exts:
        return "no .cls member", key
    return None, key


def _protobuf_fields(raw: bytes) -> list[tuple[int, int, bytes | int]] | None:
    """The (field, wire type, value) of a serialized protobuf message, or None where the
    bytes are not a well-formed message (no schema needed for that)."""
    fields, i, n = [], 0, len(raw)

    def varint() -> int | None:
        nonlocal i
        value = shift = 0
        while i < n and shift < 64:
            byte = raw[i]
            i += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
        return None

    while i < n:
        key = varint()
        if key is None or key >> 3 == 0:
            return None
        kind = key & 7
        if kind == 0:
            value = varint()
        elif kind == 1 or kind == 5:
            size = 8 if kind == 1 else 4
            value, i = raw[i : i + size], i + size
        elif kind == 2:
            size = varint()
            if size is None or i + size > n:
                return None
            value, i = raw[i : i + size], i + size
        else:
            return None
        if value is None or i > n:
            return None
        fields.append((key >> 3, kind, value))
    return fields


def checkpoint_problem(raw: bytes) -> str | None:
    """Why bytes are not a DALI pipeline checkpoint, or None: the message must parse and hold
    one entry per operator, each naming its operator (what Pipeline.checkpoint() writes)."""
    fields = _protobuf_fields(raw)
    if not fields:
        return "not a DALI pipeline checkpoint (malformed)"
    for number, kind, value in fields:
        if number != 1:
            continue
        op = _protobuf_fields(value) if kind == 2 else None
        name = next((v for f, k, v in op or () if f == 1 and k == 2), None)
        if name is None:
            return "not a DALI pipeline checkpoint (an operator entry without a name)"
        try:
            name.decode("utf-8")
        except UnicodeDecodeError:
            return "not a DALI pipeline checkpoint (an operator name is not text)"
    if not any(number == 1 for number, _, _ in fields):
        return "not a DALI pipeline checkpoint (no operator entries)"
    return None


def checked_indexes(
    shards: ShardSet, workdir: Path, bad: Callable[[DataError], None]
) -> tuple[list[str], list[int]]:
    """Each shard's DALI index, checked: every sample has an image and a .cls and lies
    inside the tar. A bad sample goes to `bad` (data.on_bad_sample: it raises, or it
    reports and counts) and is left out of a filtered copy of the index, written in workdir.
    The index paths DALI should read, and their sample counts."""
    paths: list[str] = [""] * len(shards.urls)
    counts = [0] * len(shards.urls)
    for i in node_order(len(shards.urls)):  # the ranks of a node check disjoint parts first
        url, index = shards.urls[i], shards.dali_index(i)
        size = Path(url).stat().st_size
        clean, known = _clean_entry(index, size)
        if known is not None:  # checked before, unchanged since, and every sample was usable
            paths[i], counts[i] = index, known
            continue
        header, *lines = Path(index).read_text().splitlines()
        keep = []
        for line in lines:
            problem, key = _index_problem(line, size)
            if problem is None:
                keep.append(line)
            else:
                bad(DataError(f"{url}: sample {key!r}: {problem}"))
        if len(keep) < len(lines):
            index = str(workdir / f"{i:06d}.idx")
            Path(index).write_text(
                f"{header.split()[0]} {len(keep)}\n" + "".join(x + "\n" for x in keep)
            )
        else:  # a bad sample is reported on every run, per data.on_bad_sample: never cached
            with contextlib.suppress(OSError):  # a cache: an unwritable one is done without
                atomic_write(clean, str(len(keep)), durable=False)
        paths[i], counts[i] = index, len(keep)
    if not sum(counts):
        raise DataError(f"{shards.root}: no usable sample in the shard set")
    return paths, counts


def _clean_entry(index: str, tar_size: int) -> tuple[Path, int | None]:
    """The cache entry saying an index (path, size, mtime) was checked clean against a tar of
    this size, and its sample count if it says so: at ImageNet-21k's 14M samples, parsing
    every index is 40 s per rank, once per node and set with this."""
    st = os.stat(index)
    key = f"{os.path.realpath(index)}\0{st.st_size}\0{st.st_mtime_ns}\0{tar_size}"
    entry = default_cache_dir() / "index-check" / hashlib.sha256(key.encode()).hexdigest()[:32]
    try:
        return entry, int(entry.read_text())
    except (OSError, ValueError):
        return entry, None


def first_undecodable(urls: list[str], indexes: list[str], lo: int, hi: int) -> str | None:
    """`shard: sample 'key'` of the first image that does not decode among samples [lo, hi)
    of these shards, counted in order; None if all decode."""
    from PIL import Image

    position = 0
    for url, index in zip(urls, indexes, strict=True):
        lines = Path(index).read_text().splitlines()[1:]
        if position + len(lines) <= lo or position >= hi:
            position += len(lines)
            continue
        with open(url, "rb") as tar:
            for line in lines:
                position += 1
                if not lo <= position - 1 < hi:
                    continue
                parts = line.split()
                members = [parts[j : j + 4] for j in range(0, len(parts), 4)]
                image = next((m for m in members if m[0].lower() in IMAGE_EXTS), None)
                if image is None:
                    continue
                tar.seek(int(image[1]))
                try:
                    with Image.open(io.BytesIO(tar.read(int(image[2])))) as img:
                        img.load()
                except Exception as e:  # any decoder failure is the answer
                    key = image[3].rsplit(".", 1)[0]
                    return f"{url}: sample {key!r}: cannot decode image ({type(e).__name__})"
    return None


def unconsumed_indexes(
    urls: list[str], indexes: list[str], consumed: list[tuple[int, int]], out: Path
) -> tuple[list[str], list[str], int]:
    """Index files under `out` listing only the samples outside the `consumed` [start, end)
    ranges of the sequence the shards make in this order: (shards, their new index files,
    samples left). A shard with nothing left is dropped."""
    paths, index_paths, pos, total = [], [], 0, 0
    for i, (url, index_path) in enumerate(zip(urls, indexes, strict=True)):
        header, *lines = Path(index_path).read_text().splitlines()
        keep = [
            line for j, line in enumerate(lines) if not any(a <= pos + j < b for a, b in consumed)
        ]
        pos += len(lines)
        if keep:
            index = out / f"{i:06d}.idx"
            index.write_text(f"{header.split()[0]} {len(keep)}\n" + "\n".join(keep) + "\n")
            paths.append(url)
            index_paths.append(str(index))
            total += len(keep)
    return paths, index_paths, total


def repeated_indexes(
    urls: list[str], indexes: list[str], total: int, repeats: int, out: Path
) -> tuple[list[str], list[str], int]:
    """Repeated augmentation's sequence (data.aug_repeats=N, torchvision's RASampler): the
    first total // N samples of the shards in this order, N times over (index files under
    `out`). Sample j sits at k * total/N + j for k < N, which the reader's contiguous rank
    parts give to N different ranks (N <= world size), each augmenting it its own way."""
    out.mkdir(parents=True, exist_ok=True)
    paths, index_paths, kept = unconsumed_indexes(urls, indexes, [(total // repeats, total)], out)
    return paths * repeats, index_paths * repeats, kept * repeats


def verify_part(shards, urls: list[str], counts: list[int], start: int, end: int) -> None:
    """data.verify_checksums: the shards among `urls` (the reader's order) that overlap
    samples [start, end), once each."""
    position, by_url = 0, {u: i for i, u in enumerate(shards.urls)}
    for url in urls:
        i = by_url[url]
        if position < end and position + counts[i] > start:
            shards.verify(i)
        position += counts[i]


def failure_cause(e: BaseException) -> tuple[str, str | None]:
    """DALI's line about the data in one of its errors (it names the operator, and the file
    when it knows it), and the shard it names, if any."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()] or [type(e).__name__]
    cause = next(
        (x for x in lines if any(w in x for w in ("Malformed", "outside", ".tar"))),
        next((x for x in lines if "failure" in x or "rror:" in x), lines[-1]),
    )
    named = re.search(r"(/[^\s'\"]+\.tar)", str(e))
    return cause, named.group(1) if named else None


def sample_where(where) -> str:
    """`<shard>: sample 'key'` from DALI's source_info ("<tar path>:<offset>:<member name>")."""
    path, _, rest = bytes(np.asarray(where)).decode(errors="replace").rpartition(".tar:")
    return f"{path}.tar: sample {rest.split(':')[-1].rsplit('.', 1)[0]!r}"


def sample_key(where, shard_index: dict[str, int]) -> SampleKey:
    """The SampleKey of DALI's source_info ("<tar path>:<offset>:<member name>"): the tar's
    index in the shard set, the member's byte offset (tar order), and webdataset's key (the
    member name up to the first dot of its base name, as webdataset splits it)."""
    path, _, rest = bytes(np.asarray(where)).decode(errors="replace").rpartition(".tar:")
    offset, _, member = rest.partition(":")
    folder, _, base = member.rpartition("/")
    key = (f"{folder}/" if folder else "") + base.split(".", 1)[0]
    return SampleKey(shard_index[f"{path}.tar"], int(offset), key)


def pipeline_failure(
    error: RuntimeError, where: str, root: object, near: Callable[[], str | None]
) -> DataError:
    """The one-line DataError for a failed DALI run: the sample DALI names, else the first
    undecodable one `near()` finds (run once, on the way out), else the shard set."""
    cause, named = failure_cause(error)
    sample = named or near() or f"{root} (no sample near {where} fails to decode on the CPU)"
    return DataError(
        f"{sample}: DALI pipeline failed in {where} ({cause}); DALI decodes a batch as a "
        "whole, so a bad image stops the run under either data.on_bad_sample policy"
    )


def position_problem(dali_state: object) -> str | None:
    """Why a DALI loader's saved pipeline position (base64 of DALI's checkpoint) would not
    restore, or None."""
    import base64
    import binascii

    if not isinstance(dali_state, str):
        return "the DALI position is not text"
    try:
        raw = base64.b64decode(dali_state, validate=True)
    except (binascii.Error, ValueError):
        return "the DALI position is not base64"
    return checkpoint_problem(raw)
