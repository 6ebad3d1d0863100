"""How every per-sample and per-class structure grows with the data: time and peak memory of each
stage at N samples, and the growth exponent fitted across N (time ~ N^k).

The shard sets are real tars, but one template tar of 1,000 tiny samples is hard-linked into
N/1,000 shards (ImageNet-1k's ~1,280 shards at 1.28M, ImageNet-21k's 14,000 at 14M), so every
size is built in seconds and its manifest, DALI indexes and tar headers are what a real set of
that size has. Each stage runs in a process of its own; its peak is that process's high-water
mark (VmHWM, imports included: "base" is the process after its imports, before the stage).

Stages: the manifest read; a foreign set (no manifest) scanned first and from the cache, by one
rank and by the 2 ranks of a node together; DALI's index checks (cold); start-up to the first
batch of rank 0 of 8 (torch backend, and DALI's on the CPU where it is installed, its index
checks then cached) and its data position in the rank file (size, save, load); the
ledger's sorted runs of one rank of 8, rank 0's merge into the Parquet ledger, and its reading
back; per-class metrics with the confusion picture; `distres.report`. The ledger, per-class and
report stages run at every class count; the data stages at the largest.

    python3 bench/scale.py [--sizes 1e4,1e5,1.28e6,1.4e7] [--classes 10,1000,21841]
                           [--scan-max 1.28e6] [--work DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout, installed or not
PER_SHARD = 1000
WORLD = 8  # the per-rank stages are rank 0's part of an 8-rank job


# -- the shard sets ---------------------------------------------------------------------------
def template(work: Path, classes: int) -> Path:
    """One tar of PER_SHARD samples (an 8x8 JPEG and a label each) and its DALI index."""
    from PIL import Image

    from distres.data.shards.scan import write_dali_index

    tar = work / "template.tar"
    if tar.is_file():
        return tar
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 60, 30)).save(buf, "JPEG")
    jpeg = buf.getvalue()
    with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as out:
        for i in range(PER_SHARD):
            for ext, data in (("jpg", jpeg), ("cls", str(i * 7919 % classes).encode())):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size, info.mtime = len(data), 0
                out.addfile(info, io.BytesIO(data))
    write_dali_index(tar, tar.with_suffix(".idx"))
    return tar


def shard_set(work: Path, n: int, classes: int, manifest: bool) -> Path:
    """N/PER_SHARD hard links of the template (and of its index), with a manifest or not."""
    from distres.data.shards.scan import sha256_file

    tar = template(work, classes)
    out = work / f"{'manifest' if manifest else 'foreign'}-{n}"
    if out.is_dir():
        return out
    out.mkdir()
    shards = max(1, n // PER_SHARD)
    digest, size = sha256_file(tar), tar.stat().st_size
    entries = []
    for s in range(shards):
        name = f"train-{s:06d}"
        os.link(tar, out / f"{name}.tar")
        if manifest:
            os.link(tar.with_suffix(".idx"), out / f"{name}.idx")
        entries.append({"name": f"{name}.tar", "samples": PER_SHARD, "bytes": size,
                        "sha256": digest, "index": f"{name}.idx"})  # fmt: skip
    if manifest:
        doc = {"format": "distres-shards/1", "prefix": "train", "num_samples": shards * PER_SHARD,
               "num_skipped": 0, "classes": {f"n{c:08d}": c for c in range(classes)},
               "shards": entries, "skipped": []}  # fmt: skip
        (out / "manifest.json").write_text(json.dumps(doc))
    return out


# -- the stages, each in a child process -----------------------------------------------------
def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def stage(name: str, a: argparse.Namespace) -> dict:
    """Run one stage here; {"s": seconds, ...} (what else it measured)."""
    work, n, c = Path(a.work), a.n, a.num_classes
    if name == "manifest":
        from distres.data.shards.read import read_shard_set

        t = time.perf_counter()
        s = read_shard_set(work / f"manifest-{n}")
        return {"s": time.perf_counter() - t, "shards": len(s.urls)}
    if name.startswith("scan"):
        from distres.data.shards.read import read_shard_set

        t, cpu = time.perf_counter(), time.process_time()
        s = read_shard_set(work / f"foreign-{n}")
        assert s.num_samples == n, s.num_samples
        # each rank's own CPU: the 2 ranks of a node share the scans between them
        return {"s": time.perf_counter() - t, "cpu_s": time.process_time() - cpu}
    if name == "dali-index":
        from distres.data.dali.index import checked_indexes
        from distres.data.shards.read import read_shard_set

        shards = read_shard_set(work / f"manifest-{n}")
        t = time.perf_counter()
        _, counts = checked_indexes(shards, work, lambda e: None)
        assert sum(counts) == n
        return {"s": time.perf_counter() - t}
    if name.startswith("first-batch"):
        import torch

        from distres.config import load_config
        from distres.data import build_loaders

        d = work / f"manifest-{n}"
        cfg = load_config(None, ["data.dataset=shards", f"data.train_shards={d}",
                                 f"data.val_shards={d}", f"data.backend={a.backend}",
                                 "data.num_workers=1", "data.image_size=8", "data.val_resize=8",
                                 "train.batch_size=32", f"model.num_classes={c}"])  # fmt: skip
        t = time.perf_counter()
        train, _ = build_loaders(cfg, torch.device("cpu"), 0, WORLD, WORLD)
        batches = iter(train)
        next(batches)
        first = time.perf_counter() - t
        buf = io.BytesIO()
        t = time.perf_counter()
        torch.save({"data": train.state_dict()}, buf)
        train.close()
        save = time.perf_counter() - t
        t = time.perf_counter()
        torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
        return {"s": first, "position_bytes": len(buf.getvalue()), "save_s": save,
                "load_s": time.perf_counter() - t}  # fmt: skip
    if name == "ledger-runs":
        return ledger_runs(work, n, c)
    if name == "ledger-merge":
        from distres.results import ledger_files as files
        from distres.results.per_class import ClassStats

        runs = sorted((work / f"runs-{n}").glob("*.parquet"))
        urls = tuple(f"{work}/manifest-{n}/train-{s:06d}.tar" for s in range(n // PER_SHARD))
        t = time.perf_counter()
        rows = files.merge(runs, work / f"ledger-{n}" / "ledger" / "val.parquet", urls,
                           ClassStats(c))  # fmt: skip
        assert rows == n
        return {"s": time.perf_counter() - t, "runs": len(runs)}
    if name == "ledger-read":
        from distres.results import ledger_files as files

        t, rows = time.perf_counter(), 0
        for batch in files.read_chunks(work / f"ledger-{n}" / "ledger" / "val.parquet"):
            rows += len(files.columns_of(batch)["label"])
        assert rows == n
        return {"s": time.perf_counter() - t}
    if name == "per-class":
        return per_class(work, n, c)
    if name == "report":
        from distres.cli.report import main

        t = time.perf_counter()
        with open(os.devnull, "w") as sink:
            stdout, sys.stdout = sys.stdout, sink
            try:
                assert main([str(work / f"report-{n}-{c}")]) == 0
            finally:
                sys.stdout = stdout
        return {"s": time.perf_counter() - t}
    raise SystemExit(f"unknown stage {name}")


def ledger_runs(work: Path, n: int, c: int) -> dict:
    """Every rank's sorted runs of synthetic rows (labels over c classes, 60% right); the
    time and memory reported are one rank's (its N/8 rows), the runs are all ranks'."""
    import numpy as np

    from distres.results import ledger_files as files

    out = work / f"runs-{n}"
    out.mkdir(exist_ok=True)
    rng, seconds = np.random.default_rng(0), []
    part = -(-n // WORLD)
    for rank in range(WORLD):
        lo, hi = rank * part, min(n, (rank + 1) * part)
        t = time.perf_counter()
        for j, start in enumerate(range(lo, hi, files.RUN_ROWS)):
            idx = np.arange(start, min(hi, start + files.RUN_ROWS))
            idx = idx[rng.permutation(len(idx))]  # the loader's order is not the ledger's
            label = idx * 7919 % c
            top = rng.integers(0, c, (len(idx), min(5, c)))
            right = rng.random(len(idx)) < 0.6
            top[right, 0] = label[right]
            prob = np.sort(rng.random(top.shape, np.float32), 1)[:, ::-1]
            loss = rng.random(len(idx), np.float32) * 8
            code = files.sort_code(idx // PER_SHARD, idx % PER_SHARD)
            keys = [f"{i % PER_SHARD:06d}" for i in idx.tolist()]
            files.write_run(out / f"rank{rank:05d}-{j:05d}.parquet", code, keys, label, top,
                            prob, loss)  # fmt: skip
        seconds.append(time.perf_counter() - t)
    return {"s": max(seconds)}


def per_class(work: Path, n: int, c: int) -> dict:
    """The per-class table, pairs and both pictures of the ledger at c classes, from its rows
    read back in chunks (labels folded onto c classes); also the report's run directory."""
    from distres.io import write_json
    from distres.results import ledger_files as files
    from distres.results.per_class import ClassStats, draw

    names = [f"n{i:08d}" for i in range(c)]
    t = time.perf_counter()
    stats = ClassStats(c)
    for batch in files.read_chunks(work / f"ledger-{n}" / "ledger" / "val.parquet"):
        col = files.columns_of(batch)
        rows = files._rows_of(batch)

        def folded(i, rows=rows):
            return [{k: v % c if k == "label" or k.startswith("pred") else v
                     for k, v in r.items()} for r in rows(i)]  # fmt: skip

        stats.update(col["label"] % c, col["top"] % c, col["loss"], folded)
    m = {"loss": stats.total_loss / n, "top1": float(stats.hit1.sum() / n), "top5": 0.0,
         "samples": n}  # fmt: skip
    summary = {"classes": names, "split": "val", "rows": "val.parquet", "metrics": m,
               **stats.summary(names)}  # fmt: skip
    run = work / f"report-{n}-{c}"
    write_json(run / "ledger" / "val.json", summary)
    (run / "ledger" / "val.parquet").touch()
    draw(summary, run / "plots")
    (run / "metrics.jsonl").write_text(
        json.dumps({"event": "train", "step": 1, "train/loss": 1.0, "lr": 0.1})
        + "\n"
        + json.dumps(
            {"event": "eval", "step": 1, "val/loss": 1.0, "val/top1": 0.5, "val/top5": 0.7}
        )
        + "\n"
    )
    return {"s": time.perf_counter() - t}


