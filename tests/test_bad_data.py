"""data.on_bad_sample=error|skip, for each kind of bad data; never a hang, never a wrong label."""

from __future__ import annotations

import io
import json

import pytest
import torch
import webdataset as wds
from commands import run_cli
from multiproc import train
from PIL import Image

from distres.data.api import DataError
from distres.data.shards.manifest import ShardError
from distres.data.shards.read import read_shard_set
from distres.data.shards.write import write_shards
from distres.data.spec import LoaderSpec
from distres.data.torch.loader import ShardLoader
from distres.data.torch.transforms import val_transform

CLASSES = {str(i): i for i in range(10)}


def jpeg(value: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (value, value, value)).save(buf, format="JPEG")
    return buf.getvalue()


def good(n: int, start: int = 0) -> list:
    return [(f"good{k:03d}", jpeg(k), k % 10) for k in range(start, start + n)]


def loader(root, policy: str, train: bool = False, batch: int = 4) -> ShardLoader:
    return ShardLoader(
        LoaderSpec(
            read_shard_set(root),
            train=train,
            batch_size=batch,
            transform=val_transform(32, 0),
            mean=[0.5],
            std=[0.5],
            num_classes=10,
            skip_bad=policy == "skip",
            shuffle_buffer=1,
        )
    )


def labels(loader_) -> list[int]:
    return torch.cat([b.labels for b in loader_]).tolist()


@pytest.fixture
def corrupt_jpeg(tmp_path):
    write_shards(
        [*good(5), ("broken", b"\xff\xd8 not a jpeg", 3), *good(2, 5)], tmp_path, "x", CLASSES, 100
    )
    return tmp_path


@pytest.fixture
def label_out_of_range(tmp_path):
    write_shards([*good(3), ("bad-label", jpeg(), 12), *good(3, 3)], tmp_path, "x", CLASSES, 100)
    return tmp_path


@pytest.fixture
def missing_cls(tmp_path):
    write_shards(good(6), tmp_path, "x", CLASSES, 100)
    with wds.TarWriter(str(tmp_path / "x-000000.tar"), mtime=0.0) as w:  # rewrite with a gap
        for key, data, label in good(3):
            w.write({"__key__": key, "jpg": data, "cls": str(label).encode()})
        w.write({"__key__": "no-label", "jpg": jpeg()})
        for key, data, label in good(3, 3):
            w.write({"__key__": key, "jpg": data, "cls": str(label).encode()})
    return tmp_path


@pytest.fixture
def truncated_tar(tmp_path):
    write_shards(good(8) + good(8, 8), tmp_path, "x", CLASSES, 8)
    first = tmp_path / "x-000000.tar"
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 2 + 100])
    return tmp_path


CASES = {
    "corrupt_jpeg": ("corrupt_jpeg", r"sample 'broken': cannot decode", 7),
    "label_out_of_range": ("label_out_of_range", r"sample 'bad-label': label 12 outside", 6),
    "missing_cls": ("missing_cls", r"sample 'no-label': no \.cls member", 6),
    # A tar cut mid-member ends in a partial sample (or an unreadable-tar error): either way
    # the message names the shard.
    "truncated_tar": ("truncated_tar", r"x-000000\.tar: (unreadable tar|sample 'good0\d\d')", None),
}


@pytest.mark.parametrize("case", CASES)
def test_error_policy_names_the_shard_and_key(case, request):
    fixture, message, _ = CASES[case]
    root = request.getfixturevalue(fixture)
    with pytest.raises(DataError, match=message):
        labels(loader(root, "error"))


