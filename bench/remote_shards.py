"""Training input from an S3 API server behind a slow link, against the same shards on disk.

    python3 bench/remote_shards.py [--shards 32] [--per-shard 400] [--latency 0.05]
                                   [--bandwidth 20e6] [--workers 2] [--epochs 2]

Writes a synthetic shard set (photo-like JPEGs, 96 px), uploads it to moto's S3 server
(started here, on 127.0.0.1) and reads it through a proxy that adds `--latency` seconds to
every request and caps each connection at `--bandwidth` bytes/s. For each epoch it prints
img/s of the torch backend's training loader (decode and augmentation in `--workers`
DataLoader workers, 64 px crops) reading:

  local    the shards on local disk
  s3       s3://bench/train through the node-local cache (data.prefetch shards ahead)

and the requests the server saw in each epoch (the median of --repeats runs, interleaved;
each s3 run starts with a cold cache). Epoch 1 pays for a cold cache; epoch 2 reads
from it and makes no request. Start-up (reading the manifest, listing the prefix) is timed
apart. Targets on a 2-core machine: epoch 1 >= 0.9 of local, epoch 2 >= 0.98.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from remote_servers import Proxy, s3_client, s3_env, s3_server, upload_dir

from distres.data.shards.cache import ShardCache
from distres.data.shards.read import read_shard_set
from distres.data.shards.write import write_shards
from distres.data.spec import LoaderSpec
from distres.data.torch.loader import ShardLoader


def synthetic(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        # smooth noise compresses like a photo, not like white noise
        small = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((96, 96), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        yield f"{i:09d}", buf.getvalue(), i % 100


def server_cpu(port: str) -> float:
    """CPU seconds the S3 server has used so far. With the proxy's, what the servers take
    from the cores the loader decodes on (a real object store runs elsewhere)."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "moto.server" in cmd and port in cmd:
            t = proc.cpu_times()
            return t.user + t.system
    return 0.0


def epoch_rates(shards, workers: int, epochs: int, proxy: Proxy | None = None,
                port: str = "") -> list[tuple]:  # fmt: skip
    loader = ShardLoader(
        LoaderSpec(
            shards,
            train=True,
            batch_size=64,
            mean=(0.5,) * 3,
            std=(0.25,) * 3,
            num_classes=100,
            image_size=64,
            random_resized_crop=True,
            hflip=True,
            seed=0,
            num_workers=workers,
        )
    )
    out = []
    for epoch in range(epochs):
        if proxy is not None:
            proxy.reset_counts()
        loader.set_epoch(epoch)
        cpu0 = (server_cpu(port) + proxy.cpu) if port else 0.0
        t0, n = time.perf_counter(), 0
        for batch in loader:
            n += len(batch.labels)
        seconds = time.perf_counter() - t0
        cpu = (server_cpu(port) + proxy.cpu - cpu0) if port else 0.0
        out.append((n / seconds, seconds, proxy.count() if proxy is not None else 0, cpu))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", type=int, default=32)
    p.add_argument("--per-shard", type=int, default=400)
    p.add_argument("--latency", type=float, default=0.05, help="seconds added per request")
    p.add_argument("--bandwidth", type=float, default=20e6, help="bytes/s per connection")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="runs of each; the median is shown")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="distres-bench-") as tmp:
        local = Path(tmp) / "train"
        n = args.shards * args.per_shard
        write_shards(synthetic(n), local, "train", {str(i): i for i in range(100)},
                     args.per_shard)  # fmt: skip
        size = sum(f.stat().st_size for f in local.glob("*.tar"))
        print(f"{n} images in {args.shards} shards, {size / 1e6:.1f} MB; latency "
              f"{args.latency * 1e3:.0f} ms/request, {args.bandwidth / 1e6:.0f} MB/s per "
              f"connection, {args.workers} workers, prefetch {args.prefetch}")  # fmt: skip
        local_set = read_shard_set(str(local))
        runs: dict[str, list] = {"local": [], "s3": []}
        with s3_server() as endpoint:
            upload_dir(s3_client(endpoint), local, "bench", "train")
            os.environ.update(s3_env(endpoint))
            port = endpoint.rsplit(":", 1)[1]
            with Proxy(endpoint, args.latency, args.bandwidth) as proxy:
                os.environ["AWS_ENDPOINT_URL"] = proxy.url
                for r in range(args.repeats):  # interleaved: both see the machine's moods
                    runs["local"].append(epoch_rates(local_set, args.workers, args.epochs))
                    cache = ShardCache(Path(tmp) / f"cache-{r}", prefetch=args.prefetch)
                    proxy.reset_counts()
                    t0 = time.perf_counter()
                    shards = read_shard_set("s3://bench/train", cache)  # a cold cache
                    start = time.perf_counter() - t0
                    print(f"s3 start-up (manifest + listing): {start:.2f} s, "
                          f"{proxy.count()} requests")  # fmt: skip
                    runs["s3"].append(epoch_rates(shards, args.workers, args.epochs, proxy, port))
    for name, found in runs.items():
        for e in range(args.epochs):
            print(f"{name} epoch {e + 1} runs: "
                  + " ".join(f"{run[e][0]:.0f}" for run in found) + " img/s")  # fmt: skip
    # each (source, epoch): the median run of the repeats
    rows = {
        name: [sorted((run[e] for run in found), key=lambda x: x[0])[len(found) // 2]
               for e in range(args.epochs)]
        for name, found in runs.items()
    }  # fmt: skip
    print(f"{'source':8} {'epoch':>5} {'img/s':>8} {'seconds':>8} {'requests':>8} "
          f"{'server cpu s':>12} {'vs local':>8}")  # fmt: skip
    for name, epochs in rows.items():
        for e, (rate, seconds, requests, cpu) in enumerate(epochs):
            ratio = rate / rows["local"][e][0]
            print(f"{name:8} {e + 1:>5} {rate:8.0f} {seconds:8.2f} {requests:8d} {cpu:12.2f} "
                  f"{ratio:8.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
