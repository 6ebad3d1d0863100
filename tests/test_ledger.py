"""Results a user acts on: the per-sample ledger, per-class metrics and pictures, profiler
traces, TensorBoard, and export for serving (ONNX through onnxruntime, TorchScript, pt2)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from commands import REPO, run_cli
from launcher import run_module
from PIL import Image

from distres.data.api import SampleKey
from distres.data.buffers import rebatch
from distres.data.shards.read import read_shard_set
from distres.results import ledger
from distres.results import per_class as class_metrics

# -- the loaders' keys ---------------------------------------------------------------------


def test_rebatch_cuts_keys_with_their_samples():
    chunks = [
        (torch.arange(n) + start, torch.arange(n) + start, [f"k{start + i}" for i in range(n)])
        for start, n in ((0, 5), (5, 2), (7, 9))
    ]
    batches = list(rebatch(iter(chunks), 4, drop_last=False))
    assert [len(b[2]) for b in batches] == [4, 4, 4, 4]
    for images, _, keys in batches:
        assert keys == [f"k{int(i)}" for i in images]


def test_sample_key_of_dali_source_info():
    from distres.data.dali.index import sample_key

    shards = {"/data/a.tar": 0, "/data/b:c.tar": 1}
    assert sample_key(np.frombuffer(b"/data/a.tar:1536:n01/x.y.jpg", np.uint8), shards) == (
        SampleKey(0, 1536, "n01/x")
    )
    assert sample_key(np.frombuffer(b"/data/b:c.tar:0:00042.png", np.uint8), shards) == (
        SampleKey(1, 0, "00042")
    )


def _tar_order(shards) -> list[tuple[int, str]]:
    return [
        (i, s["__key__"])
        for i, url in enumerate(shards.urls)
        for s in wds.tarfile_samples([{"url": url}])
    ]


@pytest.mark.parametrize("backend", ["dali", "torch", "gpu-decode"])
def test_keyed_loaders_name_every_sample_once_on_any_world_size(backend, digits_dirs):
    """Two ranks' keys are disjoint, cover the split, come in tar order within each shard and
    name what the tars hold; the backends agree."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    from distres.config import load_config
    from distres.data import build_eval_loader

    overrides = {
        "dali": ["data.backend=dali"],
        "torch": ["data.backend=torch"],
        "gpu-decode": ["data.backend=torch", "data.decode=gpu"],
    }[backend]
    cfg = load_config(None, [*overrides, "train.batch_size=50"])
    expected = _tar_order(read_shard_set(digits_dirs[1]))
    seen = []
    for rank in (0, 1):
        loader = build_eval_loader(cfg, torch.device("cpu"), rank, 2, 1, "val", keys=True)
        keys = [k for batch in loader for k in batch.keys]
        loader.close()
        assert keys == sorted(keys, key=lambda k: (k.shard, k.at)), rank
        seen += [(k.shard, k.key) for k in keys]
    assert sorted(seen) == sorted(expected) and len(set(seen)) == len(expected)


# -- per-class metrics and pictures --------------------------------------------------------


