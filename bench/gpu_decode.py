"""JPEG decoding on the GPU with torchvision's nvJPEG decoder and the GPU-decode stage: speed,
the stage's own host cost, and whether decoding is safe.

    python3 bench/gpu_decode.py [--data-dir DIR] [--images 2048] [--batch 256] [--json FILE]

One prepared probe for a lent GPU machine (bench/gpu_session.sh runs it); on a CPU-only
machine (or with --device cpu) it prints the CPU rows and runs the stage's rows on the CPU.
Over the bench's photos (ImageNet-shaped JPEGs of about 500x375, bench/data_pipeline.py):

  stage host     the stage's own host time per batch with the decoder stood in: crop-resize
                 and the auto-augmentation on the CPU with 4x5-pixel images (Python, the
                 dispatcher and launches; target <= 3 ms per 256 images)
  cpu ...        one process, one thread: torchvision.io (libjpeg-turbo) decode, PIL decode,
                 the train augmentation alone; the CPU model and PIL's libjpeg-turbo flag
  gpu decode     decode_jpeg(list of bytes tensors, device="cuda"), one call per batch, on a
                 side stream with a host synchronisation before each call (the protocol
                 pytorch/vision issue 9606 calls for)
  gpu + augment  the same, then a per-image random resized crop to 224 (antialiased), flip,
                 normalisation, stacked as a channels_last bf16 batch (the loop the stage
                 replaces)
  stage          the GPU-decode stage (data.decode=gpu) through its thread: nvJPEG, the
                 batched crop-resize (data/torch/crop_resize.py), without and with
                 TrivialAugment-wide on the device (data/torch/device_augment.py), to bf16
  victims        the 9606 reproduction: tensors whose reads are queued behind a stall on the
                 training stream are freed, then a batch is decoded; a victim's sum that
                 changed means the decoder wrote into memory still being read. Run unsafe
                 (decode with the training stream current) and with the protocol
  under load     a decode thread (protocol) while ResNet-50 bf16 steps run on the training
                 stream: every decoded image compared with the idle GPU decode (bitwise) and
                 with the CPU decode (max and mean level difference); the step rate with and
                 without the thread
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_jpegs(root: Path, n: int) -> list[bytes]:
    src = root / "src"
    files = sorted(src.glob("*/*.jpg")) if src.exists() else []
    if len(files) < n:
        from data_pipeline import make_photos

        t0 = time.perf_counter()
        make_photos(src, n)
        print(f"({n} JPEGs written in {time.perf_counter() - t0:.1f} s)", flush=True)
        files = sorted(src.glob("*/*.jpg"))
    return [f.read_bytes() for f in files[:n]]


def row(name: str, value: str) -> None:
    print(f"{name:44s} {value}", flush=True)


def cpu_rows(jpegs: list[bytes]) -> list[torch.Tensor]:
    """Single-thread CPU rates; returns the CPU decodes (the reference for the GPU's pixels)."""
    import io

    import PIL
    from PIL import Image, features
    from torchvision.io import decode_jpeg

    from distres.data.torch.transforms import train_transform

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    raws = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs]
    row("cpu model", cpu_model())
    row("PIL / libjpeg-turbo", f"{PIL.__version__} / {features.check_feature('libjpeg_turbo')}")
    t0 = time.perf_counter()
    decoded = [decode_jpeg(r) for r in raws]
    tv = (time.perf_counter() - t0) / len(raws)
    row("cpu decode, torchvision.io, 1 thread", f"{tv * 1e3:6.2f} ms/image")
    k = min(len(jpegs), 512)
    t0 = time.perf_counter()
    for b in jpegs[:k]:
        Image.open(io.BytesIO(b)).convert("RGB").load()
    row("cpu decode, PIL, 1 thread", f"{(time.perf_counter() - t0) / k * 1e3:6.2f} ms/image")
    aug = train_transform(224, True, 0.08, 0, True)
    t0 = time.perf_counter()
    for x in decoded[:k]:
        aug(x)
    per = (time.perf_counter() - t0) / k
    row("cpu train augmentation alone, 1 thread", f"{per * 1e3:6.2f} ms/image")
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    for x in decoded[:k]:
        aug(x)
    row(f"cpu train augmentation alone, {threads} threads",
        f"{(time.perf_counter() - t0) / k * 1e3:6.2f} ms/image")  # fmt: skip
    return decoded


