"""The writer tool's sources: an ImageFolder tree or a `path,label` table listed as items,
and each image encoded as the RGB JPEG a shard holds."""

from __future__ import annotations

import csv
import io
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from distres.data.shards.manifest import ShardError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


@dataclass(frozen=True)
class Item:
    path: str
    label: int
    class_name: str


def list_image_folder(
    src: Path, allow_empty_classes: bool = False
) -> tuple[list[Item], dict[str, int]]:
    """One folder per class; indices follow the sorted folder names (torchvision's rule). A
    class folder without images is refused, as torchvision's ImageFolder refuses it: it would
    shift the index of every later class."""
    class_dirs = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise ShardError(f"{src}: no class folders (expected an ImageFolder tree or a CSV/TSV)")
    classes = {d.name: i for i, d in enumerate(class_dirs)}
    items = []
    for d in class_dirs:
        found = [
            Item(str(f), classes[d.name], d.name)
            for f in sorted(d.rglob("*"))
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not found:
            if not allow_empty_classes:
                raise ShardError(
                    f"{d}: class folder without image files (class {classes[d.name]}; later "
                    "classes would shift); remove it, or pass --allow-empty-classes to keep it "
                    "as a class with no samples"
                )
            print(f"kept empty class folder {d} as class {classes[d.name]}", file=sys.stderr)
        items += found
    return items, classes


def list_table(src: Path) -> tuple[list[Item], dict[str, int]]:
    """`path,label` rows (tab-separated for .tsv); an optional header row is skipped."""
    delimiter = "\t" if src.suffix.lower() == ".tsv" else ","
    with open(src, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f, delimiter=delimiter) if r and any(c.strip() for c in r)]
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
        rows = rows[1:]
    if not rows:
        raise ShardError(f"{src}: no rows")
    for n, row in enumerate(rows, 1):
        if len(row) < 2:
            raise ShardError(f"{src}: row {n} {row!r}: expected path{delimiter}label")
    labels = [r[1].strip() for r in rows]
    if all(re.fullmatch(r"\d+", x) for x in labels):
        classes = {str(i): i for i in range(max(int(x) for x in labels) + 1)}
    else:
        classes = {name: i for i, name in enumerate(sorted(set(labels)))}
    items = []
    for row, label in zip(rows, labels, strict=True):
        path = Path(row[0].strip())
        path = path if path.is_absolute() else src.parent / path
        items.append(Item(str(path), classes[label], label))
    return items, classes


def list_source(src: Path, allow_empty_classes: bool = False) -> tuple[list[Item], dict[str, int]]:
    if src.is_dir():
        return list_image_folder(src, allow_empty_classes)
    if src.is_file() and src.suffix.lower() in (".csv", ".tsv", ".txt"):
        return list_table(src)
    raise ShardError(f"--src {src}: not an ImageFolder directory or a .csv/.tsv list")


# -- encoding -------------------------------------------------------------------------------


def encode_image(path: str, quality: int = 95, max_side: int = 0) -> bytes:
    """RGB baseline JPEG bytes: baseline RGB JPEGs no larger than max_side (0: any size) as
    they are; anything else decoded, shrunk to max_side if larger, and re-encoded.

    Progressive JPEGs are re-encoded as baseline: GPU decoders (nvJPEG's hardware engine,
    DALI's mixed decoder) take only baseline JPEGs on their fast path and decode progressive
    ones image by image with CPU Huffman decoding."""
    from PIL import Image

    with open(path, "rb") as f:
        data = f.read()
    img = Image.open(io.BytesIO(data))
    img.load()  # decodes fully: a corrupt or truncated file fails here, not at training
    too_big = max_side and max(img.size) > max_side
    progressive = img.info.get("progressive") or img.info.get("progression")
    if img.format == "JPEG" and img.mode == "RGB" and not too_big and not progressive:
        return data
    if too_big:
        # FFCV's max_resolution: the longer side to max_side, aspect kept; antialiased
        scale = max_side / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    if img.mode.startswith("I") or img.mode == "F":
        img = _to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.new("RGB", rgba.size, (255, 255, 255))
        img.paste(rgba, mask=rgba.getchannel("A"))
    else:
        img = img.convert("RGB")  # CMYK, grayscale, palette...
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _to_8bit(img):
    """16-bit and 32-bit integer or float grayscale scaled to 8 bits over its range; PIL's own
    convert clips every value above 255 to white instead."""
    import numpy as np
    from PIL import Image

    arr = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        top = 1.0 if arr.size and arr.max() <= 1.0 else max(float(arr.max(initial=0)), 1.0)
    elif img.mode.startswith("I;16") or arr.max(initial=0) <= 65535:
        top = 65535.0
    else:
        top = float(arr.max())
    scaled = np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def _encode_item(args: tuple[int, Item, int, int]) -> tuple[int, bytes | None, str | None]:
    index, item, quality, max_side = args
    try:
        return index, encode_image(item.path, quality, max_side), None
    except Exception as e:  # any decoder failure means an unusable file: report, skip, go on
        # Decoders name the in-memory buffer ("<_io.BytesIO object at 0x...>"): name the file,
        # so the report (and the manifest) is the same on every run.
        message = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", item.path, str(e))
        return index, None, f"{type(e).__name__}: {re.sub(r' at 0x[0-9a-fA-F]+', '', message)}"
