"""Peak training memory of a very deep net, with and without activation checkpointing.

    python3 bench/memory.py [--model preact_resnet1001] [--batch 16] [--steps 2]

Trains the model on 32x32 inputs at a fixed batch (SGD, the same code path as the engines:
ResNet.set_grad_checkpointing) for a few steps per setting, each in a fresh process:

  off     every activation kept for backward
  stage   one checkpointed group per residual stage (3 inputs kept, a stage recomputed)
  N       groups of N blocks (more inputs kept, less recomputed at once)

On CPU the figure is the process's peak resident memory above what it held before the first
step (model, optimizer and inputs); on CUDA, torch.cuda.max_memory_allocated over the steps.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def child(model_name: str, batch: int, steps: int, group: str, device: str) -> dict:
    from distres.config import EngineConfig, ModelConfig
    from distres.models import build_model

    dev = torch.device(device)
    model = build_model(ModelConfig(name=model_name)).to(dev, memory_format=torch.channels_last)
    model.set_grad_checkpointing(EngineConfig(activation_checkpointing=group).checkpoint_group)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=dev)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base_cuda = torch.cuda.memory_allocated(dev)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(dev) - base_cuda) / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 2**10
    return {"peak_mib": peak, "step_s": min(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="preact_resnet1001")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--modes", default="off,stage,8")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "DEVICE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.batch, args.steps, *args.child)))
        return
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"{args.model}, 32x32, batch {args.batch}, {args.steps} SGD steps per setting\n")
    print(f"{'device':6s} {'checkpointing':>13s} {'peak MiB':>9s} {'step s':>7s}")
    for device in devices:
        for mode in args.modes.split(","):
            cmd = [sys.executable, __file__, "--model", args.model, "--batch", str(args.batch)]
            cmd += ["--steps", str(args.steps), "--child", mode, device]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=1800)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{device:6s} {mode:>13s} {r['peak_mib']:9.0f} {r['step_s']:7.2f}", flush=True)


if __name__ == "__main__":
    main()
