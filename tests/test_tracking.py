"""W&B (offline), telemetry, plots, report, evaluate and predict, through the real CLIs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
from commands import REPO, run_cli
from launcher import run_module
from multiproc import SMALL, train
from PIL import Image

# real W&B (offline) runs under torchrun
pytestmark = pytest.mark.slow

pytest.importorskip("wandb")

NO_KEY = {"WANDB_API_KEY": "", "WANDB_MODE": "", "NETRC": "/dev/null"}


def wandb_env() -> dict:
    return {**os.environ, **NO_KEY}


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def history(run: Path) -> list[dict]:
    """History rows read back with wandb's own reader of .wandb transaction logs."""
    exe = shutil.which("wandb")
    assert exe, "the wandb command line is not on PATH"
    out = subprocess.run(
        [exe, "leet", "inspect", "--json", str(run)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    rows = []
    for line in out.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("type") == "history":
            rows.append(record["history"]["item"])
    return rows


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("wandb-2rank")
    proc = train(
        2, run_dir, *SMALL, "run.threads=1", "train.epochs=2", "tracking.log_every=5", **NO_KEY
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_one_wandb_run_per_job_with_the_logged_keys(two_rank_run):
    runs = offline_runs(two_rank_run)
    assert len(runs) == 1, runs  # rank 0 only, never one per rank
    assert not (REPO / "wandb").exists()  # nothing outside run.dir
    rows = history(runs[0])
    train_rows = [r for r in rows if "train/loss" in r]
    eval_rows = [r for r in rows if "val/top1" in r]
    for key in (
        "step",
        "epoch",
        "lr",
        "img_per_s",
        "step_time_s",
        "data_wait_frac",
        "grad_norm",
        "samples",
    ):
        assert all(key in r for r in train_rows), key
    assert [r["step"] for r in train_rows] == [5, 10, 15, 20, 22]
    assert [r["step"] for r in eval_rows] == [11, 22]
    assert all({"val/loss", "val/top5"} <= r.keys() for r in eval_rows)
    # the same values as metrics.jsonl
    jsonl = [json.loads(x) for x in (two_rank_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/loss"] for r in jsonl if r["event"] == "train"] == [
        r["train/loss"] for r in train_rows
    ]
    assert all(0.0 <= r["data_wait_frac"] <= 1.0 for r in train_rows)


def test_wandb_config_records_the_run(two_rank_run):
    run = offline_runs(two_rank_run)[0]
    exe = shutil.which("wandb")
    out = subprocess.run(
        [exe, "leet", "inspect", "--summary", "--json", str(run)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert '"world_size"' in out and '"global_batch"' in out and '"git_rev"' in out
    assert '"cpu_count"' in out and '"model_params"' in out


def test_plots_and_report(two_rank_run):
    png = two_rank_run / "plots" / "curves.png"
    with Image.open(png) as img:
        img.verify()  # a valid PNG
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size[0] > 500
    png.unlink()
    proc = run_cli(str(two_rank_run), module="distres.report")
    assert proc.returncode == 0, proc.stderr
    assert png.is_file() and "final val top-1" in proc.stdout and "completed" in proc.stdout
    bad = run_cli(str(two_rank_run / "nope"), module="distres.report")
    assert bad.returncode == 2 and "metrics.jsonl" in bad.stderr


def test_a_resumed_job_continues_the_same_wandb_run(tmp_path):
    common = [
        f"run.dir={tmp_path}",
        *SMALL,
        "run.threads=1",
        "train.epochs=2",
        "tracking.log_every=2",
    ]
    first = run_module(
        "distres.train", [*common, "train.max_steps=6"], cwd=REPO, env=wandb_env(), timeout=300
    )
    assert first.returncode == 0, first.stderr[-2000:]
    second = run_module("distres.train", common, cwd=REPO, env=wandb_env(), timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    runs = offline_runs(tmp_path)
    assert len(runs) == 2
    ids = {r.name.rsplit("-", 1)[1] for r in runs}
    assert len(ids) == 1  # one W&B run, continued
    meta = json.loads((tmp_path / "checkpoints" / "step-00000044" / "meta.json").read_text())
    assert meta["state"]["train"]["wandb_id"] == ids.pop()
    later = [r["step"] for r in history(runs[1]) if "train/loss" in r]
    assert later and min(later) > 6  # the resumed part logs only steps after the checkpoint


def test_evaluate_reproduces_the_recorded_top1(two_rank_run):
    summary = json.loads((two_rank_run / "summary.json").read_text())
    checkpoint = two_rank_run / "checkpoints"
    proc = run_cli("--checkpoint", str(checkpoint), module="distres.evaluate")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.splitlines()[0])
    assert result["step"] == summary["steps"]
    assert result["val/top1"] == summary["final_val_top1"]
    assert result["val/samples"] == 361
    # distributed, as training: the 2-rank evaluation in the size-table test below


def test_evaluate_size_table_equals_single_size_evaluations_and_writes_the_best(
    two_rank_run, tmp_path
):
    """--sizes: one row per size, each equal to an evaluation at that size alone (the crop
    ratio kept: 16 / 16 here), on one rank and on two; --tta flip changes the numbers;
    --write-best records the best in inference.json, which distres.predict then reads."""
    checkpoint = str(two_rank_run / "checkpoints")
    final = Path(shutil.copytree(two_rank_run / "final", tmp_path / "final"))
    proc = run_cli(
        "--checkpoint", checkpoint, "--sizes", "16,24", "--write-best", str(final),
        module="distres.evaluate",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = json.loads(proc.stdout.splitlines()[0])
    assert [(r["size"], r["resize"]) for r in table["sizes"]] == [(16, 16), (24, 24)]
    assert "<- best" in proc.stdout
    for row in table["sizes"]:
        size = row["size"]
        single = run_cli(
            "--checkpoint", checkpoint, f"data.val_size={size}", f"data.val_resize={size}",
            module="distres.evaluate",
        )  # fmt: skip
        assert single.returncode == 0, single.stderr[-2000:]
        alone = json.loads(single.stdout.splitlines()[0])
        assert {k: alone[k] for k in row if k.startswith("val/")} == {
            k: v for k, v in row.items() if k.startswith("val/")
        }, size
    info = json.loads((final / "inference.json").read_text())
    best = max(table["sizes"], key=lambda r: (r["val/top1"], -r["size"]))
    assert (info["image_size"], info["resize"]) == (best["size"], best["resize"])
    assert info["sizes_evaluated"] == {
        str(r["size"]): round(r["val/top1"], 6) for r in table["sizes"]
    }
    # two ranks: the same table (the loss's float sums add in another order)
    cmd = ["--standalone", "--nproc_per_node=2", "-m", "distres.evaluate"]
    cmd += ["--checkpoint", checkpoint, "--sizes", "16,24", "run.threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    two = run_module("torch.distributed.run", cmd, cwd=REPO, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    distributed = json.loads(next(x for x in two.stdout.splitlines() if x.startswith("{")))
    summary = json.loads((two_rank_run / "summary.json").read_text())
    assert distributed["sizes"][0]["val/top1"] == summary["final_val_top1"]  # the run's own size
    for ours, one in zip(distributed["sizes"], table["sizes"], strict=True):
        assert ours == {**one, "val/loss": pytest.approx(one["val/loss"], rel=1e-6)}
    flip = run_cli(
        "--checkpoint", checkpoint, "--sizes", "16", "--tta", "flip", module="distres.evaluate"
    )
    assert flip.returncode == 0, flip.stderr[-2000:]
    (flipped,) = json.loads(flip.stdout.splitlines()[0])["sizes"]
    assert flipped["val/samples"] == 361 and flipped["val/loss"] != table["sizes"][0]["val/loss"]
    bad = run_cli("--checkpoint", checkpoint, "--write-best", module="distres.evaluate")
    assert bad.returncode == 2 and "--write-best needs --sizes" in bad.stderr


def test_predict_names_the_top5_classes(two_rank_run, digits_dirs, tmp_path):
    val_dir = digits_dirs[1]
    shard = sorted(val_dir.glob("*.tar"))[0]
    images = []
    with tarfile.open(shard) as tar:
        members = {m.name: m for m in tar.getmembers()}
        for name in sorted(members)[:6]:
            if name.endswith(".jpg"):
                out = tmp_path / Path(name).name
                out.write_bytes(tar.extractfile(members[name]).read())
                images.append(str(out))
    manifest = json.loads((val_dir / "manifest.json").read_text())
    names = {str(v): k for k, v in manifest["classes"].items()}
    weights = two_rank_run / "final" / "model.safetensors"
    proc = run_cli("--weights", str(weights), *images, module="distres.predict")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == len(images)
    import torch

    from distres.artifacts.final import load_weights
    from distres.data.torch.transforms import val_transform

    model = load_weights(weights).eval()
    info = json.loads(weights.with_name("inference.json").read_text())
    for line, image in zip(lines, images, strict=True):
        ranked = [x.rsplit(" ", 1)[0] for x in line.split(": ", 1)[1].split(", ")]
        assert len(ranked) == 5 and set(ranked) <= set(names.values())
        # the top class is the model's argmax under validation's own transform (the run's
        # 32 px images resized to 16: SMALL; a reference without the resize disagreed on one
        # image of six on an Intel Xeon)
        pixels = torch.from_numpy(np.array(Image.open(image).convert("RGB")))
        crop = val_transform(info["image_size"], info["resize"])(pixels.permute(2, 0, 1))
        assert crop.shape == (3, 16, 16)
        x = crop.float() / 255
        mean, std = torch.tensor(info["mean"]), torch.tensor(info["std"])
        x = (x - mean[:, None, None]) / std[:, None, None]
        with torch.no_grad():
            want = names[str(int(model(x[None]).argmax()))]
        assert ranked[0] == want, (line, want)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    proc = run_cli("--weights", str(weights), str(broken), images[0], module="distres.predict")
    assert proc.returncode == 2 and proc.stdout.count("\n") == 1  # bad input: the table's 2
    assert f"{broken}: cannot read image" in proc.stderr


def test_wandb_off_and_bad_settings(tmp_path):
    proc = run_cli(f"run.dir={tmp_path}", "tracking.wandb=off", "train.max_steps=2")
    assert proc.returncode == 0 and not (tmp_path / "wandb").exists()
    bad = run_cli("tracking.wandb=maybe")
    assert bad.returncode == 2 and "tracking.wandb" in bad.stderr