def batches(raws: list[torch.Tensor], size: int) -> list[list[torch.Tensor]]:
    return [raws[i : i + size] for i in range(0, len(raws) - size + 1, size)]


class SideDecoder:
    """nvJPEG on its own stream, host-synchronised before each call (vision issue 9606)."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device)
        self.device = device

    def __call__(self, raws: list[torch.Tensor]) -> list[torch.Tensor]:
        from torchvision.io import decode_jpeg

        self.stream.synchronize()
        with torch.cuda.stream(self.stream):
            out = decode_jpeg(raws, device=self.device)
        self.stream.synchronize()
        return out


def augment(images: list[torch.Tensor], size: int, gen: torch.Generator) -> torch.Tensor:
    """Per-image random resized crop + flip on the GPU, normalised, channels_last bf16."""
    from torchvision.transforms import RandomResizedCrop
    from torchvision.transforms.v2 import functional as F

    out = []
    for x in images:
        top, left, h, w = RandomResizedCrop.get_params(x, [0.08, 1.0], [3 / 4, 4 / 3])
        y = F.resized_crop(x, top, left, h, w, [size, size], antialias=True)
        if torch.rand((), generator=gen) < 0.5:
            y = y.flip(-1)
        out.append(y)
    batch = torch.stack(out).float().div_(255)
    mean = torch.tensor([0.485, 0.456, 0.406], device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=batch.device).view(1, 3, 1, 1)
    batch = (batch - mean) / std
    return batch.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)


def gpu_rates(raws, batch: int, device) -> None:
    decode = SideDecoder(device)
    bs = batches(raws, batch)
    decode(bs[0])  # warm-up: nvJPEG handles, hardware engines
    for rounds in (1, 3):
        t0 = time.perf_counter()
        n = 0
        for _ in range(rounds):
            for b in bs:
                n += len(decode(b))
        rate = n / (time.perf_counter() - t0)
        row(f"gpu decode, batch {batch}, side stream + sync", f"{rate:8.0f} img/s ({n} images)")
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    n = 0
    for b in bs:
        with torch.cuda.stream(decode.stream):
            x = augment(decode(b), 224, gen)
        decode.stream.synchronize()
        n += len(x)
    row("gpu decode + augment to a bf16 batch", f"{n / (time.perf_counter() - t0):8.0f} img/s")


def encoded_batches(raws: list[torch.Tensor], batch: int, augment: str) -> list:
    """The bench's JPEGs as the workers hand them to the stage: bytes, geometry drawn by the
    stage's Encoder (random resized crop to 224, flip, and `augment`'s operators)."""
    from distres.data.torch.gpu_decode import EncodedBatch, Encoder
    from distres.data.torch.transforms import train_transform

    encoder = Encoder(train_transform(224, True, 0.08, 0, True, (augment, 9, 2)))
    torch.manual_seed(0)
    out = []
    for b in batches(raws, batch):
        geometry = torch.stack([encoder(raw.numpy().tobytes(), "bench")[1] for raw in b])
        labels = torch.zeros(len(b), dtype=torch.int64)
        out.append(EncodedBatch(b, labels, geometry, ["bench"] * len(b), [None] * len(b)))
    return out


def stage_rates(raws: list[torch.Tensor], batch: int, device, results: dict) -> None:
    """The GPU-decode stage itself (data.decode=gpu): nvJPEG, the batched crop-resize and
    the auto-augmentation's operators to a bf16 channels_last batch, every batch handed over
    through the stage's thread; without and with TrivialAugment-wide."""
    from distres.data.torch.gpu_decode import DecodeStage

    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda d: None
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for augment in ("none", "trivialaugment_wide"):
        encoded = encoded_batches(raws, batch, augment)
        stage = DecodeStage(device, dtype, mean, std, 3, skip_bad=False)
        list(stage(encoded[:2]))  # warm-up: nvJPEG handles, kernels
        sync(device)
        t0 = time.perf_counter()
        n = sum(len(b.labels) for b in stage(encoded))
        sync(device)
        rate = n / (time.perf_counter() - t0)
        key = "stage" if augment == "none" else "stage_ta"
        results[key] = rate
        what = "decode + crop-resize" + ("" if augment == "none" else " + trivialaugment_wide")
        row(f"stage: {what}", f"{rate:8.0f} img/s ({str(dtype)[6:]} channels_last)")


