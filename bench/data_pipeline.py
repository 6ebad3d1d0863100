"""Input pipeline throughput on ImageNet-shaped JPEGs, training augmentation at 224x224.

Builds shards from real photographs (scikit-learn's bundled sample photos, cropped at random
and rescaled to around 500x375 like an average ImageNet image), then times four pipelines:

  bare DALI       fn.readers.webdataset -> decode+random crop -> resize -> flip/normalize; the
                  ceiling of what DALI does on this machine (no hand-over to torch)
  distres DALI    distres.data.dali.loader.DaliLoader (the same graph, plus the torch hand-over)
  distres torch   distres.data.torch.loader.ShardLoader (webdataset + torchvision v2 on PIL)
  torch stage     the same loader with data.decode=gpu: workers send bytes and crop boxes,
                  one thread of the main process decodes and crops whole batches (nvJPEG on a
                  GPU; here, without one, libjpeg-turbo and the batched crop-resize on the CPU)
  plain baseline  webdataset .decode("pil") + torchvision RandomResizedCrop/flip/ToTensor/
                  Normalize in DataLoader workers, as a tutorial writes it

and the first three again with torchvision's v2 recipe's augmentation: TrivialAugment-wide per
image (DALI's auto_aug operators in the DALI rows, torchvision v2 in the torch row) and random
erasing (p 0.25) on each batch after the loader (distres.data.augment, as the trainer
applies it, in every row). These rows time one epoch: distres defines each epoch's DALI
pipeline anew (a new shard order), which with an auto-augmentation takes 1-7 s of Python
(overlapped with the previous epoch in a thread); that cost is printed on its own, since on
epochs of a few seconds here it would swamp the rate and on ImageNet's it is noise.

    python3 bench/data_pipeline.py [--images 1536] [--batch 64] [--workers N] [--epochs 2]
        [--only "distres torch,plain baseline"]
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

from distres.data.api import Batch
from distres.data.augment import BatchAugment, BatchAugmentSpec
from distres.data.dali.loader import DaliLoader
from distres.data.shards.read import read_shard_set
from distres.data.shards.write import build_shard_set
from distres.data.spec import LoaderSpec
from distres.data.torch.loader import ShardLoader
from distres.data.torch.transforms import train_transform

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


TA = ("trivialaugment_wide", 0, 0)


def erased(batches):
    """Random erasing on each batch after the loader, as the trainer does it."""
    spec = BatchAugmentSpec(num_classes=10, mean=tuple(MEAN), std=tuple(STD), random_erasing=0.25)
    aug = BatchAugment(spec, 0, 0, torch.device("cpu"))
    for step, (images, labels) in enumerate(batches):
        yield aug.batch(Batch(images, labels), step, 0)


def timed(batches, n_batches: int, batch: int, aug: bool = False) -> float:
    """img/s over n_batches after one warm-up batch."""
    it = iter(erased(batches) if aug else batches)
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


def bare_dali(shard_set, batch: int, threads: int, epochs: int, aug: bool = False) -> float:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.auto_aug import trivial_augment

    paths = list(shard_set.urls)

    @pipeline_def(
        batch_size=batch, num_threads=threads, device_id=None, seed=0, enable_conditionals=aug
    )
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
        if aug:  # DALI's own TrivialAugment-wide
            images = trivial_augment.trivial_augment_wide(images, shape=(224, 224))
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
    steps = (1 if aug else epochs) * shard_set.num_samples // batch - (1 if aug else 0)

    def run():
        while True:
            images, labels = p.run()
            x = torch.from_numpy(np.asarray(images.as_tensor())).permute(0, 3, 1, 2)
            yield x, torch.from_numpy(np.asarray(labels.as_tensor())).view(-1).long()

    return timed(run(), steps, batch, aug)


def distres_dali(shard_set, batch: int, threads: int, epochs: int, aug: bool = False) -> float:
    if aug:
        epochs = 1  # see the module doc
    loader = DaliLoader(
        LoaderSpec(
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
            auto_augment=TA if aug else ("none", 0, 0),
            epochs=1 if aug else None,
        )
    )

    def run():
        for e in range(epochs + 1):
            loader.set_epoch(e)
            yield from loader

    return timed(run(), epochs * len(loader) - (1 if aug else 0), batch, aug)


def definition_seconds(shard_set) -> float:
    """Seconds to define (trace) one epoch's DALI pipeline with TrivialAugment-wide."""
    loader = DaliLoader(
        LoaderSpec(
            shard_set,
            train=True,
            batch_size=64,
            image_size=224,
            mean=MEAN,
            std=STD,
            num_classes=10,
            random_resized_crop=True,
            auto_augment=TA,
        )
    )
    loader._pipeline(None, 0)  # the first definition pays for imports and conversions
    t0 = time.perf_counter()
    loader._pipeline(None, 1)
    return time.perf_counter() - t0


