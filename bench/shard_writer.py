"""Converting the same ImageFolder tree to shards three ways, side by side, in img/s.

    python3 bench/shard_writer.py [--images 2000] [--sizes 300,500] [--workers 0]
                                  [--shard-size 64MB] [--max-side 0] [--repeats 1]
                                  [--src-dir DIR] [--only distres,litdata,webdataset]

Generates the images once (a fixed seed; photo-like JPEGs of ImageNet-like sizes, a share of
them progressive, grayscale or PNG so that they need re-encoding; a handful of classes), or
reuses --src-dir's, then times:

  distres     `python -m distres.data.shards --src SRC --out DIR` as a subprocess: the whole
              command, interpreter start-up and imports included (the start-up alone is
              measured by `--help` and printed under the table); its output adds a DALI index
              per shard (where DALI is installed), the checksums and manifest.json
  litdata     `litdata.optimize` with the same number of worker processes, writing its chunks
  webdataset  a plain `webdataset.ShardWriter` loop in this process (one core, as it is
              usually written)

All three store what distres's policy stores: `encode_image` from distres.data.shards.sources
decides per image (baseline RGB JPEGs byte for byte, everything else re-encoded as RGB baseline
JPEG, --max-side), and the same shard bound (--shard-size) applies. Each sample holds the JPEG,
the label and the same JSON metadata. A writer whose package is not installed is skipped.
Besides seconds and img/s, each row gives the CPU seconds of all its processes (`cpu s`),
which other load on the machine moves much less than it moves the wall clock; how many cores
that other load took during the runs is printed above the table.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from distres.data.shards.sources import Item, encode_image, list_source
from distres.data.shards.write import parse_size

REPO = Path(__file__).resolve().parents[1]
# litdata asks PyPI for a newer version at each optimize() unless this is set (read on import;
# off by default in recent releases): a benchmark stays off the network.
os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")
CLASSES = 8
# --other: the images that need re-encoding, as a share of all (split evenly between these
# kinds). ImageNet-1k has few (a couple of dozen CMYK files and a PNG among 1.28M, some
# grayscale); web-scraped folders have more, and they are what the re-encoding path costs.
KINDS = ("progressive", "gray", "png")


# -- the source images ----------------------------------------------------------------------


def make_image(rng: np.random.Generator, lo: int, hi: int) -> Image.Image:
    """Smooth colour fields plus per-pixel grain: compresses about like a photo (~100 KB at
    quality 90 and 400 px, near ImageNet's mean), where smooth fields alone give files of a
    few KB that decode far faster than photos."""
    w, h = (int(x) for x in rng.integers(lo, hi + 1, 2))
    small = rng.integers(0, 256, (h // 16 + 2, w // 16 + 2, 3), dtype=np.uint8)
    smooth = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
    grain = rng.integers(-28, 29, (h, w, 3), dtype=np.int16)
    return Image.fromarray(np.clip(np.asarray(smooth, np.int16) + grain, 0, 255).astype(np.uint8))


def make_source(root: Path, images: int, sizes: tuple[int, int], other: float, seed: int) -> None:
    """An ImageFolder tree under root; reused when root already holds the same parameters."""
    params = {"images": images, "sizes": list(sizes), "other": other, "seed": seed}
    stamp = root / ".bench-params.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == params:
        return
    if root.exists() and any(root.iterdir()):
        raise SystemExit(f"--src-dir {root}: not empty and not made by this bench ({params})")
    rng = np.random.default_rng(seed)
    for c in range(CLASSES):
        (root / f"n{c:08d}").mkdir(parents=True, exist_ok=True)  # wnid-like folder names
    for i in range(images):
        img = make_image(rng, *sizes)
        folder = root / f"n{i % CLASSES:08d}"
        kind = KINDS[int(rng.integers(len(KINDS)))] if rng.random() < other else "jpeg"
        if kind == "png":
            img.save(folder / f"{i:07d}.png")
        elif kind == "gray":
            img.convert("L").save(folder / f"{i:07d}.JPEG", quality=90)
        else:
            img.save(folder / f"{i:07d}.JPEG", quality=90, progressive=kind == "progressive")
    stamp.write_text(json.dumps(params))


# -- the writers ----------------------------------------------------------------------------


def sample(item: Item, root: Path, quality: int, max_side: int) -> tuple[bytes, bytes]:
    """The JPEG (distres's policy, literally) and the metadata distres stores beside it."""
    meta = {"path": os.path.relpath(item.path, root), "class": item.class_name}
    return encode_image(item.path, quality, max_side), json.dumps(meta).encode()


def cpu_seconds() -> float:
    """User and system time of this process and its waited-for descendants (the subprocess,
    pool and litdata workers): unlike seconds, barely moved by other load on the machine."""
    usage = (resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return sum(u.ru_utime + u.ru_stime for u in usage)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def distres_cli(src: Path, out: Path, args: argparse.Namespace) -> tuple[int, str]:
    command = [sys.executable, "-m", "distres.data.shards", "--src", str(src), "--out", str(out)]
    command += ["--shard-size", str(args.shard_bytes), "--workers", str(args.workers)]
    command += ["--max-side", str(args.max_side), "--quality", str(args.quality)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout, installed or not
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"distres.data.shards failed (exit {proc.returncode}):\n{proc.stderr}")
    manifest = json.loads((out / "manifest.json").read_text())
    return manifest["num_samples"], f"{len(manifest['shards'])} shards, subprocess"


def litdata_item(index: int, items: list[Item], root: Path, quality: int, max_side: int) -> dict:
    import litdata

    item = items[index]
    jpeg, meta = sample(item, root, quality, max_side)
    # Typed as a JPEG kept byte for byte (max_quality=None: no quality estimate, no re-encode).
    # Given plain bytes (a flat struct of bytes and ints), litdata 0.2.76 also builds an Arrow
    # IPC footer for every chunk: a third of its workers' time here, and 25% more seconds.
    typed = litdata.Jpeg(bytes=jpeg, max_quality=None) if hasattr(litdata, "Jpeg") else jpeg
    return {"jpg": typed, "cls": item.label, "json": meta}


def litdata_optimize(src: Path, out: Path, args: argparse.Namespace) -> tuple[int, str]:
    # out of ~/.lightning: the caches it copies inputs and stages chunks through
    os.environ["DATA_OPTIMIZER_CACHE_FOLDER"] = str(out.parent / "litdata-cache" / "chunks")
    os.environ["DATA_OPTIMIZER_DATA_CACHE_FOLDER"] = str(out.parent / "litdata-cache" / "data")
    import litdata

    items, _ = list_source(src)
    # Inputs are indices, not paths: given paths that exist, optimize() copies every file into
    # its data cache before fn sees it (built for remote inputs; pure overhead on local disk).
    fn = functools.partial(
        litdata_item, items=items, root=src, quality=args.quality, max_side=args.max_side
    )
    litdata.optimize(
        fn=fn,
        inputs=list(range(len(items))),
        output_dir=str(out),
        chunk_bytes=args.shard_bytes,
        num_workers=args.workers,
        verbose=False,
    )
    index = json.loads((out / "index.json").read_text())
    n = sum(c["chunk_size"] for c in index["chunks"])
    return n, f"{len(index['chunks'])} chunks, {args.workers} workers"


def webdataset_loop(src: Path, out: Path, args: argparse.Namespace) -> tuple[int, str]:
    import webdataset as wds

    items, _ = list_source(src)
    out.mkdir(parents=True)
    written = 0
    # the loop users write: one process, encode, write; maxcount out of the way of maxsize
    with wds.ShardWriter(
        str(out / "train-%06d.tar"), maxcount=10**9, maxsize=args.shard_bytes, verbose=0
    ) as sink:
        for i, item in enumerate(items):
            try:
                jpeg, meta = sample(item, src, args.quality, args.max_side)
            except Exception:  # unreadable: skipped, as distres skips it
                continue
            sink.write({"__key__": f"{i:09d}", "jpg": jpeg, "cls": item.label, "json": meta})
            written += 1
        shards = sink.shard
    return written, f"{shards} shards, 1 process"


WRITERS = {"distres": distres_cli, "litdata": litdata_optimize, "webdataset": webdataset_loop}


def startup_seconds() -> float:
    """`python -m distres.data.shards --help`: the interpreter and imports in distres's row."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    runs = []
    for _ in range(2):  # the faster of two: the machine's other load only ever adds
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "distres.data.shards", "--help"], env=env,
                       capture_output=True, check=True)  # fmt: skip
        runs.append(time.perf_counter() - t0)
    return min(runs)


def busy_seconds() -> float | None:
    """CPU seconds the whole machine has spent so far (/proc/stat; None elsewhere). Less this
    bench's own, what other work took from the cores while it ran: with a core of two taken,
    2 workers get about 1, and seconds says less than cpu s."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split()[1:9]]  # user..steal
    except OSError:
        return None
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # not idle, iowait


def available(name: str) -> str | None:
    """None, or why the writer is skipped. Imported here, outside the timings."""
    try:
        importlib.import_module(name)
    except ImportError as e:
        return str(e)
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--sizes", default="300,500", help="each side drawn from LO,HI pixels")
    p.add_argument("--other", type=float, default=0.15, help="share that needs re-encoding")
    p.add_argument("--workers", type=int, default=0, help="distres's and litdata's (0: cores)")
    p.add_argument("--shard-size", default="64MB", help="the bound on every writer's shards")
    p.add_argument("--max-side", type=int, default=0, help="distres's --max-side (0: keep)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality when re-encoding")
    p.add_argument("--repeats", type=int, default=1, help="runs of each, interleaved; the best")
    p.add_argument("--src-dir", type=Path, help="keep the images here (reused when they match)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default=",".join(WRITERS), help="comma-separated writers to run")
    args = p.parse_args()
    args.workers = args.workers or os.cpu_count() or 1
    args.shard_bytes = parse_size(args.shard_size)
    lo, hi = (int(x) for x in args.sizes.split(","))
    names = args.only.split(",")
    skipped = {name: why for name in names if (why := available(name)) is not None}
    with tempfile.TemporaryDirectory(prefix="distres-bench-") as tmp:
        src = args.src_dir or Path(tmp) / "src"
        t0 = time.perf_counter()
        make_source(src, args.images, (lo, hi), args.other, args.seed)
        made = time.perf_counter() - t0
        files = [f for f in src.rglob("*") if f.is_file() and not f.name.startswith(".")]
        print(f"{len(files)} images ({sum(f.stat().st_size for f in files) / 1e6:.1f} MB, "
              f"{lo}-{hi} px, {args.other:.0%} to re-encode, {CLASSES} classes) ready in "
              f"{made:.1f} s; {os.cpu_count()} cores, {args.workers} workers, shards <= "
              f"{args.shard_bytes / 1e6:.0f} MB, best of {args.repeats}")  # fmt: skip
        runs: dict[str, list] = {name: [] for name in names if name not in skipped}
        start, busy, own = time.perf_counter(), busy_seconds(), cpu_seconds()
        for r in range(args.repeats):  # interleaved: each writer sees the machine's moods
            for name in runs:
                out = Path(tmp) / f"{name}-{r}" / "train"  # distres: the prefix is "train"
                out.parent.mkdir()
                t0, cpu0 = time.perf_counter(), cpu_seconds()
                n, notes = WRITERS[name](src, out, args)
                seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
                runs[name].append((seconds, n, cpu, dir_bytes(out), notes))
                shutil.rmtree(out.parent)  # the disk and the page cache for the next one
        if busy is not None:
            other = (busy_seconds() - busy - (cpu_seconds() - own)) / (time.perf_counter() - start)
            print(f"other work on this machine during the runs: {max(other, 0):.1f} of "
                  f"{os.cpu_count()} cores on average")  # fmt: skip
        print(f"{'writer':10} {'images':>7} {'seconds':>8} {'img/s':>8} {'cpu s':>7} "
              f"{'output MB':>10}  notes")  # fmt: skip
        for name in names:
            if name in skipped:
                print(f"{name:10} skipped ({skipped[name]})")
                continue
            seconds, n, cpu, size, notes = min(runs[name])
            print(f"{name:10} {n:>7} {seconds:>8.2f} {n / seconds:>8.1f} {cpu:>7.2f} "
                  f"{size / 1e6:>10.1f}  {notes}")  # fmt: skip
        if "distres" in runs:
            seconds, n = min(runs["distres"])[:2]
            startup = startup_seconds()
            rest = seconds - startup  # noisy: both are measured, on a machine doing other work
            rate = f"{n / rest:.1f} img/s" if rest > 0.25 * seconds else "too few images to tell"
            print(f"distres: {startup:.2f} s of its seconds is interpreter start-up and imports "
                  f"(`--help`); without it {rate}")  # fmt: skip


if __name__ == "__main__":
    main()