def vmhwm_mb() -> float:
    """This process's high-water mark since its exec. Not wait4's ru_maxrss: exec carries the
    forking process's high-water mark over."""
    with open("/proc/self/status") as f:
        return int(next(x for x in f if x.startswith("VmHWM:")).split()[1]) / 1024


def child(a: argparse.Namespace) -> None:
    # what every stage imports, before the base is taken: "peak - base" is the stage's own
    import matplotlib.pyplot  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import torch  # noqa: F401

    import distres.data
    import distres.results.ledger  # noqa: F401

    base = rss_mb()
    result = stage(a.child, a)
    print(json.dumps({**result, "base_mb": base, "peak_mb": vmhwm_mb()}))


# -- the parent --------------------------------------------------------------------------------
def run_stage(name: str, work: Path, n: int, c: int, env: dict | None = None,
              parallel: int = 1, backend: str = "torch") -> dict:  # fmt: skip
    """`parallel` copies at once (the ranks of a node, LOCAL_RANK each); the slowest's time."""
    cmd = [sys.executable, __file__, "--child", name, "--work", str(work), "--n", str(n),
           "--num-classes", str(c), "--backend", backend]  # fmt: skip
    procs, outs = [], []
    for r in range(parallel):
        e = {**os.environ, **(env or {}), "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": str(parallel),
             "RANK": str(r), "WORLD_SIZE": str(parallel), "PYTHONPATH": str(REPO),
             "OMP_NUM_THREADS": "1"}  # fmt: skip
        out = tempfile.TemporaryFile("w+")  # noqa: SIM115 (read after wait: a pipe could fill)
        procs.append(subprocess.Popen(cmd, env=e, stdout=out, text=True))
        outs.append(out)
    results = []
    for p, out in zip(procs, outs, strict=True):
        p.wait()
        out.seek(0)
        text = out.read()
        out.close()
        if p.returncode:
            raise SystemExit(f"stage {name} at N={n}, {c} classes failed ({p.returncode})")
        results.append(json.loads(text.splitlines()[-1]))
    worst = max(results, key=lambda r: r["s"])
    return {**worst, "peak_mb": max(r["peak_mb"] for r in results)}


