"""Host-device synchronisations per training step, counted by torch itself.

    python3 bench/host_syncs.py [section.key=value ...]     # on a GPU machine

Runs `distres.fit` in this process with torch.cuda.set_sync_debug_mode("warn"), which makes
torch warn at every call that blocks the host on the device (an .item(), a .tolist(), a copy
from pageable memory, a stream synchronisation), and counts the warnings by the line of
distres that made them. "No host sync per step" (docs/performance.md) means the count per
step stays near zero away from log, evaluation and checkpoint steps. Without a GPU it says so
and exits 0.
"""

from __future__ import annotations

import collections
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str]) -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to count (host syncs are a GPU matter)")
        return 0
    import distres

    steps = 200
    overrides = [
        f"train.max_steps={steps}",
        "train.epochs=100",
        "tracking.log_every=50",
        "tracking.wandb=off",
        "tracking.progress=false",
        "checkpoint.every_epochs=0",
        "checkpoint.save_final=false",
        f"run.dir={tempfile.mkdtemp(prefix='distres-host-syncs-')}",  # fresh: no resume
        *argv,
    ]
    sites: collections.Counter[str] = collections.Counter()
    original = warnings.showwarning

    def count(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" not in str(message):
            return original(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack() if "/distres/" in f.filename]
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
        sites[where] += 1

    warnings.showwarning = count
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    try:
        summary = distres.fit(overrides)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = original
    total = sum(sites.values())
    steps = max(1, summary["steps"])
    print(f"{summary['steps']} steps, {total} host syncs ({total / steps:.2f} per step)")
    for where, n in sites.most_common():
        print(f"  {n:6d}  {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
