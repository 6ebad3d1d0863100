"""What a ledger (distres.results.ledger) says about classes and samples: per-class accuracy, the
most-confused pairs, and two pictures: the confusion matrix (the N most confused classes when
there are many) and a gallery of the highest-loss images.

Everything here is bounded by the number of classes and of distinct (true, predicted) pairs,
never by a dense classes x classes matrix: at ImageNet-21k's 21,841 classes that matrix would
be 477M counts (3.8 GB as int64, several copies of it to sort), which is what once killed a
run at its end. `ClassStats` is fed the ledger's rows chunk by chunk as they are merged."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np

CONFUSION_PNG, GALLERY_PNG = "confusion_{split}.png", "hardest_{split}.png"
PAIRS_KEPT = 100  # most-confused pairs kept in the ledger's summary
SHOWN = 20  # classes in the confusion picture
HARDEST = 16  # samples in the gallery
_COMPACT = 1 << 22  # pending pair codes before they are summed (32 MB)


class ClassStats:
    """Per-class sums and sparse confusion counts, accumulated over chunks of rows: support,
    top-1 and top-5 hits, loss sum, and counts[(true, top-1 prediction)] for the pairs that
    occur; plus the `HARDEST` highest-loss rows."""

    def __init__(self, num_classes: int):
        c = self.num_classes = num_classes
        self.support = np.zeros(c, np.int64)
        self.hit1 = np.zeros(c, np.int64)
        self.hit5 = np.zeros(c, np.int64)
        self.loss = np.zeros(c, np.float64)
        self.total_loss = 0.0  # summed in row order, as the overall loss always was
        self._codes: list[np.ndarray] = []  # [summed pairs, then each chunk's since]
        self._counts: list[np.ndarray] = []
        self._pending = 0  # pair codes appended since the last sum
        self.hardest: list[dict] = []

    def update(self, label: np.ndarray, top: np.ndarray, loss: np.ndarray, rows=None) -> None:
        """A chunk: labels (n,), top-k predictions (n, k), losses (n,); `rows(indices)` gives
        the chunk's rows at those indices as dicts (for the gallery)."""
        c = self.num_classes
        label = label.astype(np.int64)
        for what, values in (("label", label), ("prediction", top)):
            if len(values) and not (values.min() >= 0 and values.max() < c):
                bad = values.min() if values.min() < 0 else values.max()
                raise ValueError(f"a {what} {int(bad)} outside the {c} classes")
        self.support += np.bincount(label, minlength=c)
        self.hit1 += np.bincount(label, weights=top[:, 0] == label, minlength=c).astype(np.int64)
        hit5 = (top == label[:, None]).any(axis=1)
        self.hit5 += np.bincount(label, weights=hit5, minlength=c).astype(np.int64)
        loss64 = loss.astype(np.float64)
        self.loss += np.bincount(label, weights=loss64, minlength=c)
        self.total_loss += float(loss64.sum())
        codes, counts = np.unique(label * c + top[:, 0].astype(np.int64), return_counts=True)
        self._codes.append(codes)
        self._counts.append(counts)
        self._pending += len(codes)
        # summed when the new codes outgrow the summed ones: amortised O(n log n) however
        # many distinct pairs there are (a fixed threshold re-sorted them on every chunk)
        if self._pending > max(_COMPACT, len(self._codes[0])):
            self._compact()
        if rows is not None and len(loss):
            self._keep_hardest(loss, rows)

    def _compact(self) -> None:
        if len(self._codes) > 1:
            codes = np.concatenate(self._codes)
            order = np.argsort(codes, kind="stable")
            codes = codes[order]
            counts = np.concatenate(self._counts)[order]
            del order
            starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
            self._codes, self._counts = [codes[starts]], [np.add.reduceat(counts, starts)]
        self._pending = 0

    def _keep_hardest(self, loss: np.ndarray, rows) -> None:
        best = np.argsort(-loss, kind="stable")[:HARDEST]  # ties: earlier rows first
        merged = self.hardest + rows(best)
        # highest loss first; ties keep the ledger's order (stable, earlier rows first)
        self.hardest = sorted(merged, key=lambda r: -r["loss"])[:HARDEST]

    def pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(true, predicted, count) of every pair that occurs, in (true, predicted) order."""
        self._compact()
        if not self._codes:
            empty = np.zeros(0, np.int64)
            return empty, empty, empty
        codes, counts = self._codes[0], self._counts[0]
        return codes // self.num_classes, codes % self.num_classes, counts

    def off_diagonal(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        true, pred, count = self.pairs()
        off = true != pred
        return true[off], pred[off], count[off]

    def most_confused(self, n: int) -> list[tuple[int, int, int]]:
        """The n largest off-diagonal counts as (true, predicted, count), largest first (ties:
        the lower class indices first)."""
        true, pred, count = self.off_diagonal()
        order = np.lexsort((pred, true, -count))[:n]
        return [(int(true[i]), int(pred[i]), int(count[i])) for i in order]

    def confused_classes(self, n: int) -> list[int]:
        """Up to n classes, taken from the most-confused pairs in order (all classes when there
        are at most n)."""
        if self.num_classes <= n:
            return list(range(self.num_classes))
        chosen: list[int] = []
        true, pred, count = self.off_diagonal()
        for i in np.lexsort((pred, true, -count)):
            for c in (int(true[i]), int(pred[i])):
                if c not in chosen:
                    chosen.append(c)
            if len(chosen) >= n:
                break
        return sorted(chosen[:n]) or list(range(n))

    def submatrix(self, chosen: list[int]) -> np.ndarray:
        """counts[true, predicted] restricted to the chosen classes (rows and columns)."""
        where = np.full(self.num_classes, -1, np.int64)
        where[chosen] = np.arange(len(chosen))
        true, pred, count = self.pairs()
        keep = (where[true] >= 0) & (where[pred] >= 0)
        sub = np.zeros((len(chosen), len(chosen)), np.int64)
        sub[where[true[keep]], where[pred[keep]]] = count[keep]
        return sub

    def table(self, names: list[str]) -> list[dict[str, Any]]:
        """One row per class: support, top-1 and top-5 accuracy, mean loss, and the class its
        samples are most often predicted as instead (with the count). A class with no sample
        has support 0 and no accuracy (None)."""
        true, pred, count = self.off_diagonal()
        # per true class, its largest off-diagonal count (ties: the lowest predicted class)
        order = np.lexsort((pred, -count, true))
        firsts, at = np.unique(true[order], return_index=True)
        other = np.full(self.num_classes, -1, np.int64)
        other_n = np.zeros(self.num_classes, np.int64)
        other[firsts], other_n[firsts] = pred[order][at], count[order][at]
        rows = []
        for i in range(self.num_classes):
            n = int(self.support[i])
            rows.append(
                {
                    "class": i,
                    "name": names[i],
                    "support": n,
                    "top1": float(self.hit1[i] / n) if n else None,
                    "top5": float(self.hit5[i] / n) if n else None,
                    "loss": float(self.loss[i] / n) if n else None,
                    "confused_with": int(other[i]) if other[i] >= 0 else None,
                    "confused_count": int(other_n[i]),
                }
            )
        return rows

    def summary(self, names: list[str]) -> dict[str, Any]:
        """What the ledger's summary keeps of the classes: the per-class table, the
        most-confused pairs, the confusion picture's classes and counts, the hardest rows."""
        chosen = self.confused_classes(SHOWN)
        return {
            "per_class": self.table(names),
            "most_confused": [list(p) for p in self.most_confused(PAIRS_KEPT)],
            "confusion": {"classes": chosen, "counts": self.submatrix(chosen).tolist()},
            "hardest": self.hardest,
        }


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display under Slurm or in CI
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(summary: dict, out: Path) -> Path:
    """The confusion matrix as a PNG: every class when there are at most SHOWN, else the
    SHOWN classes of the most-confused pairs (their rows and columns), counts in each cell."""
    plt = _pyplot()
    names = summary["classes"]
    chosen = summary["confusion"]["classes"]
    sub = np.asarray(summary["confusion"]["counts"], np.int64).reshape(len(chosen), len(chosen))
    size = max(5.0, 0.45 * len(chosen) + 2.5)
    fig, ax = plt.subplots(figsize=(size, size), constrained_layout=True)
    shown = np.log1p(sub)  # the diagonal would drown every confusion on a linear scale
    ax.imshow(shown, cmap="Blues")
    labels = [_clip(names[c], 24) for c in chosen]
    ax.set_xticks(range(len(chosen)), labels, rotation=90)
    ax.set_yticks(range(len(chosen)), labels)
    ax.set(xlabel="predicted", ylabel="true")
    top = shown.max() or 1.0
    for i, j in zip(*np.nonzero(sub), strict=True):
        white = shown[i, j] > 0.6 * top
        ax.text(j, i, str(sub[i, j]), ha="center", va="center", fontsize=7,
                color="white" if white else "black")  # fmt: skip
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


