"""Shards written by someone else: webdataset's ShardWriter in the ImageNet layout (KEY.jpg,
KEY.cls, KEY.json), no manifest, no DALI index. They train as they are, from a brace pattern,
under both backends, and distres.evaluate reads them."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from commands import run_cli

from distres.data.dali.loader import dali_available
from distres.data.shards.read import read_shard_set

pytestmark = pytest.mark.slow


def rewrite_foreign(src_dir: Path, out: Path, prefix: str, per_shard: int) -> str:
    """The digits shards' samples, rewritten by webdataset.ShardWriter; the brace pattern."""
    out.mkdir(parents=True)
    samples = []
    for url in read_shard_set(src_dir).urls:
        with tarfile.open(url) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for key in sorted({n.split(".", 1)[0] for n in members}):
            samples.append((key, members[f"{key}.jpg"], members[f"{key}.cls"]))
    with wds.ShardWriter(str(out / f"{prefix}-%06d.tar"), maxcount=per_shard, verbose=0) as w:
        for key, jpg, cls in samples:
            w.write(
                {
                    "__key__": f"n{key}",
                    "jpg": jpg,
                    "cls": cls,
                    "json": json.dumps({"source": "foreign"}).encode(),
                }
            )
    last = len(list(out.glob("*.tar"))) - 1
    return str(out / f"{prefix}-{{000000..{last:06d}}}.tar")


@pytest.fixture(scope="module")
def foreign(tmp_path_factory, digits_dirs) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("foreign")
    train = rewrite_foreign(digits_dirs[0], root / "train", "train", 359)  # 4 shards
    val = rewrite_foreign(digits_dirs[1], root / "val", "val", 181)  # 2 shards
    assert not list(root.rglob("*.idx")) and not list(root.rglob("manifest.json"))
    return train, val


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_foreign_shards_train_from_a_brace_pattern(foreign, tmp_path, backend):
    if backend == "dali" and not dali_available():
        pytest.skip("nvidia-dali not installed")
    train, val = foreign
    assert read_shard_set(train).num_samples == 1436 and read_shard_set(val).num_samples == 361
    run = tmp_path / "run"
    proc = run_cli(
        f"data.train_shards={train}",
        f"data.val_shards={val}",
        f"data.backend={backend}",
        "train.max_steps=6",
        "tracking.plots=false",
        "run.threads=1",
        f"run.dir={run}",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["final_val_top1"] is not None
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["val/samples"] for r in evals if "val/samples" in r] == [361]
    info = json.loads((run / "final" / "inference.json").read_text())
    assert info["classes"] == [str(i) for i in range(10)]  # counted from the .cls members
    if backend == "torch":
        proc = run_cli(
            "--checkpoint", str(run / "checkpoints"), module="distres.evaluate", timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        result = json.loads(proc.stdout.splitlines()[0])
        assert result["val/samples"] == 361
        assert result["val/top1"] == pytest.approx(summary["final_val_top1"], abs=1e-9)


def test_dali_missing_cls_is_one_line_or_skipped(tmp_path, digits_dirs):
    if not dali_available():
        pytest.skip("nvidia-dali not installed")
    train = rewrite_foreign(digits_dirs[0], tmp_path / "train", "train", 359)
    first = tmp_path / "train" / "train-000000.tar"
    with tarfile.open(first) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(first, "w") as tar:  # the same shard, one sample's .cls left out
        for member, data in members:
            if member.name != "n00070.cls":
                tar.addfile(member, __import__("io").BytesIO(data))
    common = [
        f"data.train_shards={train}",
        f"data.val_shards={digits_dirs[1]}",
        "data.backend=dali",
        "train.max_steps=2",
        "tracking.plots=false",
        "run.threads=1",
        "checkpoint.on_stop=false",
    ]
    proc = run_cli(*common, f"run.dir={tmp_path / 'a'}", timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if "n00070" in x]
    assert "train-000000.tar: sample 'n00070': no .cls member" in line
    proc = run_cli(*common, "data.on_bad_sample=skip", f"run.dir={tmp_path / 'b'}", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipped bad data" in proc.stderr and "n00070" in proc.stderr
