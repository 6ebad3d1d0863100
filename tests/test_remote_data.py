"""Shards where they live: an S3 API server (moto, started here), a plain HTTP server and
`pipe:cat`, read through the node-local cache; faults injected by a proxy of our own.

Every server listens on 127.0.0.1 and is started by the tests; every wait is bounded."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
import torch
from remote_servers import (
    PeakDisk,
    Proxy,
    http_server,
    is_get,
    s3_client,
    s3_env,
    s3_server,
    upload_dir,
)

from distres.data.api import DataError
from distres.data.shards.cache import CacheLimitError, ShardCache
from distres.data.shards.digits import digits
from distres.data.shards.manifest import ShardError
from distres.data.shards.read import read_shard_set
from distres.data.shards.storage import Transfer
from distres.data.spec import LoaderSpec
from distres.data.torch.loader import ShardLoader
from distres.data.torch.stream import tar_samples

pytestmark = pytest.mark.timeout(300)

TARS = "train-{000000..000005}.tar"


@pytest.fixture(scope="module")
def local() -> Path:
    return digits()[0]  # 6 shards, 1,436 samples, with manifest.json and DALI indexes


@pytest.fixture(scope="module")
def s3(local):
    with s3_server() as endpoint:
        client = s3_client(endpoint)
        upload_dir(client, local, "data", "train")  # manifest, tars, indexes
        upload_dir(client, local, "data", "foreign", only=".tar")  # tars alone
        yield endpoint


@pytest.fixture
def env(s3, tmp_path, monkeypatch) -> str:
    """The AWS variables pointing at the server; the cache (and scan cache) in tmp_path."""
    for key, value in s3_env(s3).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DISTRES_CACHE", str(tmp_path / "cache"))
    return s3


def cache_in(tmp_path: Path, **kw) -> ShardCache:
    return ShardCache(tmp_path / "cache", **kw)


def samples(shards) -> list[tuple]:
    """(shard, key, every member's bytes) of every sample, shard by shard, in tar order."""
    out = []
    for i in range(len(shards.urls)):
        with shards.local(i) as path, open(path, "rb") as f:
            for s in tar_samples(f, shards.urls[i]):
                out.append((i, s["__key__"], s["jpg"], s["cls"], s.get("json")))
    return out


def batches(shards, decode="cpu", workers=0, epochs=1, train=True, streams=0):
    loader = ShardLoader(
        LoaderSpec(
            shards,
            train=train,
            batch_size=64,
            mean=(0.5,) * 3,
            std=(0.25,) * 3,
            num_classes=10,
            image_size=16,
            random_resized_crop=True,
            seed=3,
            num_workers=workers,
            decode=decode,
            streams=streams,
        )
    )
    out = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        out += [(b.images.clone(), b.labels.clone()) for b in loader]
    return out, loader


def assert_same(a, b) -> None:
    assert len(a) == len(b) > 0
    for (x1, y1), (x2, y2) in zip(a, b, strict=True):
        assert torch.equal(y1, y2)
        assert torch.equal(x1, x2)


# -- the same samples from every source ----------------------------------------------------
def test_every_source_reads_the_same_samples(env, local, tmp_path):
    """Byte-identical samples in the same order from a local directory, an S3 prefix with a
    manifest, one without (scanned with ranged reads), an S3 brace pattern, a plain HTTP
    server (no Range support) and pipe:cat; the fingerprint ignores where they live."""
    ref = read_shard_set(str(local))
    want = samples(ref)
    with http_server(local) as web:
        specs = [
            "s3://data/train",
            "s3://data/foreign",
            f"s3://data/foreign/{TARS}",
            f"{web}/{TARS}",
            f"{web}/manifest.json",
            f"pipe:cat {local}/{TARS}",
        ]
        for spec in specs:
            shards = read_shard_set(spec, cache_in(tmp_path))
            assert shards.counts == ref.counts, spec
            assert shards.classes == ref.classes, spec
            assert samples(shards) == want, spec
            if "foreign" not in spec and "pipe" not in spec:  # a manifest: the same checksums
                assert shards.fingerprint() == ref.fingerprint(), spec


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_batches_from_s3_equal_those_from_disk(env, local, tmp_path, decode):
    """The torch backend (decoding in two workers) and the GPU-decode stage (its CPU
    stand-in) give bitwise the batches of the local set, from S3 and from pipe:."""
    ref, _ = batches(read_shard_set(str(local)), decode, workers=2)
    got, _ = batches(read_shard_set("s3://data/train", cache_in(tmp_path)), decode, workers=2)
    assert_same(got, ref)
    piped = read_shard_set(f"pipe:cat {local}/{TARS}", cache_in(tmp_path))
    assert_same(batches(piped, decode, workers=2)[0], ref)


# -- the cache -----------------------------------------------------------------------------
def test_one_download_per_shard_per_node_and_none_in_epoch_two(env, local, tmp_path, monkeypatch):
    """Three processes (the ranks of a node), two DataLoader workers each, read every shard
    at once: each shard is downloaded once. Epoch 2 makes no request at all."""
    with Proxy(env) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        shards = read_shard_set("s3://data/train", cache_in(tmp_path))
        proxy.reset_counts()
        ranks = [
            subprocess.Popen([sys.executable, "-c", READ_ALL, str(tmp_path / "cache"), str(r)])
            for r in range(3)
        ]
        try:
            assert [p.wait(120) for p in ranks] == [0, 0, 0]
        finally:
            for p in ranks:
                p.kill()
        gets = proxy.per_path("GET")
        tars = {k: v for k, v in gets.items() if k.endswith(".tar")}
        assert len(tars) == 6 and set(tars.values()) == {1}, gets
        proxy.reset_counts()
        again, _ = batches(shards, workers=2, epochs=2)
        assert proxy.count() == 0, proxy.requests
    assert_same(again, batches(read_shard_set(str(local)), workers=2, epochs=2)[0])


# evaluation on 8 ranks of a 6-shard set: every rank reads every shard (strided)
READ_ALL = """
import sys
from pathlib import Path
from distres.data.shards.cache import ShardCache
from distres.data.shards.read import read_shard_set
from distres.data.spec import LoaderSpec
from distres.data.torch.loader import ShardLoader
shards = read_shard_set("s3://data/train", ShardCache(Path(sys.argv[1])))
loader = ShardLoader(LoaderSpec(shards, train=False, batch_size=50, mean=(0.5,), std=(0.25,),
                                num_classes=10, image_size=16, rank=int(sys.argv[2]),
                                world_size=8, num_workers=2))
assert sum(len(b.labels) for b in loader) == loader.num_samples()
"""


def test_the_cache_limit_holds_and_local_shards_are_never_touched(env, local, tmp_path):
    """A limit of 2.5 shards over 2 epochs: shards are evicted least recently used first,
    the disk never holds more than the limit plus the shards in flight, and the batches are
    those of the local set. A file of the user's in the cache directory stays."""
    biggest = max(f.stat().st_size for f in local.glob("*.tar"))
    limit = int(2.5 * biggest)
    cache = cache_in(tmp_path, limit=limit, prefetch=2)
    mine = cache.dir / "train-000000.tar"  # looks like a shard; not the cache's own
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"x" * 1000)
    shards = read_shard_set("s3://data/train", cache)
    with pytest.raises(DataError, match=r"reads 6 shards at once .*data.streams=24"):
        batches(shards)  # 24 streams on one rank: every shard open at once
    with PeakDisk(cache.dir) as disk:
        got, _ = batches(shards, epochs=2, streams=2)  # two shards at a time
    assert disk.peak <= limit + 1000 + (cache.prefetch + 1) * biggest, (disk.peak, limit)
    kept = [p for p in cache.dir.iterdir() if p.suffix == ".tar" and p != mine]
    assert sum(p.stat().st_size for p in kept) <= limit and len(kept) < 6
    assert mine.read_bytes() == b"x" * 1000
    assert_same(got, batches(read_shard_set(str(local)), epochs=2, streams=2)[0])


