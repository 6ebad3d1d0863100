"""Checks that mean something only on a CUDA device (marked `gpu`: skipped elsewhere; run by
bench/gpu_session.sh in its first minute on a lent GPU): the GPU-decode stage's pixels with
nvJPEG against the CPU path, the device auto-augmentation under a GPU's float rounding, the
stream and event hand-over of batches while the training stream is busy, a mid-epoch resume
with data.decode=gpu, and the training thread's host syncs per step."""

from __future__ import annotations

import io
import os

import pytest
import torch
from augment_stats import SIZE, sample_image
from PIL import Image

from distres.data.buffers import rebatch
from distres.data.shards.read import read_shard_set
from distres.data.shards.write import write_shards
from distres.data.spec import LoaderSpec
from distres.data.torch import gpu_decode
from distres.data.torch.device_augment import AutoAugmentDraw
from distres.data.torch.loader import ShardLoader
from distres.data.torch.transforms import auto_augment, train_transform, val_transform

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]
DEVICE = os.environ.get("DISTRES_GPU_TESTS_ON", "cuda")
HALF = torch.bfloat16 if DEVICE == "cuda" else torch.float32
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
CLASSES = {str(i): i for i in range(10)}


def jpeg(seed: int, size: tuple[int, int]) -> bytes:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(3, size[1] // 8 + 2, size[0] // 8 + 2, generator=g) * 255
    img = torch.nn.functional.interpolate(low[None], size=(size[1], size[0]), mode="bilinear")
    buf = io.BytesIO()
    Image.fromarray(img[0].clamp(0, 255).byte().permute(1, 2, 0).numpy()).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-photos")
    samples = [(f"img{k:03d}", jpeg(k, (160 + 17 * (k % 5), 120 + 13 * (k % 4))), k % 10)
               for k in range(96)]  # fmt: skip
    write_shards(samples, root, "p", CLASSES, 32)
    return root


def loader(root, decode: str, device: str, transform, train: bool = True) -> ShardLoader:
    return ShardLoader(LoaderSpec(
        read_shard_set(root), train=train, batch_size=16, transform=transform, mean=MEAN,
        std=STD, num_classes=10, shuffle_buffer=32, seed=3, decode=decode, device=device,
        out_dtype=HALF if device == DEVICE else torch.float32,
    ))  # fmt: skip


def levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    std = torch.tensor(STD, device=a.device).view(1, -1, 1, 1)
    return ((a.float() - b.to(a.device).float()) * std * 255).abs()


@pytest.mark.parametrize("augment", ["none", "trivialaugment_wide"])
def test_the_stage_with_nvjpeg_matches_the_cpu_path(photos, augment):
    """The same samples, crops, flips and operators as the CPU path; the pixels differ by
    nvJPEG's decoding against libjpeg-turbo's (mean 0.89 levels, max 40 on an H200, measured
    on 2026-11-30), bf16's rounding and what an operator makes of that."""
    t = train_transform(64, True, 0.08, 0, True, (augment, 9, 2))
    cpu, gpu = loader(photos, "cpu", "cpu", t), loader(photos, "gpu", DEVICE, t)
    for x, y in zip(list(cpu), list(gpu), strict=True):
        assert y.images.device.type == DEVICE and y.images.dtype == HALF
        assert y.images.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(x.labels, y.labels.cpu())
        assert float(levels(y.images, x.images).mean()) < (2.0 if augment == "none" else 4.0)


@pytest.mark.parametrize("name", ["randaugment", "trivialaugment_wide", "autoaugment"])
def test_device_auto_augment_on_cuda_is_torchvisions_to_a_level(name):
    image = torch.from_numpy(sample_image()).permute(2, 0, 1).contiguous()
    n = 256
    draw = AutoAugmentDraw(auto_augment(name, 9, 2))
    torch.manual_seed(0)
    params = torch.tensor([draw(SIZE, SIZE) for _ in range(n)], dtype=torch.float64)
    reference = auto_augment(name, 9, 2)
    torch.manual_seed(0)
    want = torch.stack([reference(image) for _ in range(n)])
    batch = image.expand(n, -1, -1, -1).contiguous(memory_format=torch.channels_last)
    batch = batch.to(DEVICE)
    got = gpu_decode.auto_augment(batch, params, 128.0).cpu()
    diff = (got.int() - want.int()).abs()
    # GPU kernels fuse and round otherwise: a blend can land a level off, which equalize or
    # solarize may carry further for a few pixels; an operator or magnitude astray costs
    # tens of levels over the whole image
    assert float(diff.float().mean()) < 0.25 and float((diff > 1).float().mean()) < 0.01


def test_batches_handed_over_while_the_training_stream_is_busy_are_intact(photos):
    """Decode on the side streams while the current (training) stream is stalled behind
    ~0.05 s of GPU time per batch, and free each batch as soon as the next is taken (its
    memory goes back to the caching allocator while the stalled reads are still queued):
    every image equals the idle decode's, bit for bit (vision issue 9606's failure mode)."""
    t = val_transform(64, 80)
    idle = [b.images.cpu() for b in loader(photos, "gpu", DEVICE, t, train=False)]
    sums, seen = [], []
    for b in loader(photos, "gpu", DEVICE, t, train=False):
        if DEVICE == "cuda":
            torch.cuda._sleep(50_000_000)  # queue the reads behind a stall on this stream
        sums.append(b.images.float().sum((1, 2, 3)))
        seen.append(b.images.to("cpu", non_blocking=False))
        del b
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    assert len(seen) == len(idle)
    for a, b, s in zip(seen, idle, sums, strict=True):
        assert torch.equal(a, b)
        assert torch.equal(s.cpu(), b.float().sum((1, 2, 3)))


def test_a_mid_epoch_resume_with_the_stage_on_cuda_continues_exactly(photos):
    t = train_transform(64, True, 0.08, 0, True, ("trivialaugment_wide", 0, 0))
    whole = [b.images.cpu() for b in loader(photos, "gpu", DEVICE, t)]
    first = loader(photos, "gpu", DEVICE, t)
    it = iter(first)
    head = [next(it).images.cpu() for _ in range(2)]
    state = first.state_dict()
    del it
    second = loader(photos, "gpu", DEVICE, t)
    second.load_state_dict(state)
    rest = [b.images.cpu() for b in second]
    assert len(head) + len(rest) == len(whole)
    for a, b in zip(head + rest, whole, strict=True):
        assert torch.equal(a, b)


def test_no_host_sync_in_a_training_step_with_the_stage(tmp_path):
    """distres.fit on digits with data.decode=gpu and the v2 recipe's augmentation: the
    training thread blocks on the device only at boundaries (logging, the stop consensus,
    evaluation, checkpoints), never inside a step's data fetch, augmentation, forward,
    backward or optimizer."""
    import distres
    from distres.components.profiling import HostSyncs
    from distres.trainer.loop import Trainer

    boundary = Trainer.boundary
    with HostSyncs() as syncs:

        def counted(self):
            syncs.phase = "boundary"
            try:
                return boundary(self)
            finally:
                syncs.phase = "step"

        Trainer.boundary = counted
        try:
            syncs.phase = "start"
            summary = distres.fit([
                "data.backend=torch", "data.decode=gpu", "data.auto_augment=trivialaugment_wide",
                "data.random_erasing=0.25", "train.mixup_alpha=0.2", "train.cutmix_alpha=1.0",
                "train.ema_decay=0.99", "train.max_steps=30", "tracking.log_every=10",
                "tracking.progress=off", "checkpoint.every_epochs=0", f"run.dir={tmp_path}",
                f"run.device={DEVICE}",
            ])  # fmt: skip
        finally:
            Trainer.boundary = boundary
    assert summary["steps"] == 30
    assert sum(syncs.main["step"].values()) == 0, dict(syncs.main["step"])


def test_batches_of_the_stage_feed_rebatch_and_labels_in_pinned_memory(photos):
    """The encoded chunks are cut into batches in pinned memory (labels and geometry), so
    the stage's copies to the device never stall the host."""
    data = loader(photos, "gpu", DEVICE, val_transform(64, 80), train=False)
    chunks = data._eval_chunks()
    pin = DEVICE == "cuda"  # pinned memory needs a CUDA device
    batch = gpu_decode.EncodedBatch(*next(iter(rebatch(chunks, 16, False, pin=pin))))
    assert batch.labels.is_pinned() == pin and batch.geometry.is_pinned() == pin
    assert data.pin_batches == pin
