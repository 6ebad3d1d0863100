"""Ctrl-C is a stop, not a crash: a terminal's SIGINT (to the foreground process group, DataLoader
workers included) stops every rank at the next step with a checkpoint, a summary and one line
saying how to resume, exit 130; the run resumes from that checkpoint exactly. Also through
`python -m distres.launch`, whose agent passes the signal to its workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from commands import REPO
from multiproc import EXACT, assert_same_weights, env_with, resumes, train

pytestmark = pytest.mark.slow

ONE_RANK = [*EXACT, "data.num_workers=1"]  # 22 steps an epoch on one rank, 44 in all


def start(args: list[str], run_dir: Path) -> subprocess.Popen:
    """`python -m args...` in a session of its own, as a terminal's foreground job."""
    run_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env_with(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip


def ctrl_c_at(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 300):
    """Once the run has logged `step`, SIGINT to its process group (what Ctrl-C does); the
    exit code, stdout and stderr."""
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if metrics.exists():
                steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if x]
                if max(steps, default=-1) >= step:
                    os.killpg(proc.pid, signal.SIGINT)
                    break
            time.sleep(0.01)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    return proc.returncode, out, err


def stopped_with_a_checkpoint(run_dir: Path) -> int:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "interrupted"
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step-{summary['steps']:08d}"  # a checkpoint at the stop step
    return summary["steps"]


def test_ctrl_c_stops_a_run_with_a_checkpoint_and_it_resumes_exactly(tmp_path):
    whole = tmp_path / "whole"
    ref = start(["distres.train", *ONE_RANK, f"run.dir={whole}"], whole)
    _, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err[-3000:]

    run = tmp_path / "run"
    code, out, err = ctrl_c_at(start(["distres.train", *ONE_RANK, f"run.dir={run}"], run), run, 8)
    assert code == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert "Ctrl-C: stopping every rank at the next step with a checkpoint" in err
    stop = stopped_with_a_checkpoint(run)
    assert 8 <= stop < 44
    assert f"interrupted (Ctrl-C); all ranks stopped at step {stop} with a checkpoint: the " \
        "same command resumes from it" in out  # fmt: skip

    again = start(["distres.train", *ONE_RANK, f"run.dir={run}"], run)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    (resumed,) = resumes(run)
    assert resumed["step"] == stop
    assert json.loads((run / "summary.json").read_text())["steps"] == 44
    assert_same_weights(whole, run)


def test_ctrl_c_to_the_launcher_stops_its_ranks_with_a_checkpoint_and_they_resume(tmp_path):
    whole = tmp_path / "whole"
    proc = train(2, whole, *EXACT)
    assert proc.returncode == 0, proc.stderr[-3000:]

    run = tmp_path / "run"
    launch = ["distres.launch", "--nproc_per_node=2", "--", *EXACT, f"run.dir={run}"]
    code, _, err = ctrl_c_at(start(launch, run), run, 5)
    assert code == 130, err[-3000:]
    assert "[distres.launch] stopped by SIGINT" in err, err[-3000:]
    stop = stopped_with_a_checkpoint(run)
    assert 5 <= stop < 22

    proc = train(2, run, *EXACT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (resumed,) = resumes(run)
    assert resumed["step"] == stop
    assert_same_weights(whole, run)
