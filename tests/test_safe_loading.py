"""Crafted and damaged checkpoints through the real CLIs: no planted pickle ever runs, every
failure is one line with its own exit code, and resume=auto falls back to the checkpoint
before. Each planted payload is first shown to run under a plain unpickler, so a test that
finds no marker file is not passing by accident."""

from __future__ import annotations

import base64
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from commands import REPO, run_cli
from multiproc import resumes

from distres.checkpoint.dcp import _MetadataUnpickler

EXIT_CHECKPOINT = 5


def _pickle_str(text: str) -> bytes:
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE


def dotted_global_payload(marker: Path) -> bytes:
    """Protocol 4: STACK_GLOBAL("torch.distributed.checkpoint.filesystem", "os.system")
    resolves the dotted name through the module's own `os`, then calls it."""
    return (
        b"\x80\x04"
        + _pickle_str("torch.distributed.checkpoint.filesystem")
        + _pickle_str("os.system")
        + b"\x93"  # STACK_GLOBAL
        + _pickle_str(f"touch {marker}")
        + b"\x85R."  # TUPLE1, REDUCE, STOP
    )


class Planted:
    """torch.save(Planted(marker)) writes a file whose full unpickle runs `touch marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def one_line(stderr: str) -> list[str]:
    lines = [x for x in stderr.splitlines() if x.strip() and not x.startswith("[distres] ")]
    assert "Traceback" not in stderr, stderr[-2000:]
    return lines


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A short run with checkpoints at steps 1 and 2 (latest)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    proc = run_cli(
        f"run.dir={run}",
        "train.max_steps=2",
        "checkpoint.every_steps=1",
        "checkpoint.keep_last=3",
        "tracking.plots=false",
        "run.threads=1",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == [
        "step-00000001",
        "step-00000002",
    ]
    return run


@pytest.fixture
def run(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def latest(run: Path) -> Path:
    return run / "checkpoints" / "step-00000002"


def test_the_dotted_global_payload_is_real(tmp_path):
    marker = tmp_path / "ran"
    pickle.loads(dotted_global_payload(marker))  # a plain unpickler runs it
    assert marker.exists()
    other = tmp_path / "ran-2"
    with pytest.raises(pickle.UnpicklingError, match="refused"):
        _MetadataUnpickler(__import__("io").BytesIO(dotted_global_payload(other))).load()
    assert not other.exists()


@pytest.mark.slow
def test_crafted_metadata_runs_nothing_anywhere(run, tmp_path):
    marker = tmp_path / "pwned"
    (latest(run) / ".metadata").write_bytes(dotted_global_payload(marker))
    step2 = str(latest(run))
    for args, module in (
        ((step2, "--out", str(tmp_path / "w.safetensors")), "distres.export"),
        (("--checkpoint", step2), "distres.evaluate"),
        ((f"run.dir={run}", f"checkpoint.resume={step2}"), "distres.train"),
    ):
        proc = run_cli(*args, module=module, timeout=120)
        assert proc.returncode == EXIT_CHECKPOINT, (module, proc.stderr[-1500:])
        lines = one_line(proc.stderr)
        assert len(lines) == 1 and "refused to unpickle" in lines[0], (module, lines)
        assert ".metadata" in lines[0]
    # the directory of checkpoints: the crafted one is skipped, the one before is used
    proc = run_cli(
        str(run / "checkpoints"),
        "--out",
        str(tmp_path / "w.safetensors"),
        module="distres.export",
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert "skipping checkpoint" in proc.stderr and "step-00000001" in proc.stdout
    # plain re-running of the run dir (resume=auto) falls back too
    proc = run_cli(
        f"run.dir={run}", "train.max_steps=3", "tracking.plots=false", "run.threads=1", timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert "skipping checkpoint" in proc.stderr  # the user's one warning
    assert Path(resumes(run)[-1]["checkpoint"]).name == "step-00000001"
    assert not marker.exists()


@pytest.mark.slow
def test_format_switch_to_deepspeed_loads_nothing_unsafe(run, tmp_path):
    marker = tmp_path / "pwned"
    step = latest(run)
    meta = json.loads((step / "meta.json").read_text())
    meta["tensors"] = {"format": "deepspeed", "zero_stage": 0}
    (step / "meta.json").write_text(json.dumps(meta))
    (step / "deepspeed").mkdir()
    torch.save({"module": Planted(marker)}, step / "deepspeed" / "mp_rank_00_model_states.pt")
    out = str(tmp_path / "w.safetensors")
    for args, module in (
        ((str(step), "--out", out), "distres.export"),
        (("--checkpoint", str(step)), "distres.evaluate"),
    ):
        proc = run_cli(*args, module=module, timeout=120)
        assert proc.returncode == EXIT_CHECKPOINT, (module, proc.stderr[-1500:])
        lines = one_line(proc.stderr)
        assert len(lines) == 1 and "refused by the safe loader" in lines[0], lines
        assert "--trust-checkpoint" in lines[0]
    assert not marker.exists()
    # The file is a real payload: the explicit trust flag hands it to DeepSpeed's full
    # unpickler, which runs it.
    run_cli(str(step), "--out", out, "--trust-checkpoint", module="distres.export", timeout=120)
    assert marker.exists()


def _replace_a_non_tensor_item(step: Path, payload: bytes) -> str:
    """Point one of DCP's non-tensor items (an optimizer hyper-parameter) at `payload`,
    appended to its data file, in a .metadata written as DCP writes it."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    with open(step / ".metadata", "rb") as f:
        metadata = _MetadataUnpickler(f).load()
    index = next(
        i
        for i in metadata.storage_data
        if isinstance(metadata.state_dict_metadata[i.fqn], BytesStorageMetadata)
    )
    info = metadata.storage_data[index]
    data = step / info.relative_path
    offset = data.stat().st_size
    with open(data, "ab") as f:
        f.write(payload)
    metadata.storage_data[index] = _StorageInfo(info.relative_path, offset, len(payload))
    (step / ".metadata").write_bytes(pickle.dumps(metadata))
    return index.fqn