@pytest.mark.parametrize("case", CASES)
def test_skip_policy_counts_and_keeps_every_good_sample(case, request, capfd):
    fixture, _, n_good = CASES[case]
    root = request.getfixturevalue(fixture)
    lo = loader(root, "skip")
    got = labels(lo)
    assert lo.skipped == 1 or (n_good is None and lo.skipped >= 1)
    assert "skipped bad data" in capfd.readouterr().err
    if n_good is not None:
        assert len(got) == n_good
        assert got == [i % 10 for i in range(n_good)]  # no label shifted onto another image
    else:  # the truncated shard keeps the samples before the cut; the other shard is whole
        assert 8 <= len(got) < 16 and got[-8:] == [i % 10 for i in range(8, 16)]


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["error", "skip"])
def test_listed_but_missing_shard_stops_before_training(tmp_path, policy):
    write_shards(good(8), tmp_path, "x", CLASSES, 4)
    (tmp_path / "x-000001.tar").unlink()
    with pytest.raises(ShardError, match=r"x-000001\.tar: listed in .* but missing"):
        read_shard_set(tmp_path)
    proc = run_cli(
        "data.dataset=shards",
        f"data.train_shards={tmp_path}",
        f"data.val_shards={tmp_path}",
        f"data.on_bad_sample={policy}",
        f"run.dir={tmp_path / 'run'}",
        timeout=120,
    )
    assert proc.returncode == 2 and "x-000001.tar" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_empty_shard_list_stops_before_training(tmp_path):
    write_shards(good(2), tmp_path, "x", CLASSES, 4)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"] = []
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    proc = run_cli(
        "data.dataset=shards",
        f"data.train_shards={tmp_path}",
        f"data.val_shards={tmp_path}",
        f"run.dir={tmp_path / 'run'}",
        timeout=120,
    )
    assert proc.returncode == 2 and "lists no shards" in proc.stderr


@pytest.mark.slow
def test_skipping_never_shortens_a_training_epoch(tmp_path):
    """Every rank must run the agreed number of steps: a rank short of samples re-reads."""
    bad = [(f"bad{i}", b"\xff\xd8 junk", 1) for i in range(6)]
    write_shards(good(10) + bad + good(4, 10), tmp_path, "x", CLASSES, 10)
    lo = loader(tmp_path, "skip", train=True, batch=4)
    assert len(lo) == 5  # from the manifest: 20 samples // 4
    batches = list(lo)
    assert len(batches) == 5 and all(len(b.labels) == 4 for b in batches)
    assert lo.skipped >= 6


@pytest.mark.slow
def test_all_bad_is_an_error_not_a_hang(tmp_path):
    write_shards([(f"bad{i}", b"\xff\xd8 junk", 1) for i in range(8)], tmp_path, "x", CLASSES, 8)
    with pytest.raises(DataError, match="no usable sample"):
        list(loader(tmp_path, "skip", train=True, batch=4))


def _bad_shard_set(tmp_path):
    # 4 shards of 30; batch 6 divides a rank's 60 samples, so every sample is read.
    samples = [*good(60), ("broken", b"\xff\xd8 not a jpeg", 3), *good(59, 61)]
    write_shards(samples, tmp_path / "train", "train", CLASSES, 30)
    write_shards(good(20), tmp_path / "val", "val", CLASSES, 10)
    return [
        f"data.train_shards={tmp_path / 'train'}",
        f"data.val_shards={tmp_path / 'val'}",
        "data.dataset=shards",
        "data.backend=torch",
        "train.batch_size=6",
        "train.epochs=2",
        "tracking.log_every=4",
        "run.threads=1",
    ]


@pytest.mark.slow
def test_skip_runs_to_completion_and_reports_the_count(tmp_path):
    proc = run_cli(
        *_bad_shard_set(tmp_path),
        "data.on_bad_sample=skip",
        f"run.dir={tmp_path / 'run'}",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [
        json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().split("\n") if x
    ]
    assert max(r.get("data/skipped", 0) for r in records) >= 1
    assert "broken" in proc.stderr


@pytest.mark.slow
def test_error_stops_every_rank_without_a_hang(tmp_path):
    proc = train(
        2,
        tmp_path / "run",
        *_bad_shard_set(tmp_path),
        "data.on_bad_sample=error",
        timeout=240,
    )
    assert proc.returncode != 0
    assert "sample 'broken': cannot decode" in proc.stdout + proc.stderr


def test_a_worker_error_leaves_no_worker_behind(corrupt_jpeg):
    """The error is raised in a DataLoader worker; its traceback (kept here by pytest.raises)
    must not keep the worker alive: workers ignore SIGTERM, so the interpreter's exit, which
    joins its children, would wait for it forever."""
    import multiprocessing as mp

    before = set(mp.active_children())
    ld = loader(corrupt_jpeg, "error")
    ld.num_workers = 1
    with pytest.raises(DataError, match="broken") as caught:
        list(ld)
    assert caught.value is not None
    assert set(mp.active_children()) <= before
