"""The CPU benchmarks run end to end in CI-sized settings and print their tables (the figures
themselves are recorded in docs/performance.md, never asserted as timings)."""

from __future__ import annotations

import os
import re

import pytest
import torch
from conftest import REPO
from launcher import run_module

pytestmark = pytest.mark.slow


def bench(script: str, *args: str, timeout: float = 300) -> str:
    """`python bench/SCRIPT args...`, forked with torch imported (launcher.py)."""
    proc = run_module(
        str(REPO / "bench" / script),
        list(args),
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},  # this checkout, installed or not
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def rate(line: str) -> float:
    return float(line.split()[6])


def test_train_throughput_prints_synthetic_pipeline_and_real_rows(tmp_path):
    out = bench(
        "train_throughput.py",
        *("--models", "resnet18", "--batches", "8", "--size", "64", "--precisions", "fp32"),
        *("--steps", "2", "--warmup", "1", "--images", "96", "--workers", "1"),
        *("--data-dir", str(tmp_path), "--decode", "cpu,gpu"),
    )
    rows = {line.split()[0]: line for line in out.splitlines() if line.split()[:1]}
    # the "gpu" rows are data.decode=gpu's stage; without CUDA its thread decodes on the CPU
    # (nvJPEG is reached only on a GPU: gpu_session.sh)
    assert {"synthetic", "pipe/cpu", "real/cpu", "pipe/gpu", "real/gpu"} <= rows.keys(), out
    assert all(rate(rows[k]) > 0 for k in ("synthetic", "real/cpu", "real/gpu", "pipe/gpu"))
    assert rows["synthetic"].split()[1:5] == ["resnet18", "8", "fp32", "channels_last"]
    assert (tmp_path / "train" / "manifest.json").is_file()  # --data-dir keeps the shards


def test_overhead_prints_the_ratio():
    out = bench("overhead.py", "--epochs", "1")
    m = re.search(r"overhead ratio \(distres / bare\): ([0-9.]+)", out)
    assert m and float(m.group(1)) > 0, out


def test_torch_loader_probe_prints_every_stage():
    out = bench("torch_loader_probe.py", "--images", "128", "--batch", "32")
    names = [line.split("  ")[0].strip() for line in out.splitlines()[1:]]
    assert names[0] == "decode x1" and any(n.startswith("loader pinned") for n in names), out
    assert all(float(line.split()[-7]) > 0 for line in out.splitlines()[1:]), out


def test_startup_prints_each_phase_and_the_imports():
    out = bench("startup.py", "--repeats", "1")
    phases = dict(
        re.findall(r"^  (start to first log line|final line to exit)\s+([0-9.]+)", out, re.M)
    )
    assert len(phases) == 2 and all(float(v) > 0 for v in phases.values()), out
    assert re.search(r"^  torch\s+[0-9.]+$", out, re.M), out


def test_gpu_decode_prints_the_cpu_rows_and_the_gpu_rows_where_there_is_cuda(tmp_path):
    out = bench("gpu_decode.py", "--data-dir", str(tmp_path), "--images", "24",
                "--iterations", "2", "--seconds", "2")  # fmt: skip
    ms = re.findall(r"^cpu .*?([0-9.]+) ms/image$", out, re.M)
    assert len(ms) == 4 and all(float(v) > 0 for v in ms), out
    assert len(list((tmp_path / "src").glob("*/*.jpg"))) == 24  # the photos it decoded
    if torch.cuda.is_available():
        assert re.search(r"^victims, side stream \+ sync \(protocol\)\s+\d+ of 2 rounds", out, re.M)
        assert re.search(r"^GPU vs CPU decode \(levels\)\s+max \d+", out, re.M), out
    else:
        assert "no CUDA device: the GPU rows were skipped" in out, out


def test_host_syncs_counts_on_a_gpu_and_says_it_needs_one_elsewhere():
    if torch.cuda.is_available():
        out = bench("host_syncs.py", "train.max_steps=20", timeout=600)
        assert re.search(r"^20 steps, \d+ host syncs \([0-9.]+ per step\)$", out, re.M), out
    else:
        out = bench("host_syncs.py")
        assert "no CUDA device: nothing to count" in out, out


def test_ema_prints_a_time_per_update_for_each_model():
    out = bench("ema.py", "--models", "resnet18", "--repeats", "2")
    (row,) = [x for x in out.splitlines() if x.startswith("resnet18 ")]
    assert row.split()[1] == "11,689,512" and float(row.split()[2]) > 0, out
