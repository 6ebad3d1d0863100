"""End to end: the real CLI in a subprocess, checked through the files it leaves."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torchvision
import yaml
from commands import REPO, run_cli
from multiproc import SMALL

from distres.artifacts.final import load_weights

# end-to-end runs of the CLI
pytestmark = pytest.mark.slow

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # anything but \t and \n


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_short_run_leaves_every_output(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(
        "train.epochs=2",
        "train.max_steps=30",
        "tracking.log_every=5",
        f"run.dir={run_dir}",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["run"]["dir"] == str(run_dir) and cfg["train"]["max_steps"] == 30

    records = read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in records if r["event"] == "train"]
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30]
    for r in records:
        assert {"step", "epoch", "samples", "lr"} <= r.keys()
        assert r["samples"] == r["step"] * 64
    assert all("train/loss" in r for r in train)
    assert [r["step"] for r in evals] == [22, 30]
    for r in evals:
        assert 0.0 <= r["val/top1"] <= 1.0 and r["val/loss"] > 0 and r["val/samples"] == 361

    summary = json.loads((run_dir / "summary.json").read_text())
    assert {
        "best_val_top1",
        "final_val_top1",
        "stop_reason",
        "steps",
        "samples_seen",
        "wall_s",
    } <= summary.keys()
    assert summary["stop_reason"] == "completed" and summary["steps"] == 30
    assert summary["final_val_top1"] == evals[-1]["val/top1"]
    assert summary["best_val_top1"] == max(r["val/top1"] for r in evals)
    assert summary["samples_seen"] == 30 * 64

    # The final weights rebuild the model and reproduce its val accuracy's inputs: load works
    # and gives finite outputs of the right shape.
    model = load_weights(run_dir / "final" / "model.safetensors").eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert yaml.safe_load((run_dir / "final" / "model.yaml").read_text())["name"] == "resnet20"

    # Not a TTY: plain progress lines, no control characters, and the final accuracy printed.
    assert "step 5/30" in proc.stdout and "step 30/30" in proc.stdout
    assert not CONTROL.search(proc.stdout)
    assert f"final val top-1 {summary['final_val_top1']:.4f}" in proc.stdout


def test_early_stop_ends_the_run_with_its_reason(tmp_path):
    run_dir = tmp_path / "run"
    # An improvement must beat 2.0 in top-1: impossible, so it stops after `patience` evals.
    proc = run_cli(
        *SMALL,
        "train.epochs=10",
        "early_stop.patience=2",
        "early_stop.min_delta=2.0",
        "train.batch_size=128",
        f"run.dir={run_dir}",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "early_stop"
    assert summary["epochs"] == 3  # the first eval sets the best; two more fail to beat it
    assert "early stop" in proc.stdout


def test_non_finite_loss_stops_with_nonzero_exit(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(
        "optim.lr=1e30",
        "train.epochs=1",
        "tracking.log_every=2",
        "optim.warmup_epochs=0",
        f"run.dir={run_dir}",
        timeout=300,
    )
    assert proc.returncode == 4  # EXIT_NON_FINITE
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "non_finite_loss"
    assert "non-finite training loss" in proc.stdout


def test_imagenet_variant_run_exports_torchvision_weights(tmp_path, digits_dirs):
    run_dir = tmp_path / "run"
    proc = run_cli(
        "model.name=resnet18",
        "data.image_size=64",
        "train.max_steps=2",
        "train.batch_size=8",
        "data.dataset=shards",
        f"data.train_shards={digits_dirs[0]}",
        f"data.val_shards={digits_dirs[1]}",
        f"run.dir={run_dir}",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    tv = torchvision.models.resnet18(num_classes=10)
    tv.load_state_dict(load_file(str(run_dir / "final" / "model.safetensors")))


@pytest.mark.slow
def test_default_run_reaches_99_percent(tmp_path):
    """The embedded default, exactly as a newcomer runs it (wall time is printed, not asserted;
    bench/overhead.py measures it)."""
    proc = run_cli(cwd=tmp_path, timeout=900, fresh=True)  # a new interpreter, as theirs is
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("digits-resnet20-")
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"default run: val top-1 {summary['final_val_top1']:.4f}, wall {summary['wall_s']} s")
    # The README's promise, kept as it is (docs/performance.md lists what was measured on
    # which CPU): 0.9972 on a 2-core Intel Xeon (AVX-512), 0.9972 and 0.9945 on two other
    # 2-core machines of CI's kind. 0.99 is 358 of 361: a margin of 1 to 2 samples, so a CPU
    # whose rounding costs more than that fails here, and the README must then say so.
    assert summary["final_val_top1"] >= 0.99
    assert summary["stop_reason"] == "completed" and summary["epochs"] == 15


@pytest.mark.skipif(shutil.which("script") is None, reason="util-linux `script` not installed")
def test_progress_bar_on_a_tty(tmp_path):
    """Under a pseudo-terminal the default progress is a rich bar (cursor control, bar glyphs)."""
    cmd = (
        f"{sys.executable} -m distres.train train.max_steps=4 tracking.log_every=2 "
        f"checkpoint.save_final=false run.dir={tmp_path / 'run'}"
    )
    log = tmp_path / "tty.log"
    proc = subprocess.run(
        ["script", "-qfec", cmd, str(log)],
        cwd=REPO,
        capture_output=True,
        timeout=300,
        env={**os.environ, "TERM": "xterm"},
    )
    assert proc.returncode == 0
    out = log.read_text(errors="replace")
    assert "\x1b[" in out and "\u2501" in out  # ANSI control + the bar's line glyph
    assert "epoch 1/15" in out and "final val top-1" in out


@pytest.mark.slow
def test_compiled_model_trains_like_eager_and_recompiles_for_a_new_size(tmp_path):
    """engine.compile=true (on in the GPU presets): the same losses as eager to float
    rounding, and progressive resizing's second size gets its own graph (dynamic=False)."""
    common = [
        "data.random_resized_crop=true",
        "data.progressive_min_size=16",
        "data.progressive_epochs=[0,1]",
        "data.progressive_step=16",
        "tracking.log_every=1",
        "checkpoint.every_epochs=0",
        "checkpoint.save_final=false",
        "train.epochs=2",
    ]
    runs = {}
    for name, extra in (("compiled", ["engine.compile=true"]), ("eager", ["train.max_steps=3"])):
        run_dir = tmp_path / name
        proc = run_cli(*common, *extra, f"run.dir={run_dir}", timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        runs[name] = [r for r in rows if r["event"] == "train"]
    compiled, eager = runs["compiled"], runs["eager"]
    for c, e in zip(compiled[:3], eager, strict=True):
        assert c["train/loss"] == pytest.approx(e["train/loss"], rel=1e-4), (c, e)
    assert {r["epoch"]: r["image_size"] for r in compiled} == {0: 16, 1: 32}
    summary = json.loads((tmp_path / "compiled" / "summary.json").read_text())
    assert summary["stop_reason"] == "completed" and summary["steps"] == 44
