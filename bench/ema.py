"""What the EMA of the weights costs per update (train.ema_decay), by model and device.

    python3 bench/ema.py [--models resnet18,resnet50] [--repeats 20]

Builds each model (1000 classes) on the device (CUDA when visible, else the CPU), its EMA
(distres.components.ema.WeightEma: fp32 copies, one multi-tensor lerp per update), and times
`update` over
--repeats calls (synchronised on CUDA, so the figure is the GPU's time). Prints the time per
update, the bytes it reads and writes (the EMA in and out, the weights in) and the rate; set
against a training step's time that is the EMA's share of a step at ema_every=1.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distres.components.ema import WeightEma
from distres.config import load_config
from distres.dist import DistEnv
from distres.models import build_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"device: {name}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'model':<18} {'params':>10} {'ms/update':>10} {'MB moved':>9} {'GB/s':>7}")
    for model_name in args.models.split(","):
        cfg = load_config(
            None,
            [
                f"model.name={model_name}",
                "model.num_classes=1000",
                "data.train_shards=/unused",
                "data.val_shards=/unused",
                "data.image_size=224",
                "train.ema_decay=0.9998",
            ],
        )
        model = build_model(cfg.model).to(device, memory_format=torch.channels_last)
        ema = WeightEma(model, cfg, DistEnv())
        ema.update(1, 256, 256)  # warm-up (allocations, kernels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for step in range(2, 2 + args.repeats):
            ema.update(step, 256 * step, 256)
        if device.type == "cuda":
            torch.cuda.synchronize()
        per = (time.perf_counter() - t0) / args.repeats
        floats = sum(e.numel() for e, _ in ema.floats)
        moved = 3 * 4 * floats  # EMA read + written, the weights read (fp32)
        params = sum(p.numel() for p in model.parameters())
        print(
            f"{model_name:<18} {params:>10,} {per * 1e3:>10.2f} {moved / 1e6:>9.0f} "
            f"{moved / per / 1e9:>7.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
