"""Training runs and commands on shards in an S3 API server (moto, started here on
127.0.0.1): a SIGKILL and a resume from remote shards end bitwise equal to a run never
interrupted, also when the shards moved from disk to the bucket in between; a resume on
other shards is refused in one line; the writer and the index command work on a bucket."""

from __future__ import annotations

import io

import pyarrow.parquet as pq
import pytest
from commands import run_cli
from multiproc import EXACT, SMALL, assert_same_weights, kill_at_step, records, resumes, train
from PIL import Image
from remote_servers import Proxy, s3_client, s3_env, s3_server, upload_dir

from distres.data.shards.read import read_shard_set

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

BASE = [*EXACT, "data.backend=torch"]


@pytest.fixture(scope="module")
def s3(digits_dirs):
    train_dir, val_dir = digits_dirs
    with s3_server() as endpoint:
        client = s3_client(endpoint)
        upload_dir(client, train_dir, "data", "train")
        upload_dir(client, val_dir, "data", "val")
        tars = sorted(p for p in train_dir.iterdir() if p.suffix == ".tar")
        for n, prefix in ((4, "four"), (5, "five")):  # foreign sets: tars alone
            for tar in tars[:n]:
                client.upload_file(str(tar), "data", f"{prefix}/{tar.name}")
        yield endpoint


@pytest.fixture
def env(s3, monkeypatch) -> str:
    for key, value in s3_env(s3).items():
        monkeypatch.setenv(key, value)
    return s3


def shards_at(where: str, digits_dirs) -> list[str]:
    if where == "disk":
        return [f"data.train_shards={digits_dirs[0]}", f"data.val_shards={digits_dirs[1]}"]
    return ["data.train_shards=s3://data/train", "data.val_shards=s3://data/val"]


def test_sigkill_and_resume_from_s3_are_exact_also_after_a_move(env, digits_dirs, tmp_path,
                                                                 test_rng):  # fmt: skip
    """2 ranks: killed reading from S3 and resumed from S3, and killed reading from disk
    and resumed from the same shards in S3: both end bitwise equal to a run on disk never
    interrupted, with the same history."""
    whole = tmp_path / "whole"
    proc = train(2, whole, *BASE, *shards_at("disk", digits_dirs))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for before in ("s3", "disk"):
        run_dir = tmp_path / f"from-{before}"
        target = test_rng.choice([s for s in range(4, 21) if s not in (11, 12)])
        kill_at_step(run_dir, target, *BASE, *shards_at(before, digits_dirs))
        proc = train(2, run_dir, *BASE, *shards_at("s3", digits_dirs))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert len(resumes(run_dir)) == 1
        assert_same_weights(whole, run_dir)
        assert records(run_dir) == records(whole), f"killed at {target} reading from {before}"


def test_a_resume_on_other_shards_is_refused_in_one_line_unless_allowed(env, digits_dirs,
                                                                        tmp_path):  # fmt: skip
    """4 foreign shards (960 samples, 15 steps an epoch), checkpointed at step 4; resumed
    on 5 shards: refused, naming both sets; with data.allow_shard_change=true it goes on,
    restarting the epoch on the new set and saying so."""
    common = [*SMALL, f"run.dir={tmp_path}", f"data.val_shards={digits_dirs[1]}",
              "checkpoint.every_steps=4", "train.epochs=2", "data.backend=torch"]  # fmt: skip
    first = run_cli(*common, "data.train_shards=s3://data/four", "train.max_steps=4")
    assert first.returncode == 0, first.stderr[-3000:]
    other = [*common, "data.train_shards=s3://data/five", "train.max_steps=8"]
    refused = run_cli(*other)
    assert refused.returncode == 2, refused.stderr[-3000:]
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert "now 5 shards, 1200 samples" in lines[0] and "then 4 shards, 960 samples" in lines[0]
    assert "data.allow_shard_change=true" in lines[0]
    allowed = run_cli(*other, "data.allow_shard_change=true")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "restarts at its beginning on the new set (step 4 so far)" in allowed.stderr
    (resumed,) = resumes(tmp_path)[-1:]
    assert resumed["step"] == 4
    # evaluation and the per-sample ledger read (and name) the shards where they live
    ledger = run_cli("--checkpoint", str(tmp_path / "checkpoints"), "--ledger",
                     "data.val_shards=s3://data/val", module="distres.evaluate")  # fmt: skip
    assert ledger.returncode == 0, ledger.stderr[-3000:]
    shards = pq.read_table(tmp_path / "ledger" / "val.parquet").column("shard").to_pylist()
    assert "s3://data/val/val-000000.tar" in shards, set(shards)
    assert all(s.startswith("s3://data/val/val-") for s in shards), set(shards)