def host_cost(batch: int, results: dict) -> None:
    """The stage's own host time per batch, the decoder stood in: the main-process part of
    `DecodeStage._decode` (crop-resize and auto-augmentation: Python, the dispatcher and
    launching its kernels) on the CPU with 4x5-pixel images, where the kernels themselves
    cost next to nothing. The best of 20 batches, without and with TrivialAugment-wide."""
    from distres.data.torch.crop_resize import GEOMETRY, crop_resize
    from distres.data.torch.device_augment import AutoAugmentDraw, apply
    from distres.data.torch.gpu_decode import draw, steps
    from distres.data.torch.transforms import auto_augment, train_transform

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    images = [torch.zeros(3, 4 + i % 3, 5 - i % 2, dtype=torch.uint8) for i in range(batch)]
    torch.manual_seed(0)
    ops = steps(train_transform(2, True, 0.08, 0, True))
    geometry = torch.tensor([draw(ops, *im.shape[1:]) for im in images], dtype=torch.float64)
    assert geometry.shape[1] == GEOMETRY
    params = AutoAugmentDraw(auto_augment("trivialaugment_wide", 0, 0))
    params = torch.tensor([params(2, 2) for _ in images], dtype=torch.float64)
    ones, zeros = torch.ones(1, 3, 1, 1), torch.zeros(1, 3, 1, 1)
    for augment in (False, True):
        best = float("inf")
        for _ in range(20):
            out = torch.empty(batch, 2, 2, 3).permute(0, 3, 1, 2)
            pixels = torch.empty(batch, 2, 2, 3, dtype=torch.uint8).permute(0, 3, 1, 2)
            t0 = time.perf_counter()
            if augment:
                crop_resize(images, geometry, pixels, None, None)
                apply(pixels, params, 128.0)
                out.copy_(torch.addcmul(zeros, pixels.float(), ones))
            else:
                crop_resize(images, geometry, out, ones, zeros)
            best = min(best, time.perf_counter() - t0)
        key = "host_ms_ta" if augment else "host_ms"
        results[key] = best * 1e3
        what = " + trivialaugment_wide" if augment else ""
        row(f"stage host time per {batch}-image batch{what}", f"{best * 1e3:6.2f} ms "
            "(decoder stood in, CPU, 4x5 images)")  # fmt: skip
    torch.set_num_threads(threads)


def victims(raws, device, safe: bool, iterations: int) -> int:
    """vision issue 9606's reproduction; returns how many iterations saw a victim change."""
    decode = SideDecoder(device)
    bad = 0
    for _ in range(iterations):
        # one victim per image, each a little larger than a decoded image, so the caching
        # allocator can hand its block to the decoder's output (same pool, same stream)
        vs = [torch.ones(160_000, device=device) for _ in raws]
        expected = 160_000.0
        torch.cuda.synchronize(device)
        torch.cuda._sleep(200_000_000)  # queue the reads behind ~0.1 s of GPU time
        sums = [v.sum() for v in vs]
        del vs  # blocks return to the training stream's pool; their reads are still queued
        if safe:
            out = decode(raws)
        else:
            from torchvision.io import decode_jpeg

            out = decode_jpeg(raws, device=device)
        torch.cuda.synchronize(device)
        got = [float(s) for s in sums]
        bad += any(g != expected for g in got)
        del out
    return bad


