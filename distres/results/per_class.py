"""What a ledger (distres.results.ledger) says about classes and samples: per-class accuracy, the
confusion matrix, the most-confused pairs, and two pictures: the confusion matrix (the N most
confused classes when there are many) and a gallery of the highest-loss images."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np

CONFUSION_PNG, GALLERY_PNG = "confusion_{split}.png", "hardest_{split}.png"


def confusion(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[true, predicted] (top-1 predictions)."""
    flat = labels.astype(np.int64) * num_classes + predicted.astype(np.int64)
    return np.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class(
    labels: np.ndarray, top: np.ndarray, loss: np.ndarray, names: list[str]
) -> list[dict[str, Any]]:
    """One row per class: support, top-1 and top-5 accuracy, mean loss, and the class its
    samples are most often predicted as instead (with the count). A class with no sample
    has support 0 and no accuracy (None)."""
    c = len(names)
    support = np.bincount(labels, minlength=c)
    hit1 = np.bincount(labels, weights=top[:, 0] == labels, minlength=c)
    hit5 = np.bincount(labels, weights=(top == labels[:, None]).any(axis=1), minlength=c)
    loss_sum = np.bincount(labels, weights=loss.astype(np.float64), minlength=c)
    matrix = confusion(labels, top[:, 0], c)
    np.fill_diagonal(matrix, 0)
    rows = []
    for i in range(c):
        n = int(support[i])
        other = int(matrix[i].argmax())
        rows.append(
            {
                "class": i,
                "name": names[i],
                "support": n,
                "top1": float(hit1[i] / n) if n else None,
                "top5": float(hit5[i] / n) if n else None,
                "loss": float(loss_sum[i] / n) if n else None,
                "confused_with": other if matrix[i, other] else None,
                "confused_count": int(matrix[i, other]),
            }
        )
    return rows


def most_confused(matrix: np.ndarray, n: int) -> list[tuple[int, int, int]]:
    """The n largest off-diagonal counts as (true, predicted, count), largest first (ties:
    the lower class indices first)."""
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:n]
    pairs = [(int(i // len(off)), int(i % len(off)), int(off.flat[i])) for i in flat]
    return [p for p in pairs if p[2] > 0]


def confused_classes(matrix: np.ndarray, n: int) -> list[int]:
    """Up to n classes, taken from the most-confused pairs in order (all classes when there
    are at most n)."""
    if len(matrix) <= n:
        return list(range(len(matrix)))
    chosen: list[int] = []
    for true, pred, _ in most_confused(matrix, len(matrix) ** 2):
        for c in (true, pred):
            if c not in chosen and len(chosen) < n:
                chosen.append(c)
        if len(chosen) >= n:
            break
    return sorted(chosen) or list(range(n))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display under Slurm or in CI
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(summary: dict, rows: dict, out: Path, top_n: int = 20) -> Path:
    """The confusion matrix as a PNG: every class when there are at most top_n, else the
    top_n classes of the most-confused pairs (their rows and columns), counts in each cell."""
    plt = _pyplot()
    names = summary["classes"]
    matrix = confusion(rows["label"], rows["top"][:, 0], len(names))
    chosen = confused_classes(matrix, top_n)
    sub = matrix[np.ix_(chosen, chosen)]
    size = max(5.0, 0.45 * len(chosen) + 2.5)
    fig, ax = plt.subplots(figsize=(size, size), constrained_layout=True)
    shown = np.log1p(sub)  # the diagonal would drown every confusion on a linear scale
    ax.imshow(shown, cmap="Blues")
    labels = [_clip(names[c], 24) for c in chosen]
    ax.set_xticks(range(len(chosen)), labels, rotation=90)
    ax.set_yticks(range(len(chosen)), labels)
    ax.set(xlabel="predicted", ylabel="true")
    top = shown.max() or 1.0
    for i in range(len(chosen)):
        for j in range(len(chosen)):
            if sub[i, j]:
                ax.text(
                    j,
                    i,
                    str(sub[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if shown[i, j] > 0.6 * top else "black",
                )
    m = summary["metrics"]
    what = (
        f"{len(chosen)} most-confused of {len(names)} classes"
        if len(chosen) < len(names)
        else f"{len(names)} classes"
    )
    ax.set_title(
        f"{summary['split']}: {what}; top-1 {m['top1']:.4f} over {m['samples']} samples",
        fontsize=9,
    )
    return _save(fig, out)


def plot_gallery(summary: dict, rows: dict, out: Path, n: int = 16) -> Path:
    """The n highest-loss samples, read back from their shards: each with its label, the
    prediction and its probability, and the loss. On a training split these are the
    mislabelled candidates."""
    plt = _pyplot()
    names = summary["classes"]
    hardest = np.argsort(-rows["loss"], kind="stable")[:n]
    images = read_images([(rows["shard"][i], rows["key"][i]) for i in hardest])
    cols = min(4, max(1, len(hardest)))
    lines = max(1, -(-len(hardest) // cols))
    fig, axes = plt.subplots(
        lines, cols, figsize=(2.6 * cols, 2.9 * lines), squeeze=False, constrained_layout=True
    )
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, hardest, strict=False):
        image = images.get((rows["shard"][i], rows["key"][i]))
        if image is not None:
            ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
        label, pred = int(rows["label"][i]), int(rows["top"][i, 0])
        ax.set_title(
            f"{_clip(rows['key'][i], 18)}\nlabel {_clip(names[label])}\n"
            f"pred {_clip(names[pred])} ({rows['prob'][i, 0]:.2f})  loss {rows['loss'][i]:.2f}",
            fontsize=7,
        )
    fig.suptitle(f"{summary['split']}: the {len(hardest)} highest-loss samples", fontsize=9)
    return _save(fig, out)


def read_images(wanted: list[tuple[str, str]]) -> dict[tuple[str, str], np.ndarray]:
    """The images of (shard, key) samples as arrays, one pass over each shard named; a
    sample that is gone or undecodable is left out (its tile shows the text only)."""
    import webdataset as wds
    from PIL import Image

    by_shard: dict[str, set[str]] = {}
    for shard, key in wanted:
        by_shard.setdefault(shard, set()).add(key)
    found: dict[tuple[str, str], np.ndarray] = {}
    for shard, keys in by_shard.items():
        try:
            for sample in wds.tarfile_samples([{"url": shard}]):
                key = sample.get("__key__")
                if key not in keys:
                    continue
                data = sample.get("jpg") or sample.get("jpeg") or sample.get("png")
                with contextlib.suppress(Exception):  # undecodable: its tile shows text only
                    image = Image.open(io.BytesIO(data))
                    image.draft(image.mode, (256, 256))  # a tile is ~250 px: decode no more
                    image.thumbnail((256, 256))
                    found[(shard, key)] = np.asarray(image)
                keys.discard(key)
                if not keys:
                    break
        except Exception:  # a shard moved or unreadable since the ledger was written
            continue
    return found


def _clip(text: str, n: int = 14) -> str:
    text = text if len(text) <= n else text[: n - 1] + "…"
    return text.replace("$", r"\$")  # matplotlib reads $...$ as math: a class name is text


def _save(fig, out: Path) -> Path:
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def draw(summary: dict, rows: dict, plots_dir: Path) -> dict[str, Path]:
    """Both pictures of a ledger under plots_dir: {"confusion": path, "hardest": path}."""
    split = summary["split"]
    return {
        "confusion": plot_confusion(summary, rows, plots_dir / CONFUSION_PNG.format(split=split)),
        "hardest": plot_gallery(summary, rows, plots_dir / GALLERY_PNG.format(split=split)),
    }