def test_a_limit_below_one_shard_is_refused_at_start(env, tmp_path):
    with pytest.raises(CacheLimitError, match=r"data.cache_limit=1000 bytes .*train-0000"):
        read_shard_set("s3://data/train", cache_in(tmp_path, limit=1000))


def test_a_sigkill_mid_download_leaves_nothing_stuck(env, tmp_path, monkeypatch):
    """A process SIGKILLed while downloading (its lock held, its .part half written): a
    reader that was waiting for it takes over, and a fresh start works at once."""
    big = io.BytesIO()
    payload = os.urandom(3 << 20)
    with tarfile.open(fileobj=big, mode="w") as tar:
        for name, data in (("a.bin", payload), ("a.cls", b"1")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    s3_client(env).put_object(Bucket="data", Key="big/big-000000.tar", Body=big.getvalue())
    url, size = "s3://data/big/big-000000.tar", len(big.getvalue())
    cache = cache_in(tmp_path, transfer=Transfer(retries=3, timeout=10, backoff=0.1))
    with Proxy(env, bandwidth=1 << 20) as proxy:  # 1 MiB/s: 3 s to download (one GET)
        child_env = {**os.environ, "AWS_ENDPOINT_URL": proxy.url}
        code = (
            "import sys; from pathlib import Path; from distres.data.shards.cache import "
            "ShardCache; ShardCache(Path(sys.argv[1])).fetch(sys.argv[2], int(sys.argv[3]))"
        )
        child = subprocess.Popen(
            [sys.executable, "-c", code, str(cache.root), url, str(size)], env=child_env
        )
        part = cache.path_of(url).with_name(cache.path_of(url).name + ".part")
        deadline = time.monotonic() + 60
        while not part.exists() and time.monotonic() < deadline:  # created as it starts
            time.sleep(0.01)
        assert part.exists(), "the download never started"
        # a second reader on the node waits for that download
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        waited: dict = {}

        def wait_for_it():
            with cache.reading(url, size) as path:
                waited["bytes"] = path.read_bytes()

        waiter = threading.Thread(target=wait_for_it, daemon=True)
        waiter.start()
        time.sleep(0.3)
        assert "bytes" not in waited
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        proxy.bandwidth = 0
        waiter.join(60)
        assert waited.get("bytes") == big.getvalue()
    fresh = cache_in(tmp_path)
    with fresh.reading(url, size) as path:
        assert path.read_bytes() == big.getvalue()
    assert not part.exists()


# -- network faults ------------------------------------------------------------------------
FAULTS = ["503", "reset", "truncate", "stall"]


@pytest.mark.parametrize("source", ["s3", "http"])
@pytest.mark.parametrize("kind", FAULTS)
def test_a_fault_is_retried_and_nothing_is_lost_or_repeated(env, local, tmp_path, monkeypatch,
                                                            kind, source):  # fmt: skip
    """One fault on the first GET of every shard (two, for stalls): each is retried from
    the byte it reached, once, and the samples are exactly the local set's."""
    want = samples(read_shard_set(str(local)))
    transfer = Transfer(retries=3, timeout=1.0, backoff=0.01)
    with http_server(local) as web, Proxy(env if source == "s3" else web) as proxy:
        proxy.stall_s = 4.0
        if source == "s3":
            monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
            spec = "s3://data/train"
        else:
            spec = f"{proxy.url}/manifest.json"
        shards = read_shard_set(spec, cache_in(tmp_path, transfer=transfer))
        proxy.reset_counts()
        faulty = (1, 4) if kind == "stall" else range(6)  # a stall costs a read timeout
        for n in faulty:
            proxy.inject(kind, is_get(f"train-{n:06d}.tar"))
        assert samples(shards) == want
        gets = {k: v for k, v in proxy.per_path("GET").items() if k.endswith(".tar")}
        # the fault, then the rest of the body; the others once
        assert len(gets) == 6, gets
        assert all(v == (2 if int(k[-10:-4]) in faulty else 1) for k, v in gets.items()), gets


def test_a_fault_that_outlasts_the_budget_names_the_shard(env, local, tmp_path, monkeypatch):
    """503s on one shard for good: after data.retries attempts, an error naming the URL
    and the shard (data.on_bad_sample=error), or its samples counted as skipped (skip)."""
    transfer = Transfer(retries=3, timeout=5.0, backoff=0.01)
    with Proxy(env) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        shards = read_shard_set("s3://data/train", cache_in(tmp_path, transfer=transfer))
        proxy.inject("503", is_get("train-000002.tar"), times=1000)
        with pytest.raises(DataError, match=r"s3://data/train/train-000002.tar.*shard 2 "):
            batches(shards, train=False)
        assert proxy.per_path("GET")["/data/train/train-000002.tar"] == 3
        spec = LoaderSpec(shards, train=False, batch_size=64, mean=(0.5,), std=(0.25,),
                          num_classes=10, image_size=16, skip_bad=True)  # fmt: skip
        loader = ShardLoader(spec)
        seen = sum(len(b.labels) for b in loader)
        assert loader.skipped == shards.counts[2]
        assert seen == shards.num_samples - shards.counts[2]


def test_not_found_and_access_denied_are_one_line_before_any_read(env, tmp_path, monkeypatch):
    with pytest.raises(ShardError, match=r"^s3://data/nothere/x.tar: not found"):
        read_shard_set("s3://data/nothere/x.tar", cache_in(tmp_path))
    with Proxy(env) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        proxy.inject("403", lambda m, p: True, times=1000)
        with pytest.raises(ShardError, match=r"s3://data/train.*access denied"):
            read_shard_set("s3://data/train", cache_in(tmp_path))
        assert proxy.count() == 1  # never retried


def test_dali_reads_remote_shards_through_the_cache(env, local, tmp_path):
    pytest.importorskip("nvidia.dali")
    from distres.data.dali.loader import DaliLoader

    def run(shards):
        spec = LoaderSpec(shards, train=True, batch_size=64, mean=(0.5,) * 3, std=(0.25,) * 3,
                          num_classes=10, image_size=16, random_resized_crop=True, seed=3,
                          threads=1, epochs=1)  # fmt: skip
        loader = DaliLoader(spec)
        try:
            return [(b.images.clone(), b.labels.clone()) for b in loader]
        finally:
            loader.close()

    assert_same(run(read_shard_set("s3://data/train", cache_in(tmp_path))),
                run(read_shard_set(str(local))))  # fmt: skip
    limit = 2 * max(f.stat().st_size for f in local.glob("*.tar"))  # 2 of the 6 shards
    small = read_shard_set("s3://data/train", cache_in(tmp_path / "b", limit=limit))
    with pytest.raises(CacheLimitError, match=r"data\.backend=dali reads local files"):
        run(small)


def test_a_pipe_manifest_cannot_smuggle_a_command(tmp_path, local):
    """A manifest read through pipe: names its shards relative to the command; a name that
    is not a plain file name would become part of a shell command, and is refused."""
    import json

    manifest = json.loads((local / "manifest.json").read_text())
    manifest["shards"][0]["name"] = "train-000000.tar; touch " + str(tmp_path / "pwned")
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="not a plain file name"):
        read_shard_set(f"pipe:cat {tmp_path}/manifest.json", cache_in(tmp_path))
    assert not (tmp_path / "pwned").exists()


