"""Input pipeline throughput on ImageNet-shaped JPEGs, training augmentation at 224x224.

Builds shards from real photographs (scikit-learn's bundled sample photos, cropped at random
and rescaled to around 500x375 like an average ImageNet image), then times four pipelines:

  bare DALI       fn.readers.webdataset -> decode+random crop -> resize -> flip/normalize; the
                  ceiling of what DALI does on this machine (no hand-over to torch)
  distres DALI    distres.data.dali.DaliLoader (the same graph, plus the torch hand-over)
  distres torch   distres.data.torch_loader.ShardLoader (webdataset + torchvision v2 on PIL)
  torch stage     the same loader with data.decode=gpu: workers send bytes and crop boxes,
                  one thread of the main process decodes and crops whole batches (nvJPEG on a
                  GPU; here, without one, libjpeg-turbo and the batched crop-resize on the CPU)
  plain baseline  webdataset .decode("pil") + torchvision RandomResizedCrop/flip/ToTensor/
                  Normalize in DataLoader workers, as a tutorial writes it

    python3 bench/data_pipeline.py [--images 1536] [--batch 64] [--workers N] [--epochs 2]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from distres.data.dali import DaliLoader
from distres.data.shards import build_shard_set, read_shard_set
from distres.data.torch_loader import ShardLoader
from distres.data.transforms import train_transform

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def make_photos(root: Path, n: int, classes: int = 10, seed: int = 0) -> None:
    from sklearn.datasets import load_sample_images

    global _PHOTOS
    _PHOTOS = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
    jobs = []
    for i in range(n):
        w, h = _PHOTOS[i % len(_PHOTOS)].size
        cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        size = (int(rng.normal(500, 40)), int(rng.normal(375, 30)))
        out = root / f"class{i % classes:02d}" / f"{i:06d}.jpg"
        jobs.append((i % len(_PHOTOS), (x, y, x + cw, y + ch), size, out))
    # JPEG encoding dominates (a few ms per image): spread it over the cores (fork: the
    # workers inherit the decoded photos)
    with mp.get_context("fork").Pool(os.cpu_count()) as pool:
        pool.starmap(_save_photo, jobs, chunksize=64)


_PHOTOS: list = []


def _save_photo(photo: int, box: tuple, size: tuple, out: Path) -> None:
    img = _PHOTOS[photo].crop(box).resize(size, Image.Resampling.BILINEAR)
    img.save(out, quality=90)


def timed(batches, n_batches: int, batch: int) -> float:
    """img/s over n_batches after one warm-up batch."""
    it = iter(batches)
    next(it)
    t0 = time.perf_counter()
    done = 0
    for _ in range(n_batches):
        try:
            next(it)
        except StopIteration:
            break
        done += 1
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the GPU-decode stage's last batch may still be in flight
    return done * batch / (time.perf_counter() - t0)


def bare_dali(shard_set, batch: int, threads: int, epochs: int) -> float:
    from nvidia.dali import fn, pipeline_def, types

    paths = list(shard_set.urls)

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=None, seed=0)
    def pipe():
        jpegs, labels = fn.readers.webdataset(
            paths=paths,
            index_paths=[p[:-4] + ".idx" for p in paths],
            ext=["jpg", "cls"],
            random_shuffle=True,
            initial_fill=1024,
            name="reader",
        )
        images = fn.decoders.image_random_crop(jpegs, device="cpu", output_type=types.RGB)
        images = fn.resize(images, size=[224, 224], antialias=True)
        images = fn.crop_mirror_normalize(
            images,
            crop=[224, 224],
            mirror=fn.random.coin_flip(),
            output_layout="HWC",
            mean=[m * 255 for m in MEAN],
            std=[s * 255 for s in STD],
            dtype=types.FLOAT,
        )
        return images, labels

    p = pipe()
    p.build()
    steps = epochs * shard_set.num_samples // batch

    def run():
        while True:
            yield p.run()

    return timed(run(), steps, batch)


def distres_dali(shard_set, batch: int, threads: int, epochs: int) -> float:
    loader = DaliLoader(
        shard_set,
        train=True,
        batch_size=batch,
        image_size=224,
        mean=MEAN,
        std=STD,
        num_classes=10,
        random_resized_crop=True,
        hflip=True,
        threads=threads,
        shuffle_buffer=1024,
    )

    def run():
        for e in range(epochs + 1):
            loader.set_epoch(e)
            yield from loader

    return timed(run(), epochs * len(loader), batch)


def distres_torch(shard_set, batch: int, workers: int, epochs: int, **stage) -> float:
    loader = ShardLoader(
        shard_set,
        train=True,
        batch_size=batch,
        mean=MEAN,
        std=STD,
        num_classes=10,
        num_workers=workers,
        shuffle_buffer=1024,
        transform=train_transform(224, True, 0.08, 0, True),
        **stage,
    )

    def run():
        for e in range(epochs + 1):
            loader.set_epoch(e)
            yield from loader

    return timed(run(), epochs * len(loader), batch)


def torch_stage(shard_set, batch: int, workers: int, epochs: int) -> float:
    """distres_torch with the GPU-decode stage, on the GPU where there is one."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return distres_torch(shard_set, batch, workers, epochs, decode="gpu", device=device)


def plain_baseline(shard_set, batch: int, workers: int, epochs: int) -> float:
    import torchvision.transforms as T
    import webdataset as wds

    tf = T.Compose(
        [T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)]
    )
    dataset = (
        wds.WebDataset(list(shard_set.urls), shardshuffle=False, empty_check=False)
        .shuffle(1024)
        .decode("pil")
        .to_tuple("jpg", "cls")
        .map_tuple(tf, int)
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers)

    def run():
        for _ in range(epochs + 1):
            yield from loader

    return timed(run(), epochs * shard_set.num_samples // batch - workers, batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1536)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="DataLoader workers / DALI threads (default: all cores)",
    )
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the pipelines are measured, not the main process's math
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        make_photos(Path(tmp) / "src", args.images)
        build_shard_set(
            Path(tmp) / "src",
            Path(tmp) / "train",
            64 * 10**6 // 16,
            workers=args.workers,
            progress=False,
        )
        shard_set = read_shard_set(Path(tmp) / "train")
        print(
            f"{shard_set.num_samples} JPEGs (~500x375) in {len(shard_set.urls)} shards, "
            f"built in {time.perf_counter() - t0:.0f} s; batch {args.batch}, "
            f"{args.workers} workers/threads, {args.epochs} epochs each",
            flush=True,
        )
        results = {}
        for name, fn, par in (
            ("bare DALI", bare_dali, args.workers),
            ("distres DALI", distres_dali, args.workers),
            ("distres torch", distres_torch, args.workers),
            ("torch stage", torch_stage, args.workers),
            ("plain baseline", plain_baseline, args.workers),
        ):
            results[name] = fn(shard_set, args.batch, par, args.epochs)
            print(f"  {name:15s} {results[name]:7.0f} img/s", flush=True)
    dali_ratio = results["distres DALI"] / results["bare DALI"]
    torch_ratio = results["distres torch"] / results["plain baseline"]
    print(f"\n{'pipeline':15s} {'img/s':>7s}")
    for name, rate in results.items():
        print(f"{name:15s} {rate:7.0f}")
    print(f"\ndistres DALI / bare DALI         {dali_ratio:.3f}  (target >= 0.95)")
    print(f"distres torch / plain baseline   {torch_ratio:.3f}  (target >= 1.3)")


if __name__ == "__main__":
    main()
