"""The launch/ wrappers, run as a user would (2 CPU ranks via GPUS=2)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import REPO


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
    if script == "deepspeed.sh":
        pytest.importorskip("deepspeed")
    proc = launch(script, tmp_path, "train.max_steps=2", **env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2


def test_multi_node_wrapper_names_what_is_missing(tmp_path):
    proc = launch("multi_node.sh", tmp_path, NNODES="2")
    assert proc.returncode != 0 and "MASTER" in proc.stderr