def test_a_process_exits_without_finishing_its_queued_prefetches(env, tmp_path):
    """Queued downloads are daemon work: a run that stops early exits at once instead of
    first fetching the rest of its epoch over a slow link."""
    with Proxy(env, bandwidth=256 << 10) as proxy:  # 5 s a shard
        code = (
            "import sys; from pathlib import Path; "
            "from distres.data.shards.cache import ShardCache; "
            "from distres.data.shards.read import read_shard_set; "
            "s = read_shard_set('s3://data/train', ShardCache(Path(sys.argv[1]))); "
            "s.prefetch(list(range(6)), threads=2)"
        )
        child = subprocess.run([sys.executable, "-c", code, str(tmp_path / "c")], timeout=60,
                               env={**os.environ, "AWS_ENDPOINT_URL": proxy.url})  # fmt: skip
        assert child.returncode == 0
        assert sum(1 for m, p in proxy.requests if m == "GET" and p.endswith(".tar")) <= 2


def test_a_transient_error_on_a_head_is_retried_not_a_404(env, local, tmp_path):
    with http_server(local) as web, Proxy(web) as proxy:
        # fsspec's HEAD, then its GET fallback: it reports a FileNotFoundError caused by 503
        proxy.inject("503", lambda m, p: "train-000003" in p, times=2)
        shards = read_shard_set(f"{proxy.url}/{TARS}", cache_in(tmp_path))
        assert shards.counts == read_shard_set(str(local)).counts
        assert proxy.count(None, "train-000003") >= 3


