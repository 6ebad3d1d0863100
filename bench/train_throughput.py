"""Training-step throughput over a grid: model x batch x precision x memory format x compile.

    python3 bench/train_throughput.py                       # CPU: small, a couple of minutes
    python3 bench/train_throughput.py --preset gpu          # ResNet-50, 224, batch 256, bf16,
                                                            # channels_last, eager vs compile
    python3 bench/train_throughput.py --models resnet50 --batches 128,256 --precisions bf16,fp32

For each setting it times full SGD training steps (forward, backward, optimizer) and prints
img/s, step time, peak memory and MFU, twice:

  synthetic   one batch already on the device, reused: the model's ceiling
  pipeline    the input pipeline alone, no training step: the data ceiling
  real        batches from distres's input pipeline (shards of JPEGs written here from
              scikit-learn's sample photos, the DALI backend where it imports, else torch):
              what a user gets; with the torch backend once per --decode (cpu: decoding in
              DataLoader workers, gpu: the GPU-decode stage, data.decode=gpu)

--compile takes off, on (torch.compile's default mode) and mode names (max-autotune,
reduce-overhead: CUDA graphs, each step marked as a new graph step as the engine does).

MFU = achieved model FLOP/s over the device's peak. The FLOPs are counted, not assumed: one
forward pass is run under torch.utils.flop_counter.FlopCounterMode, and a training step is
taken as 3x that (backward ~ 2x forward). The peak comes from --peak-tflops, or a table of
known GPUs (dense bf16/fp16 tensor-core figures), or is left out on CPU.

Only torch and torchvision are needed for the synthetic part (the model code is distres's
own, which imports only torch); the real-data part needs distres's data dependencies and is
skipped with a note where they are missing.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distres.models.resnet import resnet
from distres.precision import input_dtype, set_tf32

# dense tensor-core peaks in TFLOP/s for bf16/fp16 (fp32 runs use TF32 figures)
PEAKS = {
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 495.0},
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 495.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 183.0},
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
AUG_TAGS = {"trivialaugment_wide": "+ta", "randaugment": "+ra", "autoaugment": "+aa"}


def peak_tflops(device: torch.device, precision: str, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAKS.items():
        if key in name:
            return peaks[precision]
    return None


def step_flops(model: torch.nn.Module, batch: int, size: int, device: torch.device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 3, size, size, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(x)
    model.train()
    return 3.0 * counter.get_total_flops() / 2 * batch


def make_step(model, opt, precision: str, device: torch.device, graphs: bool = False):
    dtype = DTYPES[precision]
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ctx = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with ctx:
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, batches, warmup: int, steps: int, device: torch.device) -> float:
    """Seconds per step, after warm-up (compile, cudnn autotune); one sync at each end."""
    it = iter(batches)
    for _ in range(warmup):
        step(*next(it))
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(*next(it))
    sync(device)
    return (time.perf_counter() - t0) / steps


def real_batches(
    args,
    device: torch.device,
    model_name: str,
    batch: int,
    size: int,
    tmp: str,
    decode: str,
    augment: str = "none",
    need: int = 0,
):
    """A fresh stream of (images, labels) from distres's loader over written shards: one
    epoch from its start, at least `need` batches long (a timed window never crosses an
    epoch boundary, where workers restart and the shuffle buffer refills)."""
    try:
        from distres.config import load_config
        from distres.data import build_loaders
        from distres.data.build import host_threads
        from distres.data.shards.write import build_shard_set
    except ImportError as e:
        raise RuntimeError(f"real-data part skipped: {e}") from None
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from data_pipeline import make_photos

    root = Path(args.data_dir or tmp)
    if not (root / "train").exists():
        t0 = time.perf_counter()
        make_photos(root / "src", args.images)
        print(f"  ({args.images} JPEGs written in {time.perf_counter() - t0:.1f} s)", flush=True)
        build_shard_set(root / "src", root / "train", 8 * 10**6, workers=os.cpu_count() or 1,
                        progress=False)  # fmt: skip
    overrides = [
        "data.dataset=shards",
        f"data.train_shards={root / 'train'}",
        f"data.val_shards={root / 'train'}",
        f"data.image_size={size}",
        f"data.val_resize={size}",
        "data.random_resized_crop=true",
        "data.hflip=true",
        f"data.auto_augment={augment}",
        f"train.batch_size={batch}",
        f"model.name={model_name}",
        "model.num_classes=10",
        "data.mean=[0.485,0.456,0.406]",
        "data.std=[0.229,0.224,0.225]",
        f"data.num_workers={args.workers}",
        f"data.decode={decode}",
        f"data.backend={'auto' if decode == 'cpu' else 'torch'}",
        f"train.precision={args.precision_of_run}",
    ]
    cfg = load_config(None, overrides)
    threads = host_threads(cfg, device)  # as the trainer does: see host_threads
    if threads:
        torch.set_num_threads(threads)
    train, _ = build_loaders(cfg, device, 0, 1)
    if len(train) < need:
        raise RuntimeError(
            f"an epoch of {len(train)} batches is shorter than the {need} this row times "
            f"(warm-up + steps): write more images (--images {need * batch * 5 // 4})"
        )
    print(f"  (real data: {type(train).__name__}, {args.workers} workers, decode {decode}, "
          f"augment {augment}, {len(train)} batches an epoch)", flush=True)  # fmt: skip
    train.set_epoch(0)
    return ((b.images, b.labels) for b in train)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["cpu", "gpu"], default=None)
    parser.add_argument("--device", default=None, help="cuda (default where there is one) | cpu")
    parser.add_argument("--models", default=None)
    parser.add_argument("--batches", default=None)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--precisions", default=None)
    parser.add_argument("--formats", default="channels_last")
    parser.add_argument("--compile", default=None, help="off,on,max-autotune,reduce-overhead")
    parser.add_argument(
        "--decode", default=None, help="real data: cpu,gpu (torch backend's data.decode)"
    )
    parser.add_argument(
        "--augment", default="none",
        help="real data: data.auto_augment values, a row each (none,trivialaugment_wide)",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument(
        "--images", type=int, default=None,
        help="JPEGs for the real-data run (default: an epoch of warm-up + steps + 8 batches)",
    )  # fmt: skip
    parser.add_argument(
        "--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2),
        help="decode workers of the real-data run (data.num_workers)",
    )  # fmt: skip
    parser.add_argument("--data-dir", default=None, help="keep the real-data shards here")
    parser.add_argument("--no-real", action="store_true")
    parser.add_argument("--no-pipe", action="store_true", help="no input-pipeline-alone rows")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    preset = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    gpu = preset == "gpu"
    models = (args.models or ("resnet50" if gpu else "resnet18,resnet50")).split(",")
    batches = [int(b) for b in (args.batches or ("256" if gpu else "16")).split(",")]
    size = args.size or (224 if gpu else 112)
    precisions = (args.precisions or ("bf16" if gpu else "fp32,bf16")).split(",")
    compiles = (args.compile or ("off,on" if gpu else "off")).split(",")
    decodes = (args.decode or ("cpu,gpu" if gpu else "cpu")).split(",")
    augments = args.augment.split(",")
    steps, warmup = args.steps or (50 if gpu else 3), args.warmup or (15 if gpu else 1)
    need = warmup + steps + 2  # batches a real row takes from its epoch
    args.images = args.images or (need + 8) * max(batches)
    # as the trainer: train.tf32's default, and cuDNN's autotuner (seed_everything)
    set_tf32(device, True)
    torch.backends.cudnn.benchmark = True
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{os.cpu_count()}"
    print(
        f"{card}, torch {torch.__version__}, {size}x{size}, {steps} timed steps after "
        f"{warmup} warm-up, SGD momentum, {time.strftime('%Y-%m-%d')}\n",
        flush=True,
    )
    header = (
        f"{'data':12s} {'model':9s} {'batch':>5s} {'prec':4s} {'format':13s} {'compile':7s} "
        f"{'img/s':>8s} {'step ms':>8s} {'peak GiB':>8s} {'MFU':>6s}"
    )
    print(header)
    print("-" * len(header), flush=True)
    tmp = tempfile.TemporaryDirectory()
    piped: set[tuple[int, str, str]] = set()
    results: list[dict] = []
    grid = itertools.product(models, batches, precisions, args.formats.split(","), compiles)
    for name, batch, precision, fmt, comp in grid:
        memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
        torch.manual_seed(0)
        model = resnet(name, num_classes=1000 if gpu else 10).to(
            device, memory_format=memory_format
        )
        flops = step_flops(model, batch, size, device)
        opt_kwargs = {"fused": True} if device.type == "cuda" else {"foreach": True}
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, **opt_kwargs)
        mode = None if comp in ("on", "off") else comp
        net = torch.compile(model, mode=mode) if comp != "off" else model
        step = make_step(net, opt, precision, device, graphs=comp == "reduce-overhead")
        # the loaders' input dtype (the autocast dtype on a GPU), so every row is alike
        x = torch.randn(batch, 3, size, size, device=device)
        x = x.to(input_dtype(device, DTYPES[precision])).contiguous(memory_format=memory_format)
        y = torch.randint(0, 10, (batch,), device=device)
        runs = [("synthetic", lambda x=x, y=y: itertools.repeat((x, y)))]
        args.precision_of_run = precision
        for decode, augment in itertools.product([] if args.no_real else decodes, augments):
            if augment != "none" and decode == "cpu" and "gpu" in decodes:
                continue  # the CPU path's augmentation rate is bench/data_pipeline.py's
            tag = ("" if len(decodes) == 1 else f"/{decode}") + AUG_TAGS.get(augment, "")

            def fresh(decode=decode, augment=augment, name=name, batch=batch):
                return real_batches(args, device, name, batch, size, tmp.name, decode,
                                    augment, need)  # fmt: skip

            try:
                if not args.no_pipe and (batch, decode, augment) not in piped:  # once each
                    piped.add((batch, decode, augment))
                    seconds = time_steps(lambda x, y: None, fresh(), warmup, steps, device)
                    label = "pipe" + tag if tag else "pipeline"
                    results.append(dict(data=label, model="-", batch=batch, img_s=batch / seconds,
                                        step_ms=seconds * 1e3))  # fmt: skip
                    print(
                        f"{label:12s} {'-':9s} {batch:5d} {'-':4s} {fmt:13s} {'-':7s} "
                        f"{batch / seconds:8.1f} {seconds * 1e3:8.1f}",
                        flush=True,
                    )
            except RuntimeError as e:
                print(f"  ({e})")
                continue
            runs.append(("real" + tag, fresh))
        for label, stream in runs:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                seconds = time_steps(step, stream(), warmup, steps, device)
            except RuntimeError as e:
                print(f"  ({label}: {e})")
                continue
            peak_mem = (
                torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0
            )
            peak = peak_tflops(device, precision, args.peak_tflops)
            mfu = f"{100 * flops / seconds / (peak * 1e12):5.1f}%" if peak else "    -"
            mem = f"{peak_mem:8.1f}" if peak_mem else "       -"
            results.append(dict(data=label, model=name, batch=batch, precision=precision,
                                compile=comp, img_s=batch / seconds, step_ms=seconds * 1e3,
                                peak_gib=peak_mem))  # fmt: skip
            print(
                f"{label:12s} {name:9s} {batch:5d} {precision:4s} {fmt:13s} {comp:7s} "
                f"{batch / seconds:8.1f} {seconds * 1e3:8.1f} {mem} {mfu}",
                flush=True,
            )
    tmp.cleanup()
    if args.json:
        import json

        Path(args.json).write_text(json.dumps({"device": card, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
