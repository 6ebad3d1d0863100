"""The CPU benchmarks run end to end in CI-sized settings and print their tables (the figures
themselves are recorded in docs/performance.md, never asserted as timings)."""

from __future__ import annotations

import os
import re
import sys

import pytest
import torch
from commands import REPO
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


def test_the_gpu_session_rehearses_on_cpu_stand_ins_within_its_limits(tmp_path):
    """bench/gpu_session.sh --rehearse: every step runs (tiny sizes, CPU stand-ins), at most
    8 files are left in its output folder (the device tool brings back 8), the table has a
    line for every target, and the GPU plan keeps one command near 7.5 minutes (a rerun on
    the warm machine fits the 15 minutes of device time; one command may run 10)."""
    import subprocess
    import tarfile

    sys.path.insert(0, str(REPO / "bench"))
    from session_table import TARGETS

    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_session.sh"), "--rehearse"],
        env={**os.environ, "OUT": str(out), "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    log = proc.stdout
    assert proc.returncode == 0, log[-3000:] + proc.stderr[-2000:]
    for name in ("tests", "decode", "eager", "compiled", "train", "syncs", "graphs", "ema"):
        assert f"== step {name}: rc=0" in log, (name, log[-3000:])
    files = sorted(p.name for p in out.iterdir())
    assert files == ["logs.tar.gz", "session.log", "table.txt"]
    table = (out / "table.txt").read_text()
    for text, _ in TARGETS:
        line = next((x for x in table.splitlines() if x.startswith(text)), None)
        assert line is not None and line.split()[-1] in ("pass", "FAIL", "-"), (text, table)
    assert "missing" not in table, table  # every step wrote what its verdict reads
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = set(tar.getnames())
    for part in ("decode.json", "eager.json", "compiled.json", "syncs.json", "tests.txt"):
        assert f"logs/{part}" in names, names
    core, budget = map(
        int, re.search(r"GPU plan: core steps \(.*\) (\d+) s of (\d+) s", log).groups()
    )
    assert core <= budget - 15 and budget <= 480, (core, budget)


def test_remote_shards_prints_local_and_s3_epochs():
    out = bench("remote_shards.py", "--shards", "4", "--per-shard", "40", "--repeats", "1",
                "--latency", "0.01", "--bandwidth", "0")  # fmt: skip
    rows = [line.split() for line in out.splitlines() if line.startswith(("local ", "s3 "))]
    rows = [r for r in rows if r[1] in ("1", "2")]
    assert [(r[0], r[1]) for r in rows] == [
        ("local", "1"),
        ("local", "2"),
        ("s3", "1"),
        ("s3", "2"),
    ]
    assert int(rows[2][4]) == 4 and int(rows[3][4]) == 0  # 4 downloads, then none


def test_shard_writer_prints_a_row_per_writer():
    # 72 images: past the 64 below which distres's writer encodes without its worker pool
    out = bench("shard_writer.py", "--images", "72", "--sizes", "64,128", "--workers", "2")
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1]}
    assert {"distres", "litdata", "webdataset"} <= rows.keys(), out
    for name in ("distres", "litdata", "webdataset"):
        if name == "litdata" and rows[name][1] == "skipped":
            continue  # litdata not installed: its row says so
        assert rows[name][1] == "72" and float(rows[name][3]) > 0, out


def test_scale_prints_every_stage_and_its_exponent(tmp_path):
    out = bench("scale.py", "--sizes", "8000,16000", "--classes", "21841", "--scan-max", "16000",
                "--work", str(tmp_path))  # fmt: skip
    table, exponents = out.split("growth exponents")
    stages = {line[:34].strip() for line in table.splitlines()[1:] if line.strip()}
    expected = {"manifest read", "scan, 1 rank: first", "scan, 2 ranks of a node: cached",
                "DALI index checks", "first batch, torch, rank 0 of 8", "ledger runs, rank 0 of 8",
                "ledger merge + write, rank 0", "ledger read back",
                "per-class + pictures, 21841 cl", "distres.report, 21841 cl"}  # fmt: skip
    assert expected <= stages, stages
    for line in table.splitlines()[1:]:
        if line.strip():
            assert float(line[46:55]) > 0 and float(line[56:64]) > 0, line  # seconds, peak MB
    assert "ledger merge + write, rank 0       time" in exponents
    assert (tmp_path / "report-16000-21841" / "plots" / "confusion_val.png").is_file()