def test_a_full_cache_disk_is_a_write_error_not_a_bad_shard(env, tmp_path):
    """The cache's disk fills up: the read stops with exit 7 naming the file, even with
    data.on_bad_sample=skip (it is not the shard's fault), and is not retried."""
    from distres.errors import WRITE, WriteError

    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    where = tmp_path / "fs"
    where.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=1500k", "tmpfs", str(where)]
    if subprocess.run(mount, capture_output=True, timeout=30).returncode != 0:
        pytest.skip("no tmpfs here")
    try:
        shards = read_shard_set("s3://data/train", ShardCache(where))
        spec = LoaderSpec(shards, train=False, batch_size=64, mean=(0.5,), std=(0.25,),
                          num_classes=10, image_size=16, skip_bad=True)  # fmt: skip
        with pytest.raises(WriteError, match=r"\.part: cannot write s3://data/train/") as e:
            list(ShardLoader(spec))
        assert e.value.exit_code == WRITE
    finally:
        subprocess.run(["umount", "-l", str(where)], timeout=30)


def test_indexing_a_set_later_or_moving_it_keeps_its_fingerprint(env, local, tmp_path):
    """A foreign set (sizes known, no checksums), then the same tars with a manifest
    (checksums too), in a bucket, or through pipe: (no sizes): one set for a resume."""
    from types import SimpleNamespace

    from distres.config import Config
    from distres.trainer.resume import shard_change

    foreign = read_shard_set("s3://data/foreign", cache_in(tmp_path))
    meta = {"data": {"train": foreign.fingerprint()}}
    cfg = Config()
    cfg.data.dataset = "shards"
    for spec in (str(local), "s3://data/train", f"pipe:cat {local}/{TARS}"):
        loader = SimpleNamespace(spec=SimpleNamespace(shards=read_shard_set(spec)))
        assert shard_change(cfg, Path("ckpt"), meta, loader) is None, spec
    fewer = SimpleNamespace(
        spec=SimpleNamespace(shards=read_shard_set(f"{local}/train-00000{{0..4}}.tar"))
    )
    with pytest.raises(Exception, match="now 5 shards, 1200 samples"):
        shard_change(cfg, Path("ckpt"), meta, fewer)


def test_gcs_shards_read_like_the_local_ones(local, tmp_path, monkeypatch):
    """gs:// through gcsfs against a GCS API server started here: the same samples, the
    manifest found, a missing object one line."""
    from remote_servers import gcs_server

    with gcs_server() as endpoint:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", endpoint)
        monkeypatch.setenv("DISTRES_CACHE", str(tmp_path / "cache"))
        from distres.data.shards import storage

        for f in sorted(local.iterdir()):
            storage.upload(str(f), f"gs://data/train/{f.name}", Transfer())
        shards = read_shard_set("gs://data/train", cache_in(tmp_path))
        ref = read_shard_set(str(local))
        assert shards.counts == ref.counts and shards.fingerprint() == ref.fingerprint()
        assert samples(shards) == samples(ref)
        with pytest.raises(ShardError, match=r"^gs://data/nothere/x.tar: not found"):
            read_shard_set("gs://data/nothere/x.tar", cache_in(tmp_path))
