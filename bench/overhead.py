"""Framework overhead: the default distres training against a bare in-memory PyTorch loop.

Both train the same model (ResNet-20) with the same optimizer, schedule, batch size and epochs on
the same digits images, and evaluate on the val set every epoch. The bare loop holds the decoded
images in memory as one tensor and does no augmentation, so the ratio counts everything distres
adds: reading and decoding shards, augmentation, batching, logging, evaluation bookkeeping.

    python3 bench/overhead.py [--epochs 5] [--repeats 1]
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from distres.components.optim import build_optimizer, build_scheduler
from distres.config import load_config, plan_batch
from distres.data import resolve_shard_sets
from distres.dist import DistEnv
from distres.models import build_model
from distres.results.evaluation import topk_correct
from distres.trainer.build import build
from distres.trainer.state import seed_everything


def load_in_memory(shards, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for s in wds.tarfile_samples([{"url": u} for u in shards.urls]):
        xs.append(np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB")))
        ys.append(int(s["cls"]))
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(cfg.data.mean).view(1, -1, 1, 1)
    std = torch.tensor(cfg.data.std).view(1, -1, 1, 1)
    x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
    return x, torch.tensor(ys)


def bare_loop(cfg, train, val) -> tuple[float, float]:
    """The loop a PyTorch user writes by hand: no data pipeline, no bookkeeping."""
    seed_everything(cfg.run.seed, False)
    model = build_model(cfg.model).to(memory_format=torch.channels_last)
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"))
    bs = cfg.train.batch_size
    steps = len(train[1]) // bs
    sched = build_scheduler(opt, cfg.optim, steps, cfg.train.epochs)
    t0 = time.perf_counter()
    for _ in range(cfg.train.epochs):
        model.train()
        perm = torch.randperm(len(train[1]))
        for i in range(steps):
            idx = perm[i * bs : (i + 1) * bs]
            loss = F.cross_entropy(model(train[0][idx]), train[1][idx])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
        model.eval()
        with torch.no_grad():
            hits = sum(
                topk_correct(model(val[0][i : i + bs]), val[1][i : i + bs], (1,))[0]
                for i in range(0, len(val[1]), bs)
            )
    return time.perf_counter() - t0, float(hits) / len(val[1])


def distres_loop(cfg, tmp: Path) -> tuple[float, float]:
    trainer = build(cfg, DistEnv(), torch.device("cpu"), plan_batch(cfg, 1), tmp)
    t0 = time.perf_counter()
    summary = trainer.fit()
    return time.perf_counter() - t0, summary["final_val_top1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            None,
            [
                f"train.epochs={args.epochs}",
                f"run.dir={tmp}",
                "tracking.progress=off",
                "checkpoint.save_final=false",
                # The step loop is what is compared: no per-epoch checkpoint, no W&B start-up
                # and no end-of-run plot in the timed region (bench/checkpoint.py times saves).
                "checkpoint.every_epochs=0",
                "checkpoint.on_stop=false",
                "tracking.wandb=off",
                "tracking.plots=false",
            ],
        )
        train_set, val_set = resolve_shard_sets(cfg)
        train, val = load_in_memory(train_set, cfg), load_in_memory(val_set, cfg)
        bare, ours = [], []
        for r in range(args.repeats):
            bare.append(bare_loop(cfg, train, val))
            ours.append(distres_loop(cfg, Path(tmp)))
            print(
                f"repeat {r}: bare {bare[-1][0]:.1f} s (top-1 {bare[-1][1]:.4f}), "
                f"distres {ours[-1][0]:.1f} s (top-1 {ours[-1][1]:.4f})",
                flush=True,
            )
    b = statistics.median(t for t, _ in bare)
    o = statistics.median(t for t, _ in ours)
    print(f"\n{'loop':8s} {'seconds':>8s} {'img/s':>7s}")
    n = args.epochs * (len(train[1]) // cfg.train.batch_size) * cfg.train.batch_size
    print(f"{'bare':8s} {b:8.1f} {n / b:7.0f}")
    print(f"{'distres':8s} {o:8.1f} {n / o:7.0f}")
    print(
        f"overhead ratio (distres / bare): {o / b:.3f}  [{args.epochs} epochs, median of "
        f"{args.repeats}, {torch.get_num_threads()} threads]"
    )


if __name__ == "__main__":
    main()
