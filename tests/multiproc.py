"""Launch helpers for multi-process tests: torchrun of `python -m distres.train`, SIGKILL at
a chosen step, and reading what a run left behind. Every launch has a timeout."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import torch
from commands import REPO
from launcher import children, kill_tree, run_module, start_module
from safetensors.torch import load_file

TIMING = {"img_per_s", "step_time_s", "data_wait_frac"}  # fields that follow the wall clock

# Digits at 16 px (random-resized crops; validation resized to 16): a third of the default's
# compute per step. For tests of mechanisms (resume, signals, consensus, checkpoints), where
# the steps only have to be real steps; tests about accuracy keep the default's 32 px.
SMALL = ["data.image_size=16", "data.val_resize=16", "data.random_resized_crop=true"]

# Exact-resume runs: 2 ranks x 64 of the 1,436 digits: 11 steps per epoch, 22 in all,
# deterministic, a checkpoint every 3 steps and a record every step.
EXACT = [
    *SMALL,
    "run.threads=1",
    "run.deterministic=true",
    "train.epochs=2",
    "checkpoint.every_steps=3",
    "tracking.log_every=1",
    "checkpoint.keep_last=50",
]


# torchrun's own options to fork each rank from its agent, which the tests start with torch
# already imported (launcher.py): a rank starts in a fraction of a second instead of ~6 s of
# imports. The wrappers, Slurm and DeepSpeed tests launch `-m distres.train` as users do.
FORKED_RANKS = ["--run-path", "--start-method=fork"]


def torchrun_args(nproc: int, run_dir: Path, *overrides: str) -> list[str]:
    """`python -m torch.distributed.run ARGS`: nproc forked ranks of distres/train.py."""
    return [
        "--standalone",
        f"--nproc_per_node={nproc}",
        *FORKED_RANKS,
        str(REPO / "distres" / "train.py"),
        f"run.dir={run_dir}",
        *overrides,
    ]


def env_with(**extra: str) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


def train(nproc: int, run_dir: Path, *overrides: str, timeout: float = 300, **env):
    """torchrun of distres.train (see torchrun_args); the CompletedProcess."""
    return run_module(
        "torch.distributed.run",
        torchrun_args(nproc, run_dir, *overrides),
        cwd=REPO,
        env=env_with(**env),
        timeout=timeout,
    )


def kill_at_step(run_dir: Path, target: int, *overrides: str, timeout: float = 300) -> int:
    """Launch 2 ranks and SIGKILL the agent and every worker once rank 0 has logged step
    `target` and a checkpoint has been committed; the step reached when the kill landed.

    Waiting for the commit keeps the test about resuming: an async write of step 3 may
    commit only a few steps later, and a kill before it would (rightly) start afresh."""
    proc = start_module(
        "torch.distributed.run",
        torchrun_args(2, run_dir, *overrides),
        cwd=REPO,
        env=env_with(),
        out=os.devnull,
        err=os.devnull,
    )
    metrics, deadline, reached = run_dir / "metrics.jsonl", time.monotonic() + timeout, -1
    try:
        while proc.is_alive() and time.monotonic() < deadline:
            if metrics.exists():
                steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if x]
                reached = max(steps, default=-1)
                if reached >= target and (run_dir / "checkpoints" / "latest").is_file():
                    for pid in [*children(proc.pid), proc.pid]:
                        os.kill(pid, signal.SIGKILL)
                    break
            time.sleep(0.005)
    finally:
        if proc.is_alive():
            kill_tree(proc.pid)
        proc.join(timeout=30)
    assert reached >= target, f"the run ended (rc {proc.exitcode}) before step {target}"
    return reached


def all_records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]


def records(run_dir: Path) -> list[dict]:
    """The train and eval history, without the fields that follow the wall clock: equal for
    an interrupted and resumed run and one never interrupted."""
    return [
        {k: v for k, v in r.items() if k not in TIMING}
        for r in all_records(run_dir)
        if r["event"] != "resume"
    ]


def resumes(run_dir: Path) -> list[dict]:
    """The run's resume records: where each attempt after the first continued."""
    return [r for r in all_records(run_dir) if r["event"] == "resume"]


def assert_same_weights(a: Path, b: Path) -> None:
    fa, fb = a / "final" / "model.safetensors", b / "final" / "model.safetensors"
    wa, wb = load_file(str(fa)), load_file(str(fb))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k  # bitwise
    # and so are the files: a user comparing them sees no difference that is not there
    assert fa.read_bytes() == fb.read_bytes()
