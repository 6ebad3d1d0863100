"""ImageNet-21k's class count end to end: a run on 1,536 tiny images labelled over 21,841
classes trains, writes its ledger, per-class table and pictures, and `distres.report` reads it
back, each process within a bounded peak memory (its own high-water mark, VmHWM). The dense
21,841 x 21,841 confusion matrix once took such a run past the machine's 24 GB at its end.
bench/scale.py measures how each structure grows with N."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from commands import REPO
from PIL import Image

pytestmark = pytest.mark.slow

CLASSES = 21_841


# The process's own high-water mark (VmHWM: its memory since its exec). Not wait4's ru_maxrss:
# exec carries the forking process's high-water mark over, so a command started from a
# pytest process grown to 3 GB "peaks" at 3 GB whatever it does.
_MEASURED = """
import atexit, runpy, sys
hwm, module = sys.argv.pop(1), sys.argv.pop(1)
def peak():
    with open("/proc/self/status") as f:
        kb = next(line for line in f if line.startswith("VmHWM:")).split()[1]
    with open(hwm, "w") as out:
        out.write(kb)
atexit.register(peak)
sys.argv[0] = module
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def run_measured(args: list[str], out: Path, timeout: float = 600) -> tuple[int, str, float]:
    """`python -m args...` in a fresh interpreter: (exit code, stderr, peak RSS in MB)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    hwm = out / "vmhwm"
    cmd = [sys.executable, "-c", _MEASURED, str(hwm), *args]
    with open(out / "stdout", "w") as so, open(out / "stderr", "w") as se:
        proc = subprocess.run(cmd, stdout=so, stderr=se, env=env, cwd=REPO, timeout=timeout)
    return proc.returncode, (out / "stderr").read_text(), int(hwm.read_text()) / 1024


@pytest.fixture(scope="module")
def classes_21k(tmp_path_factory) -> Path:
    """1,536 8x8 images in 3 tars (no manifest: scanned), labels spread over 21,841 classes,
    the last class among them (so the scan finds 21,841)."""
    root = tmp_path_factory.mktemp("21k")
    rng = np.random.default_rng(0)
    for s in range(3):
        with wds.TarWriter(str(root / f"part-{s:02d}.tar")) as w:
            for i in range(512):
                n = s * 512 + i
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), np.uint8)).save(buf, "JPEG")
                label = CLASSES - 1 if n == 1535 else n * 14 % CLASSES
                w.write({"__key__": f"{n:05d}", "jpg": buf.getvalue(), "cls": str(label)})
    return root


def test_a_21841_class_run_writes_its_ledger_and_report_in_bounded_memory(classes_21k, tmp_path):
    run = tmp_path / "run"
    code, err, peak = run_measured([
        "distres.train", "data.dataset=shards", f"data.train_shards={classes_21k}",
        f"data.val_shards={classes_21k}", f"model.num_classes={CLASSES}",
        "data.image_size=16", "data.val_resize=16", "train.max_steps=3", "run.threads=1",
        "tracking.ledger=true", "tracking.progress=log", f"run.dir={run}",
    ], tmp_path)  # fmt: skip
    assert code == 0, err[-3000:]
    # the model's 21,841-way head, its optimizer state and the evaluation: well under 3 GB
    assert peak < 3000, f"the training run peaked at {peak:.0f} MB"
    summary = json.loads((run / "ledger" / "val.json").read_text())
    assert len(summary["per_class"]) == CLASSES and summary["metrics"]["samples"] == 1536
    assert sum(r["support"] for r in summary["per_class"]) == 1536
    assert len(summary["confusion"]["classes"]) == 20
    assert pq.read_metadata(run / "ledger" / "val.parquet").num_rows == 1536
    for name in ("confusion_val.png", "hardest_val.png"):
        assert Image.open(run / "plots" / name).size[0] > 300
    # the report: tables and pictures from the summary, in under 1 GB
    code, err, peak = run_measured(["distres.report", str(run)], tmp_path)
    assert code == 0, err[-3000:]
    assert peak < 1000, f"distres.report peaked at {peak:.0f} MB"
    out = (tmp_path / "stdout").read_text()
    assert f"(the 10 worst of {CLASSES})" in out and "val: most confused" in out