@pytest.mark.slow
def test_a_refused_dcp_item_is_one_line_and_auto_falls_back(run, tmp_path):
    import io

    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save(Planted(marker), buf)
    fqn = _replace_a_non_tensor_item(latest(run), buf.getvalue())
    proc = run_cli(f"run.dir={run}", f"checkpoint.resume={latest(run)}", timeout=120)
    assert proc.returncode == EXIT_CHECKPOINT, proc.stderr[-1500:]
    lines = one_line(proc.stderr)
    assert len(lines) == 1 and f"refused the non-tensor item {fqn!r}" in lines[0], lines
    proc = run_cli(
        f"run.dir={run}", "train.max_steps=3", "tracking.plots=false", "run.threads=1", timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert "skipping checkpoint" in proc.stderr
    assert Path(resumes(run)[-1]["checkpoint"]).name == "step-00000001"
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("not_json", r"rank-00000\.json: not a rank state \(UnicodeDecodeError"),
        ("not_a_state", r"rank-00000\.json: not a rank state \(no \"state\""),
        ("bad_dali", r"rank-00000\.json: data cannot be restored \(not a DALI pipeline checkp"),
        ("bad_rng", r"rank-00000\.json: rng cannot be restored \(RNG state does not restore"),
    ],
)
def test_broken_rank_files_are_one_line_or_skipped(run, damage, message):
    import re

    rank_file = latest(run) / "rank-00000.json"
    state = json.loads(rank_file.read_text())
    if damage == "not_json":
        rank_file.write_bytes(b"\xff\xfe\x00garbage")
    elif damage == "not_a_state":
        rank_file.write_text("[1, 2, 3]")
    elif damage == "bad_dali":
        state["state"]["data"]["dali"] = base64.b64encode(b"not a pipeline checkpoint").decode()
        rank_file.write_text(json.dumps(state))
    else:
        state["state"]["rng"]["numpy"][1] = [1, 2, 3]
        rank_file.write_text(json.dumps(state))
    from distres.checkpoint import CheckpointError, find_resume
    from distres.trainer.state import validate

    with pytest.raises(CheckpointError, match=message):  # what resume=PATH prints
        find_resume(run / "checkpoints", str(latest(run)), validate)
    # validated before any load: resume=auto takes the one before
    path, _ = find_resume(run / "checkpoints", "auto", validate)
    assert path.name == "step-00000001"
    if damage == "not_json":  # the CLI: that line alone, and the checkpoint exit code
        proc = run_cli(f"run.dir={run}", f"checkpoint.resume={latest(run)}", timeout=120)
        assert proc.returncode == EXIT_CHECKPOINT, proc.stderr[-1500:]
        lines = one_line(proc.stderr)
        assert len(lines) == 1 and re.search(message, lines[0]), lines