def exponent(points: list[tuple[int, float]]) -> float | None:
    """The least-squares slope of log(value) on log(N)."""
    pts = [(math.log(n), math.log(v)) for n, v in points if v > 0]
    if len(pts) < 2:
        return None
    mx, my = (sum(p[i] for p in pts) / len(pts) for i in (0, 1))
    den = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / den if den else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1e4,1e5,1.28e6,1.4e7")
    p.add_argument("--classes", default="10,1000,21841")
    p.add_argument("--scan-max", type=float, default=1.28e6, help="largest N scanned as tars")
    p.add_argument("--work", default=None, help="keep the sets here (default: a temp dir)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--num-classes", type=int, help=argparse.SUPPRESS)
    p.add_argument("--backend", default="torch", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a)
    sizes = [int(float(x)) for x in a.sizes.split(",")]
    classes = [int(x) for x in a.classes.split(",")]
    if min(sizes) < WORLD * PER_SHARD:
        p.error(f"--sizes: at least {WORLD * PER_SHARD} ({WORLD} ranks, {PER_SHARD} per shard)")
    top = max(classes)
    tmp = tempfile.TemporaryDirectory(prefix="distres-scale-") if a.work is None else None
    work = Path(a.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list] = {}
    try:
        import nvidia.dali  # noqa: F401

        dali = True
    except ImportError:  # the row is left out
        dali = False

    def record(what: str, n: int, r: dict) -> None:
        rows.setdefault(what, []).append((n, r))
        shown = {k: v for k, v in r.items() if k not in ("s", "peak_mb", "base_mb")}
        extra = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in shown.items())  # fmt: skip
        print(f"{what:<34} {n:>10,} {r['s']:>9.3f} {r['peak_mb']:>8.0f} {r['base_mb']:>6.0f}  "
              f"{extra}", flush=True)  # fmt: skip

    print(f"{'stage':<34} {'N':>10} {'seconds':>9} {'peak MB':>8} {'base':>6}  other")
    for n in sizes:
        shard_set(work, n, top, manifest=True)
        record("manifest read", n, run_stage("manifest", work, n, top))
        if n <= a.scan_max:
            shard_set(work, n, top, manifest=False)
            for label, parallel in (("scan, 1 rank", 1), ("scan, 2 ranks of a node", 2)):
                cache = {"DISTRES_CACHE": str(work / f"cache-{n}-{parallel}")}
                record(f"{label}: first", n, run_stage("scan", work, n, top, cache, parallel))
                record(f"{label}: cached", n, run_stage("scan", work, n, top, cache, parallel))
        # a cache of this size's own: the checks run cold, then DALI's start finds them cached
        cache = {"DISTRES_CACHE": str(work / f"cache-{n}-index")}
        record("DALI index checks", n, run_stage("dali-index", work, n, top, cache))
        for backend in ("torch", "dali") if dali else ("torch",):
            r = run_stage("first-batch", work, n, top, cache, backend=backend)
            record(f"first batch, {backend}, rank 0 of {WORLD}", n, r)
        record(f"ledger runs, rank 0 of {WORLD}", n, run_stage("ledger-runs", work, n, top))
        record("ledger merge + write, rank 0", n, run_stage("ledger-merge", work, n, top))
        record("ledger read back", n, run_stage("ledger-read", work, n, top))
        for c in classes:
            record(f"per-class + pictures, {c} cl", n, run_stage("per-class", work, n, c))
            record(f"distres.report, {c} cl", n, run_stage("report", work, n, c))
        for d in ("runs", "ledger"):  # the next size needs the disk
            subprocess.run(["rm", "-rf", str(work / f"{d}-{n}")], check=True)
    print("\ngrowth exponents (value ~ N^k, fitted over the sizes run): time, peak - base")
    for what, points in rows.items():
        kt = exponent([(n, r["s"]) for n, r in points])
        km = exponent([(n, max(1e-3, r["peak_mb"] - r["base_mb"])) for n, r in points])
        fmt = lambda k: "-" if k is None else f"{k:.2f}"  # noqa: E731
        print(f"{what:<34} time {fmt(kt):>5}   memory {fmt(km):>5}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
