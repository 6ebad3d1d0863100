"""Every command exits as distres/errors.py's table says, with one line on stderr naming the
file, key or config field: bad config or arguments (2), bad data (2 before training), a bad
checkpoint (5), bad weights (5), a failed export check (6), a failed write (7). The commands'
own main(), in this process (each is what `python -m distres.X` runs)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from commands import run_cli

from distres import errors
from distres.cli import evaluate, export, predict, report, shards, train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A two-step run: its checkpoint and final/."""
    run_dir = tmp_path_factory.mktemp("exit-codes-run")
    args = ["train.max_steps=2", "data.image_size=16", "data.val_resize=16",
            "tracking.progress=off", "tracking.plots=false"]  # fmt: skip
    proc = run_cli(*args, f"run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run_dir


def one_line(capsys, prefix: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith(prefix), err
    assert "Traceback" not in "\n".join(err)
    return err[-1]


def broken_final(tmp_path, run):
    final = tmp_path / "final"
    shutil.copytree(run / "final", final)
    (final / "model.safetensors").write_bytes(b"not safetensors")
    return final


# -- train -------------------------------------------------------------------------------------
def test_train_bad_config_is_2(capsys, tmp_path):
    assert train.main(["train.bogus=1", f"run.dir={tmp_path}"]) == errors.USAGE
    assert "train.bogus" in one_line(capsys, "distres: config error:")


def bad_shards(tmp_path) -> Path:
    """A shard set whose manifest is damaged: found bad when the loaders are built."""
    root = tmp_path / "shards"
    root.mkdir()
    (root / "manifest.json").write_text("{not json")
    return root


def test_train_bad_data_before_training_is_2(capsys, tmp_path):
    bad = bad_shards(tmp_path)
    args = ["data.dataset=shards", f"data.train_shards={bad}", f"data.val_shards={bad}",
            f"run.dir={tmp_path}/run"]  # fmt: skip
    assert train.main(args) == errors.USAGE
    assert f"{bad}/manifest.json" in one_line(capsys, "distres: data error:")


def test_train_bad_checkpoint_is_5(capsys, tmp_path):
    args = [f"checkpoint.resume={tmp_path}/nope", f"run.dir={tmp_path}/run"]
    assert train.main(args) == errors.CHECKPOINT
    assert f"{tmp_path}/nope" in one_line(capsys, "distres: checkpoint error:")


def test_train_bad_weights_is_5(capsys, tmp_path):
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(b"\x00" * 64)
    args = [f"model.init_from={bad}", f"run.dir={tmp_path}/run"]
    assert train.main(args) == errors.CHECKPOINT
    assert str(bad) in one_line(capsys, "distres: weights error:")


# -- evaluate ----------------------------------------------------------------------------------
def test_evaluate_bad_config_is_2(capsys, run):
    ckpt = str(run / "checkpoints")
    assert evaluate.main(["--checkpoint", ckpt, "data.bogus=1"]) == errors.USAGE
    assert "data.bogus" in one_line(capsys, "distres.evaluate: config error:")


def test_evaluate_bad_data_is_2(capsys, run, tmp_path):
    bad = bad_shards(tmp_path)
    args = ["--checkpoint", str(run / "checkpoints"), "data.dataset=shards",
            f"data.train_shards={bad}", f"data.val_shards={bad}"]  # fmt: skip
    assert evaluate.main(args) == errors.USAGE
    assert f"{bad}/manifest.json" in one_line(capsys, "distres.evaluate: data error:")


def test_evaluate_bad_checkpoint_is_5(capsys, tmp_path):
    assert evaluate.main(["--checkpoint", str(tmp_path / "nope")]) == errors.CHECKPOINT
    one_line(capsys, "distres.evaluate: checkpoint error:")


def test_evaluate_bad_weights_is_5(capsys, run, tmp_path):
    args = ["--checkpoint", str(run / "checkpoints"), "--sizes", "16,24",
            "--write-best", str(tmp_path / "no-final")]  # fmt: skip
    assert evaluate.main(args) == errors.CHECKPOINT
    assert "inference.json: missing" in one_line(capsys, "distres.evaluate: weights error:")


# -- export ------------------------------------------------------------------------------------
def test_export_bad_arguments_are_2(run, tmp_path):
    with pytest.raises(SystemExit) as e:
        export.main([str(run / "final"), "--out", str(tmp_path / "m.onnx")])  # --format missing
    assert e.value.code == errors.USAGE


def test_export_bad_checkpoint_is_5(capsys, tmp_path):
    out = str(tmp_path / "m.safetensors")
    assert export.main([str(tmp_path), "--out", out]) == errors.CHECKPOINT
    one_line(capsys, "distres.export: checkpoint error:")


def test_export_bad_weights_is_5(capsys, run, tmp_path):
    final = broken_final(tmp_path, run)
    out = str(tmp_path / "m.safetensors")
    assert export.main([str(final), "--out", out]) == errors.CHECKPOINT
    assert "model.safetensors" in one_line(capsys, "distres.export: weights error:")


def test_export_a_write_that_fails_is_7(capsys, run, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the output's folder should be")
    out = str(blocker / "m.safetensors")
    assert export.main([str(run / "final"), "--out", out]) == errors.WRITE
    assert str(blocker) in one_line(capsys, "distres.export: write error:")


# -- predict -----------------------------------------------------------------------------------
def test_predict_bad_weights_is_5(capsys, run, tmp_path):
    final = broken_final(tmp_path, run)
    code = predict.main(["--weights", str(final / "model.safetensors"), "x.jpg"])
    assert code == errors.CHECKPOINT
    one_line(capsys, "distres.predict: weights error:")


def test_predict_an_unreadable_image_is_2(capsys, run, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    assert predict.main(["--weights", str(run / "final" / "model.safetensors"), str(bad)]) == 2
    assert str(bad) in one_line(capsys, "distres.predict:")


# -- report and shards -------------------------------------------------------------------------
def test_report_of_a_directory_that_is_no_run_is_2(capsys, tmp_path):
    assert report.main([str(tmp_path)]) == errors.USAGE
    assert "metrics.jsonl" in one_line(capsys, "distres.report:")


def test_shards_bad_source_is_2(capsys, tmp_path):
    code = shards.main(["--src", str(tmp_path / "none"), "--out", str(tmp_path / "out")])
    assert code == errors.USAGE
    assert str(tmp_path / "none") in one_line(capsys, "distres.data.shards: data error:")
    assert shards.main(["index", str(tmp_path)]) == errors.USAGE
    one_line(capsys, "distres.data.shards index: data error:")


def test_each_code_means_one_thing():
    # 0-8 distres's own, 130 a Ctrl-C's (as a shell reports it)
    assert sorted(errors.EXIT_CODES) == [*range(9), errors.INTERRUPTED]
    kinds = [errors.ConfigError, errors.DataError, errors.CheckpointError, errors.WeightsError,
             errors.ExportError, errors.WriteError, errors.RunDirLocked]  # fmt: skip
    codes = {k.exit_code for k in kinds}
    assert codes == {errors.USAGE, errors.FAILED, errors.CHECKPOINT, errors.EXPORT,
                     errors.WRITE, errors.LOCKED}  # fmt: skip
    assert json.dumps(errors.STOP_CODES)  # stop reasons map to codes of the table
    assert set(errors.STOP_CODES.values()) <= set(errors.EXIT_CODES)