def plot_gallery(summary: dict, out: Path, commands: bool = False) -> Path:
    """The highest-loss samples, read back from their shards: each with its label, the
    prediction and its probability, and the loss. On a training split these are the
    mislabelled candidates."""
    plt = _pyplot()
    names = summary["classes"]
    hardest = summary["hardest"]
    images = read_images([(r["shard"], r["key"]) for r in hardest], commands)
    cols = min(4, max(1, len(hardest)))
    lines = max(1, -(-len(hardest) // cols))
    fig, axes = plt.subplots(
        lines, cols, figsize=(2.6 * cols, 2.9 * lines), squeeze=False, constrained_layout=True
    )
    for ax in axes.flat:
        ax.axis("off")
    for ax, r in zip(axes.flat, hardest, strict=False):
        image = images.get((r["shard"], r["key"]))
        if image is not None:
            ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
        ax.set_title(
            f"{_clip(r['key'], 18)}\nlabel {_clip(names[r['label']])}\n"
            f"pred {_clip(names[r['pred1']])} ({r['prob1']:.2f})  loss {r['loss']:.2f}",
            fontsize=7,
        )
    fig.suptitle(f"{summary['split']}: the {len(hardest)} highest-loss samples", fontsize=9)
    return _save(fig, out)


def read_images(wanted: list[tuple[str, str]], commands: bool = False) -> dict:
    """The images of (shard, key) samples as arrays, one pass over each shard named; a
    sample that is gone or undecodable is left out (its tile shows the text only).
    commands=False: a `pipe:` shard is not run (a summary file can be edited by anyone who
    can write the run directory; only the evaluation that read the shards runs them)."""
    import webdataset as wds
    from PIL import Image

    by_shard: dict[str, set[str]] = {}
    for shard, key in wanted:
        by_shard.setdefault(shard, set()).add(key)
    found: dict[tuple[str, str], np.ndarray] = {}
    for shard, keys in by_shard.items():
        if shard.startswith("pipe:") and not commands:
            continue
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


def draw(summary: dict, plots_dir: Path, commands: bool = False) -> dict[str, Path]:
    """Both pictures of a ledger's summary under plots_dir: {"confusion", "hardest"}
    (commands: see read_images)."""
    split = summary["split"]
    gallery = plots_dir / GALLERY_PNG.format(split=split)
    return {
        "confusion": plot_confusion(summary, plots_dir / CONFUSION_PNG.format(split=split)),
        "hardest": plot_gallery(summary, gallery, commands),
    }
