"""The launch/ wrappers, run as a user would (2 CPU ranks via GPUS=2)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from commands import REPO

# real torchrun launches
pytestmark = pytest.mark.slow


def launch(script: str, tmp: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(REPO / "launch" / script), f"run.dir={tmp}", "run.threads=1", *args],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "GPUS": "2", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("script", "env"),
    [
        ("single_node.sh", {}),
        ("multi_node.sh", {"NNODES": "1", "MASTER": "127.0.0.1", "PORT": "29561"}),
        ("deepspeed.sh", {}),
    ],
)
def test_wrapper_trains_on_two_ranks(tmp_path, script, env):
    """deepspeed.sh runs DeepSpeed's own launcher (`deepspeed --num_gpus 2 --module ...`) at the
    default ZeRO stage: the one test of that launcher."""
    if script == "deepspeed.sh":
        pytest.importorskip("deepspeed")
    proc = launch(script, tmp_path, "train.max_steps=2", **env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2


def test_elastic_wrapper_trains_against_a_store_of_its_own(tmp_path):
    import re
    import sys
    import time

    store = subprocess.Popen(
        [sys.executable, "-m", "distres.launch", "store", "--host", "127.0.0.1", "--port", "0"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline, line = time.monotonic() + 60, ""
        while "listening" not in line and time.monotonic() < deadline:
            line = store.stdout.readline()
        port = re.search(r"127\.0\.0\.1:(\d+)", line)[1]
        proc = launch("elastic.sh", tmp_path, "train.max_steps=2", STORE=f"127.0.0.1:{port}",
                      JOB_ID="wrapper-test", MIN_NODES="1", MAX_NODES="1")  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads((tmp_path / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["steps"] == 2
    finally:
        store.terminate()
        store.wait(30)
    missing = launch("elastic.sh", tmp_path, STORE="127.0.0.1:1")
    assert missing.returncode != 0 and "JOB_ID" in missing.stderr


def test_multi_node_wrapper_names_what_is_missing(tmp_path):
    proc = launch("multi_node.sh", tmp_path, NNODES="2")
    assert proc.returncode != 0 and "MASTER" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "env", "code"),
    [
        (["optim.lr=1e30", "optim.warmup_epochs=0", "tracking.log_every=2"], {}, 4),
        (["train.epochs=50"], {}, 3),
    ],
    ids=["non_finite_4", "preempted_3"],
)
def test_launcher_keeps_the_workers_exit_code(tmp_path, overrides, env, code):
    """torchrun alone exits 1 with its ChildFailedError block; distres.launch (and the
    wrappers, which use it) exit with the workers' code and print one line of their own."""
    import signal
    import sys
    import time

    cmd = [
        sys.executable,
        "-m",
        "distres.launch",
        "--nproc_per_node=2",
        "--",
        f"run.dir={tmp_path}",
        "run.threads=1",
        "checkpoint.on_stop=false",
        *overrides,
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **env},
    )
    try:
        if code == 3:  # preempt: SIGUSR1 to every worker once training runs
            deadline = time.monotonic() + 120
            while not (tmp_path / "metrics.jsonl").exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            from multiproc import children

            for pid in children(proc.pid):
                os.kill(pid, signal.SIGUSR1)
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == code, err[-2000:]
    assert f"exited with code {code}" in err
    assert "Traceback" not in err and "ChildFailedError" not in err
