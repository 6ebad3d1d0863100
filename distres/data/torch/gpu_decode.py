"""The torch backend's GPU-decode stage (data.decode=gpu): workers send compressed bytes, crop
boxes and auto-augmentation draws; one thread of the main process decodes and augments whole
batches on the device.

Worker side (`Encoder`): read the JPEG header for the image size and draw the geometry with
the same random calls, in the same order, as the CPU path's torchvision v2 transform
(RandomResizedCrop/RandomCrop.make_params, then RandomHorizontalFlip's draw, then the
auto-augmentation's own forward: data/torch/device_augment.py), so a sample gets the same crop,
flip and operators whichever path runs. No pixels cross the process boundary.

Main side (`DecodeStage`): a thread decodes each batch with nvJPEG (torchvision.io.decode_jpeg
on a list, device="cuda"), then data/torch/crop_resize.py crops, resizes and flips the batch, the
auto-augmentation's operators run batched (data/torch/device_augment.py), and the batch is
normalised into one channels_last tensor of the input dtype (the autocast dtype on a GPU).
On H100-class GPUs nvJPEG can write into memory that queued kernels still read
(pytorch/vision issue 9606), so the decoder runs only in this thread, on side streams of its
own, and the stream of each call is synchronised on the host before it. Two side streams take
the batches in turn, so the host waits only for the batch before last, never behind the
training kernels or the previous batch's resize. The training stream waits on an event
recorded after the batch is written, and `record_stream` keeps the caching allocator from
handing the batch's memory back to a side stream before the training stream is done with it.

On a CPU device the same stage runs with libjpeg-turbo decoding, which is how CI tests it.
A batch that fails to decode is bisected to the images that fail, which are tried on the
CPU; an image that still fails follows data.on_bad_sample (an error naming shard and key, or
its slot filled with a copy of another sample of the batch and counted, keeping the shape).
"""

from __future__ import annotations

import io
import logging
import queue
import threading
import time
import warnings
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from distres.data.api import BadSamples, DataError, KeyedBatch
from distres.data.torch.crop_resize import GEOMETRY, X, Y, crop_resize
from distres.data.torch.device_augment import apply as auto_augment
from distres.data.torch.encode import (  # noqa: F401 (the worker side, named from here too)
    AUGMENT,
    CPU_JPEG,
    HEIGHT,
    KIND,
    NVJPEG,
    OTHER,
    WIDTH,
    EncodedBatch,
    Encoder,
    draw,
    pack,
    steps,
    unpack,
)

log = logging.getLogger("distres.data")

# torchvision 0.29 deprecates its image codecs in favour of torchcodec, whose GPU decoder is
# not in the wheels torch's CUDA builds can load everywhere yet; one warning per process
# would say nothing the docs do not.
warnings.filterwarnings("ignore", message=r".*decoding and encoding capabilities of TorchVision")

# a batch that has not come out of the decode thread in this long is an error, not a wait
STALL_S = 600.0