def under_load(raws, cpu_ref, batch: int, device, seconds: float) -> None:
    import torchvision

    model = torchvision.models.resnet50().to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(256, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (256,), device=device)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def steps_for(t: float) -> float:
        for _ in range(3):
            step()
        torch.cuda.synchronize(device)
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < t:
            step()
            n += 1
        torch.cuda.synchronize(device)
        return n * 256 / (time.perf_counter() - t0)

    decode = SideDecoder(device)
    bs = batches(raws, batch)
    idle = [t.cpu() for b in bs for t in decode(b)]
    alone = steps_for(seconds / 2)
    stop = threading.Event()
    seen: list[list[torch.Tensor]] = []
    decoded = [0]

    def worker() -> None:
        i = 0
        while not stop.is_set():
            out = decode(bs[i % len(bs)])
            if i < len(bs):
                with torch.cuda.stream(decode.stream):
                    seen.append([t.cpu() for t in out])
            decoded[0] += len(out)
            i += 1

    th = threading.Thread(target=worker, daemon=True)
    t0 = time.perf_counter()
    th.start()
    loaded = steps_for(seconds / 2)
    stop.set()
    th.join()
    dec_rate = decoded[0] / (time.perf_counter() - t0)
    row("resnet50 bf16 steps alone", f"{alone:8.0f} img/s")
    row("resnet50 bf16 steps + decode thread", f"{loaded:8.0f} img/s (decode {dec_rate:.0f} img/s)")
    got = [t for b in seen for t in b]
    differ = sum(not torch.equal(a, b) for a, b in zip(got, idle, strict=False))
    row("under load vs idle GPU decode (bitwise)", f"{differ} of {len(got)} images differ")
    diffs = [(a.int() - b.int()).abs() for a, b in zip(idle, cpu_ref, strict=False)
             if a.shape == b.shape]  # fmt: skip
    shapes = sum(a.shape != b.shape for a, b in zip(idle, cpu_ref, strict=False))
    worst = max(int(d.max()) for d in diffs)
    mean = sum(float(d.float().mean()) for d in diffs) / len(diffs)
    row("GPU vs CPU decode (levels)", f"max {worst}, mean {mean:.3f}, shape mismatches {shapes}")
    return [differ, len(got)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default="/tmp/distres_bench_data")
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--iterations", type=int, default=30, help="victim rounds, each way")
    ap.add_argument("--seconds", type=float, default=16, help="under-load phase, in all")
    ap.add_argument("--device", default=None, help="cuda (default where there is one) | cpu")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    results: dict = {}
    try:
        run(args, results)
    finally:
        if args.json:
            import json

            Path(args.json).write_text(json.dumps(results, indent=1))


def run(args, results: dict) -> None:
    jpegs = load_jpegs(Path(args.data_dir), args.images)
    row("images", f"{len(jpegs)}, mean {sum(map(len, jpegs)) / len(jpegs) / 1e3:.0f} kB")
    row("torch / torchvision", f"{torch.__version__} / {__import__('torchvision').__version__}")
    row("cpus", str(os.cpu_count()))
    host_cost(args.batch, results)
    cpu_ref = cpu_rows(jpegs)
    raws = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs]
    if not torch.cuda.is_available() or args.device == "cpu":
        print("no CUDA device: the GPU rows were skipped; the stage's rows run on the CPU",
              flush=True)  # fmt: skip
        stage_rates(raws, args.batch, torch.device("cpu"), results)
        return
    device = torch.device("cuda", torch.cuda.current_device())
    row("gpu", torch.cuda.get_device_name(device))
    gpu_rates(raws, args.batch, device)
    stage_rates(raws, args.batch, device, results)
    small = raws[: args.batch]
    for safe in (False, True):
        bad = victims(small, device, safe, args.iterations)
        results["victims_protocol" if safe else "victims_unsafe"] = [bad, args.iterations]
        how = "side stream + sync (protocol)" if safe else "training stream current (unsafe)"
        row(f"victims, {how}", f"{bad} of {args.iterations} rounds corrupted")
    results["under_load_differ"] = under_load(raws, cpu_ref, args.batch, device, args.seconds)


if __name__ == "__main__":
    main()