def _rows(n: int, classes: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    label = rng.integers(0, classes, n)
    top = np.stack([rng.permutation(classes)[:5] for _ in range(n)])
    right = rng.random(n) < 0.6
    top[right, 0] = label[right]
    prob = np.sort(rng.random((n, 5)).astype(np.float32), axis=1)[:, ::-1].copy()
    loss = rng.random(n).astype(np.float32) * 5
    keys = [SampleKey(i % 3, i, f"s{i:05d}") for i in range(n)]
    return {"keys": keys, "label": label, "top": top, "prob": prob, "loss": loss}


def test_per_class_table_and_confusion_by_hand(tmp_path):
    rows = _rows(3000, 1000)
    names = [f"class{i}" for i in range(1000)]
    # fed in uneven chunks, as the merge feeds it
    stats = class_metrics.ClassStats(1000)
    for a, b in ((0, 7), (7, 1500), (1500, 3000)):
        stats.update(rows["label"][a:b], rows["top"][a:b], rows["loss"][a:b])
    table = stats.table(names)
    dense = np.zeros((1000, 1000), np.int64)  # the matrix by hand
    np.add.at(dense, (rows["label"], rows["top"][:, 0]), 1)
    off = dense.copy()
    np.fill_diagonal(off, 0)
    for c in range(1000):
        mine = rows["label"] == c
        n = int(mine.sum())
        assert table[c]["support"] == n
        if n:
            assert table[c]["top1"] == pytest.approx((rows["top"][mine, 0] == c).mean())
            hit5 = (rows["top"][mine] == c).any(axis=1).mean()
            assert table[c]["top5"] == pytest.approx(hit5)
            assert table[c]["loss"] == pytest.approx(rows["loss"][mine].mean(), rel=1e-6)
        other = table[c]["confused_with"]
        assert other == (int(off[c].argmax()) if off[c].any() else None)
        assert table[c]["confused_count"] == off[c].max()
    # support-weighted per-class accuracy is the overall accuracy
    overall = sum(r["top1"] * r["support"] for r in table if r["support"]) / 3000
    assert overall == pytest.approx(ledger.metrics(rows)["top1"])
    # the most-confused pairs are the largest off-diagonal cells, ties by class index
    pairs = stats.most_confused(40)
    flat = np.lexsort((np.arange(1000**2) % 1000, np.arange(1000**2) // 1000, -off.ravel()))
    assert pairs == [(int(i // 1000), int(i % 1000), int(off.flat[i])) for i in flat[:40]]
    chosen = stats.confused_classes(20)
    assert len(chosen) == 20 and {pairs[0][0], pairs[0][1]} <= set(chosen)
    np.testing.assert_array_equal(stats.submatrix(chosen), dense[np.ix_(chosen, chosen)])
    summary = {
        "classes": names,
        "split": "val",
        "metrics": ledger.metrics(rows),
        **stats.summary(names),
    }
    out = class_metrics.plot_confusion(summary, tmp_path / "c.png")
    assert Image.open(out).size[0] > 400


def test_ledger_round_trip_and_damaged_files_are_one_line_errors(tmp_path):
    rows = _rows(50, 10)
    urls = ("/s/a.tar", "/s/b.tar", "/s/c.tar")
    info = {"checkpoint": "x", "classes": [str(i) for i in range(10)]}
    path = ledger.write(rows, tmp_path, "val", urls, info)
    assert path.name == "val.parquet" and ledger.find(tmp_path / "ledger") == [path]
    assert not list((tmp_path / "ledger").glob(".parts-*"))  # the runs are gone
    summary, back = ledger.read(path)
    assert summary["metrics"] == pytest.approx(ledger.metrics(rows))
    order = sorted(range(50), key=lambda i: (rows["keys"][i].shard, rows["keys"][i].at))
    assert back["key"] == [rows["keys"][i].key for i in order]
    assert back["shard"] == [urls[rows["keys"][i].shard] for i in order]
    np.testing.assert_array_equal(back["top"], rows["top"][order])
    np.testing.assert_array_equal(back["loss"], rows["loss"][order])
    # what pandas, polars and DuckDB read: plain columns
    table = pq.read_table(path)
    assert table.column_names == ["shard", "key", "label", *[
        f"{c}{j}" for j in range(1, 6) for c in ("pred", "prob")], "loss"]  # fmt: skip
    hardest = max(range(50), key=lambda i: rows["loss"][i])
    assert summary["hardest"][0]["key"] == rows["keys"][hardest].key
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ledger.LedgerError, match=r"val\.parquet: not a ledger"):
        ledger.read(path)
    path.with_suffix(".json").write_text("[1, 2")
    with pytest.raises(ledger.LedgerError, match=r"val\.json: unreadable"):
        ledger.read_summary(path)
    path.with_suffix(".json").unlink()
    with pytest.raises(ledger.LedgerError, match=r"val\.json: missing"):
        ledger.read_summary(path)


def test_the_merge_of_many_runs_is_the_sorted_rows_with_bounded_batches(tmp_path, monkeypatch):
    """Runs of every size, interleaved key ranges and empty ranks: the merge emits every row
    once in (shard, position) order."""
    from distres.results import ledger_files as files

    monkeypatch.setattr(files, "BATCH", 7)  # many merge steps
    monkeypatch.setattr(files, "ROW_GROUP", 50)
    rng = np.random.default_rng(3)
    n = 1000
    shard, at = rng.integers(0, 4, n), rng.permutation(n)
    rows = _rows(n, 30, seed=4)
    runs, start = [], 0
    for i, size in enumerate((0, 1, 333, 7, 200, 459)):
        part = slice(start, start + size)
        start += size
        if size:
            code = files.sort_code(shard[part], at[part])
            keys = [f"k{j}" for j in range(part.start, part.stop)]
            runs.append(files.write_run(tmp_path / f"r{i}.parquet", code, keys,
                        rows["label"][part], rows["top"][part], rows["prob"][part],
                        rows["loss"][part]))  # fmt: skip
    order = np.lexsort((at, shard))
    for fan_in in (64, 2):  # all at once; in two levels of intermediate runs
        monkeypatch.setattr(files, "FAN_IN", fan_in)
        stats = class_metrics.ClassStats(30)
        out = tmp_path / f"ledger-{fan_in}.parquet"
        assert files.merge(runs, out, ("a", "b", "c", "d"), stats) == n
        table = pq.read_table(out)
        assert table.column("key").to_pylist() == [f"k{j}" for j in order]
        assert table.column("shard").to_pylist() == ["abcd"[shard[j]] for j in order]
        assert pq.ParquetFile(out).metadata.num_row_groups > 1
        assert int(stats.support.sum()) == n
    assert len(list(tmp_path.glob("merge01-*.parquet"))) == 2  # 5 runs -> 3 -> 2 -> merged
    assert not list(tmp_path.glob(".*.tmp"))
    # a label outside the classes: one line, not numpy's broadcast error
    with pytest.raises(ValueError, match="a label 29 outside the 10 classes"):
        class_metrics.ClassStats(10).update(np.array([29]), np.zeros((1, 5), int), np.ones(1))


# -- profiler and TensorBoard --------------------------------------------------------------


def test_profiler_writes_a_trace_that_loads_as_json_and_a_table(tmp_path):
    from distres.components import profiling

    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.LazyLinear(4)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 3, 16, 16)
    prof = profiling.StepProfiler([2, 3], tmp_path, 1, torch.device("cpu"))
    records = []
    for step in range(1, 5):
        prof.before(step)
        with profiling.mark("data_wait"):
            batch = x.clone()
        with profiling.mark("forward"):
            loss = model(batch).square().mean()
        with profiling.mark("backward"):
            loss.backward()
        with profiling.mark("optimizer"):
            opt.step()
            opt.zero_grad()
        records.append(prof.after(step))
    assert records[0] is None and records[1] is None and records[3] is None
    record = records[2]
    assert record["steps"] == [2, 3] and record["step_ms"] > 0
    assert record["forward_ms"] > 0 and record["backward_ms"] > 0
    trace = profiling.load_trace(tmp_path / "profile" / "rank1.json")
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"forward", "backward", "optimizer", "data_wait"} <= names
    assert not profiling._active  # marks are no-ops again
    text = profiling.table(record)
    assert "where the step time goes" in text and "backward" in text


def test_tensorboard_gets_the_scalars_and_a_resume_purges_what_came_after(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from distres.components.tracking import TensorBoardRun

    def scalars(tag):
        acc = EventAccumulator(str(tmp_path / "tensorboard"))
        acc.Reload()
        return [(e.step, round(e.value, 6)) for e in acc.Scalars(tag)]

    first = TensorBoardRun(tmp_path, 0)
    for step in (10, 20, 30):
        first.log({"event": "train", "step": step, "train/loss": 1 / step, "lr": 0.1})
    first.log({"event": "eval", "step": 30, "val/top1": 0.5, "val/samples": 361})
    first.close()
    assert scalars("train/loss") == [(10, 0.1), (20, 0.05), (30, round(1 / 30, 6))]
    resumed = TensorBoardRun(tmp_path, 20)  # from the checkpoint at step 20
    resumed.log({"event": "train", "step": 30, "train/loss": 0.25, "lr": 0.1})
    resumed.close()
    assert scalars("train/loss") == [(10, 0.1), (20, 0.05), (30, 0.25)]


def test_a_profile_window_the_run_never_reaches_is_one_line(tmp_path):
    from distres.components import profiling

    prof = profiling.StepProfiler([50, 60], tmp_path, 0, torch.device("cpu"))
    for step in range(1, 4):
        prof.before(step)
        assert prof.after(step) is None
    record = prof.after(3, force=True)
    assert record["missed"] and "stopped at step 3, before the window" in profiling.table(record)
    assert prof.after(3, force=True) is None and not (tmp_path / "profile").exists()


def test_tensorboard_missing_is_a_config_error_before_training(monkeypatch, tmp_path, capsys):
    """A real run (the command's own main, in this process) where tensorboard cannot be
    imported: exit 2 with the one line naming the key and the install, before any step."""
    from distres.cli.train import main
    from distres.errors import USAGE as EXIT_USAGE

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # find_spec: None; import: fails
    code = main(["tracking.tensorboard=true", "train.max_steps=2", "tracking.progress=off",
                 f"run.dir={tmp_path}"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == EXIT_USAGE, err
    assert "config error: tracking.tensorboard=true needs the tensorboard package: pip " \
        "install tensorboard" in err  # fmt: skip
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoints").exists()


@pytest.mark.slow  # torch's ONNX exporter: 9 s even for a tiny model
def test_an_export_that_does_not_match_is_not_kept(tmp_path, monkeypatch):
    """The parity check decides whether the file stays: past the tolerance, exit 4's error and
    no file (nor a temporary one) left behind."""
    pytest.importorskip("onnxruntime")
    from distres.artifacts import serving

    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(4, 3),
    )  # fmt: skip
    info = {"classes": ["a", "b", "c"], "image_size": 16, "resize": 0, "mean": [0.5] * 3,
            "std": [0.5] * 3, "in_chans": 3}  # fmt: skip
    check = serving.export(model, "onnx", tmp_path / "ok.onnx", info)
    assert check["checked"] and check["max_abs_diff"] < 1e-5
    side = json.loads((tmp_path / "ok.preprocess.json").read_text())
    assert side["output"] == {"name": "logits", "shape": ["batch", 3]} and side["opset"] == 18
    monkeypatch.setattr(serving, "PARITY_TOL", -1.0)  # nothing can match
    with pytest.raises(serving.ServingError, match="outputs differ from the PyTorch model's"):
        serving.export(model, "onnx", tmp_path / "bad.onnx", info)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.onnx", "ok.preprocess.json"]


# -- end to end ------------------------------------------------------------------------------


def _planted_train_set(out: Path) -> str:
    """Digits' training shards with one "0" relabelled "1"; returns its key."""
    from distres.data.shards.digits import digits
    from distres.data.shards.write import write_shards

    shards = read_shard_set(digits()[0])
    samples = [
        [s["__key__"], s["jpg"], int(s["cls"])]
        for url in shards.urls
        for s in wds.tarfile_samples([{"url": url}])
    ]
    planted = next(s for s in samples if s[2] == 0)
    planted[2] = 1
    write_shards([tuple(s) for s in samples], out, "train", shards.classes, 300)
    return planted[0]


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory, digits_dirs):
    root = tmp_path_factory.mktemp("planted")
    key = _planted_train_set(root / "train")
    run_dir = root / "run"
    proc = run_cli(
        "data.dataset=shards",
        f"data.train_shards={root / 'train'}",
        f"data.val_shards={digits_dirs[1]}",
        "train.epochs=4",
        f"run.dir={run_dir}",
        "tracking.ledger=true",
        "tracking.tensorboard=true",
        "tracking.profile_steps=[3,4]",
        "tracking.wandb=offline",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, key


def _ledger_rows(path: Path) -> list[dict]:
    """The ledger's rows as dicts with the top-5 and probabilities as lists."""
    rows = pq.read_table(path).to_pylist()
    for r in rows:
        r["top5"] = [r.pop(f"pred{j}") for j in range(1, 6)]
        r["prob"] = [r.pop(f"prob{j}") for j in range(1, 6)]
    return rows


@pytest.mark.slow
def test_the_ledger_is_one_on_any_world_size_and_its_classes_add_up(planted_run, tmp_path):
    """The training run's own ledger (tracking.ledger, one rank) and a 2-rank evaluate
    --ledger of its last checkpoint: the same rows; per-class accuracy weighted by support is
    val/top1."""
    run_dir, _ = planted_run
    summary = json.loads((run_dir / "summary.json").read_text())
    rows1 = _ledger_rows(run_dir / "ledger" / "val.parquet")
    assert len(rows1) == 361
    at_end = json.loads((run_dir / "ledger" / "val.json").read_text())
    assert at_end["metrics"]["top1"] == summary["final_val_top1"] and at_end["step"] == 88
    cmd = ["--standalone", "--nproc_per_node=2", "-m", "distres.evaluate", "--checkpoint"]
    cmd += [str(run_dir / "checkpoints"), "--ledger", "--out", str(tmp_path / "two")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    two = run_module("torch.distributed.run", [*cmd, "run.threads=1"], cwd=REPO, env=env,
                     timeout=300)  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    rows2 = _ledger_rows(tmp_path / "two" / "ledger" / "val.parquet")
    for a, b in zip(rows1, rows2, strict=True):
        assert (a["shard"], a["key"], a["label"], a["top5"]) == (
            b["shard"],
            b["key"],
            b["label"],
            b["top5"],
        )
        assert b["prob"] == pytest.approx(a["prob"], abs=1e-6)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
    side = json.loads((tmp_path / "two" / "ledger" / "val.json").read_text())
    weighted = sum(r["top1"] * r["support"] for r in side["per_class"]) / 361
    assert weighted == pytest.approx(summary["final_val_top1"], abs=1e-12)
    assert sum(r["label"] == r["top5"][0] for r in rows2) / 361 == summary["final_val_top1"]
    for name in ("confusion_val.png", "hardest_val.png"):
        assert Image.open(tmp_path / "two" / "plots" / name).size[0] > 300
    # a ledger directory that cannot be written: one line, no traceback, a write error (7)
    (tmp_path / "file").write_text("")
    bad = run_cli(
        "--checkpoint", str(run_dir / "checkpoints"), "--ledger", "--out", str(tmp_path / "file"),
        module="distres.evaluate",
    )  # fmt: skip
    assert bad.returncode == 7 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
    assert bad.stderr.startswith("distres.evaluate: write error:") and "file" in bad.stderr


@pytest.mark.slow
def test_a_planted_mislabel_comes_first_in_the_training_set_ledger(planted_run):
    run_dir, key = planted_run
    proc = run_cli(
        "--checkpoint", str(run_dir / "checkpoints"), "--split", "train", "--ledger",
        module="distres.evaluate",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.splitlines()[0])
    assert result["split"] == "train" and result["train/samples"] == 1436
    rows = _ledger_rows(run_dir / "ledger" / "train.parquet")
    worst = max(rows, key=lambda r: r["loss"])
    assert (worst["key"], worst["label"], worst["top5"][0]) == (key, 1, 0)
    # the report shows the tables and redraws the pictures of both ledgers
    report = run_cli(str(run_dir), module="distres.report")
    assert report.returncode == 0, report.stderr[-2000:]
    for text in ("train: per class", "val: most confused", "hardest_train.png",
                 "confusion_val.png", "where the step time goes"):  # fmt: skip
        assert text in report.stdout, text


@pytest.mark.slow
def test_the_run_profiles_and_writes_tensorboard_and_wandb_pictures(planted_run):
    run_dir, _ = planted_run
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (profile,) = [r for r in records if r["event"] == "profile"]
    assert profile["steps"] == [3, 4] and profile["backward_ms"] > 0
    trace = json.loads((run_dir / "profile" / "rank0.json").read_text())
    assert {"forward", "backward", "optimizer"} <= {e.get("name") for e in trace["traceEvents"]}
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*")
    media = {p.name.split("_")[0] for p in (wandb_run / "files" / "media").rglob("*.*")}
    assert {"confusion", "hardest", "per"} <= media


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.load: TorchScript's deprecation
def test_onnx_torchscript_and_pt2_exports_match_pytorch(planted_run, tmp_path):
    """Through the CLI, from the checkpoint and from final/: onnxruntime's outputs match the
    PyTorch model's within 1e-4, on a batch size the export never saw."""
    ort = pytest.importorskip("onnxruntime")
    from distres.artifacts.final import load_weights

    run_dir, _ = planted_run
    model = load_weights(run_dir / "final" / "model.safetensors").eval()
    x = torch.randn(7, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(x).numpy()
    proc = run_cli(
        str(run_dir / "checkpoints"), "--format", "onnx", "--out", str(tmp_path / "m.onnx"),
        module="distres.export",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "parity with PyTorch under onnxruntime" in proc.stdout
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": x.numpy()})[0]
    assert np.abs(got - expected).max() < 1e-4
    info = json.loads((tmp_path / "m.preprocess.json").read_text())
    assert info["opset"] == 18 and info["input"]["shape"] == ["batch", 3, 32, 32]
    assert info["classes"] == [str(i) for i in range(10)] and info["parity"]["checked"]
    for fmt, name in (("torchscript", "m.pt"), ("pt2", "m.pt2")):
        proc = run_cli(
            str(run_dir / "final"), "--format", fmt, "--out", str(tmp_path / name),
            module="distres.export",
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
    with torch.no_grad():
        scripted = torch.jit.load(str(tmp_path / "m.pt"))(x).numpy()
        exported = torch.export.load(str(tmp_path / "m.pt2")).module()(x).numpy()
    assert np.abs(scripted - expected).max() < 1e-5 and np.abs(exported - expected).max() < 1e-5
    bad = run_cli(str(run_dir / "final"), "--format", "onnx", "--out", str(tmp_path / "m.pt"),
                  module="distres.export")  # fmt: skip
    assert bad.returncode == 2 and "--format onnx writes .onnx" in bad.stderr