def stage_device(device: torch.device | str) -> torch.device:
    """`device` with its index: a bare "cuda" means the current device (a thread starts on
    cuda:0 and torch.cuda.set_device refuses a device without an index)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class DecodeStage:
    """EncodedBatches -> KeyedBatches on the device, decoded `depth` batches ahead in one
    thread of the main process."""

    def __init__(
        self,
        device: torch.device | str,
        out_dtype: torch.dtype,
        mean: list[float],
        std: list[float],
        in_chans: int,
        skip_bad: bool,
        channels_last: bool = True,
        depth: int = 2,
        fill: float = 128.0,
    ):
        self.device = stage_device(device)
        self.out_dtype, self.in_chans = out_dtype, in_chans
        self.channels_last, self.depth, self.fill = channels_last, depth, fill
        self.bad = BadSamples(skip_bad)
        self._skipped = 0  # images replaced by a copy, handed over so far (see take_skipped)
        scale = 255.0
        self.inv_std = 1.0 / (torch.tensor(std, device=self.device).view(1, -1, 1, 1) * scale)
        self.bias = -torch.tensor(mean, device=self.device).view(1, -1, 1, 1) * scale * self.inv_std
        self.streams: list[torch.cuda.Stream] = []
        if self.device.type == "cuda":
            # the constants above were written on this thread's stream; the side streams
            # read them from the first batch on
            torch.cuda.current_stream(self.device).synchronize()
            self.streams = [torch.cuda.Stream(self.device) for _ in range(2)]
        self._turn = 0
        from torchvision.io import ImageReadMode

        self.mode = ImageReadMode.RGB if in_chans == 3 else ImageReadMode.GRAY

    @property
    def stream(self) -> torch.cuda.Stream | None:
        """The side stream of the batch being decoded (they alternate)."""
        return self.streams[self._turn % 2] if self.streams else None

    def __call__(self, batches: Iterable[EncodedBatch]) -> Iterator[KeyedBatch]:
        todo: queue.Queue = queue.Queue()
        done: queue.Queue = queue.Queue()
        stop = threading.Event()

        def work() -> None:
            try:
                if self.device.type == "cuda":
                    torch.cuda.set_device(self.device)  # a new thread starts on cuda:0
                while (batch := todo.get()) is not None and not stop.is_set():
                    done.put(self.decode(batch))
            except BaseException as e:  # re-raised in the consumer's thread
                done.put(e)

        thread = threading.Thread(target=work, name="distres-decode", daemon=True)
        pending = 0
        try:
            for batch in batches:
                if not thread.is_alive() and not pending:
                    # started once the first records are in: the DataLoader has forked its
                    # workers by then, so no fork happens while this thread runs CUDA calls
                    # (a refill mid-epoch, data/torch/loader.py, is the rare exception)
                    thread.start()
                todo.put(batch)
                pending += 1
                if pending > self.depth:
                    pending -= 1
                    yield self._hand_over(self._next(done, thread))
            while pending:
                pending -= 1
                yield self._hand_over(self._next(done, thread))
        finally:
            stop.set()
            todo.put(None)
            if thread.is_alive():
                thread.join(timeout=STALL_S)

    @staticmethod
    def _next(done: queue.Queue, thread: threading.Thread):
        """The next decoded batch (or the thread's error), never waiting on a dead thread
        or for longer than STALL_S."""
        deadline = time.monotonic() + STALL_S
        while True:
            try:
                return done.get(timeout=1.0)
            except queue.Empty:
                if not thread.is_alive() and done.empty():
                    raise DataError(
                        "data.decode=gpu: the decode thread ended without a batch"
                    ) from None
                if time.monotonic() > deadline:
                    raise DataError(
                        f"data.decode=gpu: no batch from the decode thread in {STALL_S:.0f} s"
                    ) from None

    def take_skipped(self) -> int:
        """Images replaced by a copy (on_bad_sample=skip) in the batches handed over since
        the last call."""
        n, self._skipped = self._skipped, 0
        return n

    def _hand_over(self, item) -> KeyedBatch:
        if isinstance(item, BaseException):
            raise item
        images, labels, keys, event, skipped = item
        self._skipped += skipped
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            images.record_stream(current)
            labels.record_stream(current)
        return KeyedBatch(images, labels, keys)

    def decode(self, batch: EncodedBatch) -> tuple:
        """One batch, in this stage's thread: (images, labels, keys, ready event or None,
        images replaced). A replaced image's key is its stand-in's."""
        if not self.streams:
            return (*self._decode(batch), None, self.bad.take())
        self._turn += 1
        stream = self.stream
        # vision 9606: nothing of ours may be queued on this stream while nvJPEG runs
        # (_nvjpeg syncs it); the other stream's batch may still be resizing meanwhile
        with torch.cuda.stream(stream):
            images, labels, keys = self._decode(batch)
            event = torch.cuda.Event()
            event.record(stream)
        return images, labels, keys, event, self.bad.take()

    def _decode(self, batch: EncodedBatch) -> tuple[torch.Tensor, torch.Tensor, list]:
        images = self._images(batch)
        keys, geometry, labels = batch.keys, batch.geometry, batch.labels
        bad = [i for i, im in enumerate(images) if im is None]
        if bad:  # on_bad_sample=skip: a copy of another sample keeps the shape
            good = [i for i, im in enumerate(images) if im is not None]
            if not good:
                raise DataError(f"{batch.where[0]}: no image of its batch could be decoded")
            source = list(range(len(images)))
            for k, i in enumerate(bad):
                source[i] = good[k % len(good)]
            images = [images[j] for j in source]
            keys = [keys[j] for j in source]
            geometry, labels = geometry[source], labels[source]
        oh, ow = int(geometry[0, Y + 4]), int(geometry[0, X + 4])
        n, c = len(images), self.in_chans
        # N x H x W x C storage seen as N x C x H x W: channels_last with no transpose
        out = torch.empty(n, oh, ow, c, dtype=self.out_dtype, device=self.device)
        out = out.permute(0, 3, 1, 2)
        if geometry.shape[1] > AUGMENT:  # auto-augmentation: on uint8 pixels, as v2's
            pixels = torch.empty(n, oh, ow, c, dtype=torch.uint8, device=self.device)
            pixels = pixels.permute(0, 3, 1, 2)
            crop_resize(images, geometry[:, :GEOMETRY], pixels, None, None)
            auto_augment(pixels, geometry[:, AUGMENT:], self.fill)
            out.copy_(torch.addcmul(self.bias, pixels.float(), self.inv_std))
        else:
            crop_resize(images, geometry[:, :GEOMETRY], out, self.inv_std, self.bias)
        if not self.channels_last:
            out = out.contiguous()
        if self.device.type == "cuda":  # labels come in pinned memory (rebatch)
            labels = labels.to(self.device, non_blocking=True)
        return out, labels, keys

    def _images(self, batch: EncodedBatch) -> list[torch.Tensor | None]:
        """Decoded C x H x W uint8 images on the device; None where on_bad_sample=skip left
        one out. The batch's JPEGs in one call (bisected if it fails), the rest on the CPU."""
        kinds = batch.geometry[:, KIND].numpy()
        n = len(kinds)
        images: list[torch.Tensor | None] = [None] * n
        jpeg = np.flatnonzero(kinds == NVJPEG).tolist() if self.streams else []
        if jpeg:
            for i, im in zip(jpeg, self._nvjpeg_bisect([batch.data[i] for i in jpeg]),
                             strict=True):  # fmt: skip
                images[i] = im
        sizes = batch.geometry[:, HEIGHT : WIDTH + 1].numpy().astype(np.int64)
        for i in range(n):
            if images[i] is None:
                images[i] = self._on_cpu(batch, i)
        shapes = np.array([im.shape if im is not None else (0, 0, 0) for im in images])
        decoded = shapes[:, 0] != 0
        wrong = decoded & ((shapes[:, 0] != self.in_chans) | (shapes[:, 1:] != sizes).any(1))
        for i in np.flatnonzero(wrong).tolist():
            why = f"decoded as {tuple(images[i].shape)}, not the header's size"
            images[i] = self._bad(batch.where[i], why)
        return images

    def _nvjpeg_bisect(self, datas: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """One call for all; if it fails, halves, down to the images that fail alone (None:
        left to the CPU decoder)."""
        try:
            return self._nvjpeg(datas)
        except RuntimeError:
            if len(datas) == 1:
                return [None]
            half = len(datas) // 2
            return self._nvjpeg_bisect(datas[:half]) + self._nvjpeg_bisect(datas[half:])

    def _nvjpeg(self, datas: list[torch.Tensor]) -> list[torch.Tensor]:
        from torchvision.io import decode_jpeg

        self.stream.synchronize()  # before every call, retries too (vision 9606)
        return decode_jpeg(datas, mode=self.mode, device=self.device)

    def _on_cpu(self, batch: EncodedBatch, i: int) -> torch.Tensor | None:
        """The cpu path's decoders: libjpeg-turbo (torchcodec) for JPEGs, PIL for the rest
        (PNG...), converted the same way, so the pixels are that path's."""
        from distres.data.torch.transforms import decode_jpeg

        data = bytes(batch.data[i].numpy())
        try:
            if batch.geometry[i, KIND] != OTHER:
                image = decode_jpeg(data, mode=self.mode.name)
            else:
                img = Image.open(io.BytesIO(data))
                mode = "RGB" if self.in_chans == 3 else "L"
                img = img.convert(mode) if img.mode != mode else img
                image = v2.functional.pil_to_tensor(img)
        except (RuntimeError, ValueError, OSError, SyntaxError) as e:
            return self._bad(batch.where[i], f"cannot decode image ({e})")
        if self.device.type == "cuda":  # from pinned memory: no stall behind queued work
            return image.pin_memory().to(self.device, non_blocking=True)
        return image

    def _bad(self, where: str, why: str) -> None:
        self.bad(DataError(f"{where}: {why}"))
        return None


def resolve_decode(decode: str, device: torch.device, auto_augment: str = "none") -> str:
    """data.decode for a run on `device`: auto is gpu on a CUDA device whose nvJPEG passes
    `self_check`, else cpu; an explicit gpu on a CUDA device that fails it is an error (every
    batch would otherwise fall back to the CPU, one image at a time, in one thread). The
    stage applies data.auto_augment on the device too (data/torch/device_augment.py)."""
    del auto_augment  # every auto-augmentation runs in the stage
    if decode == "cpu" or (decode == "auto" and device.type != "cuda"):
        return "cpu"
    if device.type != "cuda":
        log.warning(
            "data.decode=gpu on a CPU device: the stage decodes and resizes in one thread of "
            "the main process (slower than data.decode=cpu here; it is built for CUDA)"
        )
        return "gpu"
    problem = self_check(device)
    if problem is None:
        return "gpu"
    if decode == "gpu":
        raise DataError(f"data.decode=gpu: nvJPEG cannot decode on {device}: {problem}")
    log.warning(
        f"data.decode=auto: decoding on the CPU, nvJPEG is unusable on {device} ({problem})"
    )
    return "cpu"


def self_check(device: torch.device) -> str | None:
    """Why nvJPEG cannot serve this device, or None: a small JPEG decoded through the
    stage's own path must match libjpeg-turbo's pixels to a few levels."""
    from torchvision.io import decode_jpeg

    gradient = torch.arange(48 * 64, dtype=torch.float32).view(48, 64) % 251
    rgb = torch.stack([gradient, gradient.t().reshape(48, 64), 255 - gradient]).byte()
    buf = io.BytesIO()
    Image.fromarray(rgb.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=90)
    raw = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    try:
        stage = DecodeStage(device, torch.float32, [0.0] * 3, [1.0] * 3, 3, skip_bad=False)
        with torch.cuda.stream(stage.stream):
            on_gpu = stage._nvjpeg([raw])[0].cpu()
        on_cpu = decode_jpeg(raw)
    except Exception as e:  # any failure means: not this device
        return f"{type(e).__name__}: {e}"
    diff = int((on_gpu.int() - on_cpu.int()).abs().max())
    return None if diff <= 48 else f"its pixels differ from libjpeg-turbo's by {diff} levels"