@pytest.mark.slow
@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("model", "resnet20"),
        ("layout.world_size", 0),
        ("step", None),
        ("state.engine.scaler", []),
        ("state.train.epoch", -1),
        ("state.early_stopping", None),
        ("tensors.format", "pickle"),
    ],
)
def test_a_meta_json_of_the_wrong_shape_is_one_line_or_skipped(run, path, value):
    from distres.checkpoint import CheckpointError, find_resume
    from distres.trainer.state import validate

    meta_file = latest(run) / "meta.json"
    meta = json.loads(meta_file.read_text())
    *parents, key = path.split(".")
    where = meta
    for p in parents:
        where = where[p]
    where[key] = value
    meta_file.write_text(json.dumps(meta))
    named = parents[1] if parents[:1] == ["state"] and len(parents) > 1 else key
    with pytest.raises(CheckpointError, match=rf"meta\.json: .*{named}"):
        find_resume(run / "checkpoints", str(latest(run)), validate)
    found, _ = find_resume(run / "checkpoints", "auto", validate)
    assert found.name == "step-00000001"


@pytest.mark.slow
def test_predict_refuses_bad_weights_and_python_yaml_tags(trained, tmp_path):
    final = tmp_path / "final"
    shutil.copytree(trained / "final", final)
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)

    def predict():
        weights = str(final / "model.safetensors")
        return run_cli("--weights", weights, str(image), module="distres.predict", timeout=120)

    assert predict().returncode == 0
    (final / "model.safetensors").write_bytes(b"PK\x03\x04 not safetensors at all")
    proc = predict()
    assert proc.returncode == EXIT_CHECKPOINT
    lines = one_line(proc.stderr)
    assert len(lines) == 1 and "model.safetensors: not a safetensors file" in lines[0], lines
    marker = tmp_path / "pwned"
    (final / "model.yaml").write_text(f"!!python/object/apply:os.system ['touch {marker}']\n")
    proc = predict()
    assert proc.returncode == EXIT_CHECKPOINT
    lines = one_line(proc.stderr)
    assert len(lines) == 1 and "model.yaml: not a model config" in lines[0], lines
    assert not marker.exists()


@pytest.mark.slow
def test_final_weights_are_byte_identical_across_processes(trained, tmp_path):
    """safetensors writes its metadata from a hash map seeded per process: save the same
    tensors in 4 new interpreters and compare the bytes (5 metadata keys: an unordered
    writer gives 4 equal files with odds of 1 in 120^3)."""
    script = (
        "import sys; from safetensors.torch import load_file; "
        "from distres.artifacts.final import write_safetensors; "
        "w = load_file(sys.argv[1]); "
        "write_safetensors(w, sys.argv[2], {'format': 'pt', 'model': 'resnet20', "
        "'b': '1', 'c': '2', 'd': '3'})"
    )
    source = trained / "final" / "model.safetensors"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(source), str(tmp_path / f"{i}.safetensors")],
            cwd=REPO,
        )
        for i in range(4)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0] * 4
    blobs = {(tmp_path / f"{i}.safetensors").read_bytes() for i in range(4)}
    assert len(blobs) == 1
    from safetensors.torch import load_file

    a, b = load_file(str(source)), load_file(str(tmp_path / "0.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_device_follows_the_visible_gpus(monkeypatch):
    """One visible GPU per task (--gpus-per-task=1): every local rank uses cuda:0; more local
    ranks than visible GPUs otherwise is one line."""
    from distres import dist
    from distres.config import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert dist.pick_device("auto", 5) == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert dist.pick_device("auto", 5) == torch.device("cuda", 5)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match="local rank 3 but this process sees 2 GPUs"):
        dist.pick_device("cuda", 3)
