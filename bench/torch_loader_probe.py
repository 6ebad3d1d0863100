"""Where the torch backend's time goes on a GPU host: one prepared probe for a lent machine.

    python3 bench/torch_loader_probe.py [--images 6144] [--batch 256]

Times, over the same shards (ImageNet-shaped JPEGs, 224 train augmentation):
  decode x1     one process decoding + augmenting (per-core rate)
  workers N     N DataLoader workers, chunks counted in the main process (no batching)
  loader ...    the ShardLoader, batches assembled in pageable or pinned memory, copied to
                the device (synchronised at the end); last, with the main process's
                intra-op threads cut as distres.train does on a GPU rank
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_pipeline import MEAN, STD, make_photos

from distres.data.shards.read import read_shard_set
from distres.data.shards.write import build_shard_set
from distres.data.spec import LoaderSpec
from distres.data.torch.loader import ShardLoader
from distres.data.torch.stream import SampleStream
from distres.data.torch.transforms import train_transform


def rate(fn) -> tuple[float, float]:
    t0 = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - t0), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=6144)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cpus = os.cpu_count() or 2
    tmp = tempfile.mkdtemp()
    make_photos(Path(tmp) / "src", args.images)
    build_shard_set(Path(tmp) / "src", Path(tmp) / "train", 8 * 10**6, workers=cpus,
                    progress=False)  # fmt: skip
    shards = read_shard_set(Path(tmp) / "train")
    transform = train_transform(224, True, 0.08, 0, True)
    ids = list(range(len(shards.urls)))

    def stream(ids_=ids):
        return SampleStream(shards, ids_, transform, 2048, 0, 10, 3)

    def decode_one() -> int:
        n = 0
        for x, _, _, _ in stream(ids[:2]):
            n += len(x)
        return n

    def workers(k: int):
        def run() -> int:
            loader = DataLoader(stream(), batch_size=None, num_workers=k, prefetch_factor=4)
            return sum(len(x) for x, _, _, _ in loader)

        return run

    def loader(pin: bool, k: int):
        def run() -> int:
            spec = LoaderSpec(shards, train=True, batch_size=args.batch, transform=transform,
                              mean=MEAN, std=STD, num_classes=10, device=device,
                              num_workers=k)  # fmt: skip
            ld = ShardLoader(spec)
            ld.pin_batches = pin and device.type == "cuda"
            n = 0
            for b in ld:
                n += len(b.labels)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return n

        return run

    k = max(1, cpus - 2)
    print(f"{cpus} CPUs, device {device}, {args.images} images, batch {args.batch}", flush=True)
    rows = [("decode x1", decode_one)]
    rows += [(f"workers {w}", workers(w)) for w in sorted({max(1, k // 2), k, cpus})]
    rows += [(f"loader pageable {k}", loader(False, k)), (f"loader pinned {k}", loader(True, k))]
    rows += [(f"loader pageable {k} (again)", loader(False, k))]
    # the main process with the intra-op threads distres.train gives it on a GPU rank
    # (distres.data.build.host_threads: the cores the workers leave)
    main_threads = max(1, cpus - k)

    def few_threads(fn):
        def run() -> int:
            before = torch.get_num_threads()
            torch.set_num_threads(main_threads)
            try:
                return fn()
            finally:
                torch.set_num_threads(before)

        return run

    rows += [(f"loader pinned {k}, {main_threads} threads", few_threads(loader(True, k)))]
    for name, fn in rows:
        r, s = rate(fn)
        print(f"{name:28s} {r:8.1f} img/s  ({s:.1f} s, worker start-up included)", flush=True)


if __name__ == "__main__":
    main()
