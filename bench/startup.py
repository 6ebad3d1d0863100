"""Where a run's time goes outside the training steps: start-up, the end of the run, and exit.

Runs `python -m distres.train` on the digits default for one optimizer step (or under torchrun
with --nproc N) and times, from the moment the command starts, the first log line (imports,
process group, loaders, model, optimizer, resume check), the final line (the step, one
evaluation, the final checkpoint, weights, summary, plots) and the process's exit. Then one
more run under `python -X importtime` adds up the import time of each top-level package.

    python3 bench/startup.py [--repeats 3] [--nproc 1] [--plots]
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def command(nproc: int, run_dir: Path, plots: bool, *python_flags: str) -> list[str]:
    launcher = (
        ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        if nproc > 1
        else []
    )
    return [
        sys.executable,
        *python_flags,
        *launcher,
        "-m",
        "distres.train",
        f"run.dir={run_dir}",
        "run.threads=1",
        "train.max_steps=1",
        "checkpoint.every_steps=0",
        "tracking.progress=log",
        f"tracking.plots={str(plots).lower()}",
    ]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def timed_run(nproc: int, plots: bool) -> tuple[float, float, float]:
    """Seconds from the start to the first log line, to the final line, to the exit."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.monotonic()
        proc = subprocess.Popen(
            command(nproc, Path(tmp) / "run", plots),
            cwd=REPO,
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        first = final = None
        for line in proc.stdout:
            now = time.monotonic() - start
            if first is None and line.startswith("[distres]"):
                first = now
            if line.startswith("final val top-1"):
                final = now
        rc = proc.wait(timeout=600)
        end = time.monotonic() - start
    if rc != 0 or first is None or final is None:
        raise SystemExit(f"the run failed (exit {rc})")
    return first, final, end


def import_costs(plots: bool) -> list[tuple[str, float]]:
    """Cumulative import seconds per top-level package, from -X importtime (one process)."""
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            command(1, Path(tmp) / "run", plots, "-X", "importtime"),
            cwd=REPO,
            env=env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
    totals: dict[str, float] = collections.defaultdict(float)
    # importtime lists a module after the modules it imported: read backwards, parents come
    # first. A package is counted where something of distres's (or the script) imports it.
    parents: list[tuple[int, str]] = []
    for line in reversed(proc.stderr.splitlines()):
        fields = line.split("|")
        if not line.startswith("import time:") or not fields[1].strip().isdigit():
            continue
        name = fields[2].rstrip()
        depth = len(name) - len(name.lstrip())
        name = name.strip()
        while parents and parents[-1][0] >= depth:
            parents.pop()
        if not name.startswith("distres") and all(n.startswith("distres") for _, n in parents):
            totals[name.split(".")[0]] += int(fields[1]) / 1e6
        parents.append((depth, name))
    return sorted(totals.items(), key=lambda kv: -kv[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nproc", type=int, default=1, help="ranks under torchrun (1: none)")
    parser.add_argument("--plots", action="store_true", help="draw plots/curves.png at the end")
    args = parser.parse_args()
    runs = [timed_run(args.nproc, args.plots) for _ in range(args.repeats)]
    first, final, end = (statistics.median(x) for x in zip(*runs, strict=True))
    print(f"ranks {args.nproc}, plots {args.plots}, median of {args.repeats} (seconds):")
    print(f"  start to first log line   {first:6.2f}")
    print(f"  first line to final line  {final - first:6.2f}  (1 step, evaluation, final outputs)")
    print(f"  final line to exit        {end - final:6.2f}")
    print(f"  total                     {end:6.2f}")
    print("imports in one process (cumulative seconds per top-level package):")
    for name, seconds in import_costs(args.plots):
        if seconds >= 0.05:
            print(f"  {name:24s} {seconds:6.2f}")


if __name__ == "__main__":
    main()