def test_a_missing_bucket_key_or_a_cache_below_one_shard_is_one_line(env, digits_dirs,
                                                                     tmp_path):  # fmt: skip
    missing = "data.train_shards=s3://data/nothere/x-{0..3}.tar"
    for setting, words in (
        ([missing], "s3://data/nothere/x-0.tar: not found"),
        (["data.train_shards=s3://data/train", "data.cache_limit=1kB"], "data.cache_limit=1000"),
    ):
        proc = run_cli(*SMALL, f"run.dir={tmp_path}", f"data.val_shards={digits_dirs[1]}",
                       *setting)  # fmt: skip
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and words in lines[0], proc.stderr


def _image_folder(root, classes: int = 3, per_class: int = 12) -> None:
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            img = Image.new("RGB", (40 + i, 30), (40 * c, 7 * i, 100))
            img.save(root / f"class{c}" / f"{i}.png")


def test_the_writer_uploads_each_shard_and_the_manifest_last(env, tmp_path, monkeypatch):
    src = tmp_path / "src"
    _image_folder(src)
    local = run_cli("--src", str(src), "--out", str(tmp_path / "local" / "train"),
                    "--shard-size", "8KB", module="distres.data.shards")  # fmt: skip
    assert local.returncode == 0, local.stderr
    with Proxy(env) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        proc = run_cli("--src", str(src), "--out", "s3://data/written/train",
                       "--shard-size", "8KB", module="distres.data.shards")  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert "-> s3://data/written/train/manifest.json" in proc.stdout
        puts = [p.split("?")[0] for m, p in proxy.requests if m == "PUT"]
        assert puts[-1] == "/data/written/train/manifest.json"
        assert len([p for p in puts if p.endswith(".tar")]) > 2
        remote = read_shard_set("s3://data/written/train")
        again = run_cli("--src", str(src), "--out", "s3://data/written/train",
                        module="distres.data.shards")  # fmt: skip
        assert again.returncode == 2 and "already there" in again.stderr
    here = read_shard_set(tmp_path / "local" / "train")
    assert remote.counts == here.counts and remote.sha256 == here.sha256
    assert remote.fingerprint() == here.fingerprint()


def test_the_index_command_indexes_shards_in_a_bucket(env, digits_dirs, tmp_path):
    client = s3_client(env)
    tars = sorted(p for p in digits_dirs[0].iterdir() if p.suffix == ".tar")
    for tar in tars[:3]:
        client.upload_file(str(tar), "data", f"toindex/{tar.name}")
    proc = run_cli("index", "s3://data/toindex", module="distres.data.shards", timeout=120)
    assert proc.returncode == 0, proc.stderr
    shards = read_shard_set("s3://data/toindex")
    local = read_shard_set(digits_dirs[0])
    assert shards.counts == local.counts[:3] and shards.sha256 == local.sha256[:3]
    listed = client.list_objects_v2(Bucket="data", Prefix="toindex/")["Contents"]
    assert "toindex/manifest.json" in {o["Key"] for o in listed}
    body = client.get_object(Bucket="data", Key="toindex/manifest.json")["Body"].read()
    assert io.BytesIO(body).read(1) == b"{"
