"""Host-device synchronisations of the training thread, per step, counted by torch itself.

    python3 bench/host_syncs.py [--json FILE] [section.key=value ...]     # on a GPU machine

Runs `distres.fit` in this process under distres.components.profiling.HostSyncs (torch's
set_sync_debug_mode("warn"): a warning at every call that blocks the host on the device),
and splits the training thread's syncs by phase: in a step (its data fetch, batch
augmentation, forward, backward, optimizer, EMA) or at a boundary (logging, the stop
consensus, evaluation, checkpoints: each at its cadence). "No host sync per step"
(docs/performance.md) means the step phase's count is zero. The GPU-decode stage's thread
synchronises its own side streams before each nvJPEG call on purpose (vision issue 9606);
those are counted apart and never hold the training thread. Without a GPU it says so and
exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the counts here")
    args, overrides = ap.parse_known_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to count (host syncs are a GPU matter)")
        if args.json:
            Path(args.json).write_text(json.dumps({"steps": 0, "step_syncs": None}))
        return 0
    import distres
    from distres.components.profiling import HostSyncs
    from distres.trainer.loop import Trainer

    steps = 200
    overrides = [
        f"train.max_steps={steps}",
        "train.epochs=100",
        "tracking.log_every=50",
        "tracking.wandb=off",
        "tracking.progress=off",
        "checkpoint.every_epochs=0",
        "checkpoint.save_final=false",
        f"run.dir={tempfile.mkdtemp(prefix='distres-host-syncs-')}",  # fresh: no resume
        *overrides,
    ]
    boundary = Trainer.boundary

    with HostSyncs() as syncs:

        def counted_boundary(self):
            syncs.phase = "boundary"
            try:
                return boundary(self)
            finally:
                syncs.phase = "step"  # what follows is the next step's data and compute

        Trainer.boundary = counted_boundary
        try:
            syncs.phase = "start"
            summary = distres.fit(overrides)
        finally:
            Trainer.boundary = boundary
    n = max(1, summary["steps"])
    step = sum(syncs.main["step"].values())
    print(f"{summary['steps']} steps; training thread: {step} host syncs in steps "
          f"({step / n:.2f} per step), {sum(syncs.main['boundary'].values())} at boundaries, "
          f"{sum(syncs.main['start'].values())} before the first; decode thread "
          f"{sum(syncs.others.values())} (its own side streams)")  # fmt: skip
    for phase in ("step", "boundary", "start"):
        for where, k in syncs.main[phase].most_common(8):
            print(f"  {phase:8s} {k:6d}  {where}")
    for where, k in syncs.others.most_common(4):
        print(f"  {'decode':8s} {k:6d}  {where}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "steps": summary["steps"], "step_syncs": step,
            "boundary_syncs": sum(syncs.main["boundary"].values()),
            "decode_thread_syncs": sum(syncs.others.values()),
            "step_sites": dict(syncs.main["step"]),
        }, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