STREAMS = 0  # --streams


def distres_torch(
    shard_set, batch: int, workers: int, epochs: int, aug: bool = False, **stage
) -> float:
    loader = ShardLoader(
        LoaderSpec(
            shard_set,
            train=True,
            batch_size=batch,
            mean=MEAN,
            std=STD,
            num_classes=10,
            num_workers=workers,
            shuffle_buffer=1024,
            transform=train_transform(224, True, 0.08, 0, True, TA if aug else ("none", 0, 0)),
            **({"streams": STREAMS} if STREAMS else {}),  # (distres before streams had none)
            **stage,
        )
    )

    def run():
        for e in range(epochs + 1):
            loader.set_epoch(e)
            yield from loader

    return timed(run(), epochs * len(loader), batch, aug)


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
    parser.add_argument(
        "--streams", type=int, default=0, help="the torch rows' data.streams (0: auto)"
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated pipeline names to time (e.g. 'distres torch,plain baseline')",
    )
    args = parser.parse_args()
    only = {n.strip() for n in args.only.split(",") if n.strip()}
    global STREAMS
    STREAMS = args.streams
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
        for name, fn, aug in (
            ("bare DALI", bare_dali, False),
            ("distres DALI", distres_dali, False),
            ("distres torch", distres_torch, False),
            ("torch stage", torch_stage, False),
            ("plain baseline", plain_baseline, False),
            ("bare DALI +TA+RE", bare_dali, True),
            ("distres DALI +TA+RE", distres_dali, True),
            ("distres torch +TA+RE", distres_torch, True),
        ):
            if only and name not in only:
                continue
            extra = {"aug": True} if aug else {}
            results[name] = fn(shard_set, args.batch, args.workers, args.epochs, **extra)
            print(f"  {name:20s} {results[name]:7.0f} img/s", flush=True)
        if only:
            return
        seconds = definition_seconds(shard_set)
    dali_ratio = results["distres DALI"] / results["bare DALI"]
    aug_ratio = results["distres DALI +TA+RE"] / results["bare DALI +TA+RE"]
    torch_ratio = results["distres torch"] / results["plain baseline"]
    print(f"\n{'pipeline':20s} {'img/s':>7s}")
    for name, rate in results.items():
        print(f"{name:20s} {rate:7.0f}")
    print(f"\ndistres DALI / bare DALI                {dali_ratio:.3f}  (target >= 0.95)")
    print(f"distres DALI / bare DALI, +TA+RE        {aug_ratio:.3f}  (target >= 0.95)")
    print(f"distres torch / plain baseline          {torch_ratio:.3f}  (target >= 1.3)")
    print(
        f"defining a TrivialAugment DALI pipeline: {seconds:.2f} s per epoch, in a thread "
        f"beside the previous epoch (an ImageNet epoch here: "
        f"{1_281_167 / results['distres DALI +TA+RE']:.0f} s)"
    )


if __name__ == "__main__":
    main()
