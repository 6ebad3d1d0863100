"""The torch backend's GPU-decode stage (data.decode=gpu): workers send compressed bytes, crop
boxes and auto-augmentation draws; one thread of the main process decodes and augments whole
batches on the device.

Worker side (`Encoder`): read the JPEG header for the image size and draw the geometry with
the same random calls, in the same order, as the CPU path's torchvision v2 transform
(RandomResizedCrop/RandomCrop.make_params, then RandomHorizontalFlip's draw, then the
auto-augmentation's own forward: data/device_augment.py), so a sample gets the same crop,
flip and operators whichever path runs. No pixels cross the process boundary.

Main side (`DecodeStage`): a thread decodes each batch with nvJPEG (torchvision.io.decode_jpeg
on a list, device="cuda"), then data/crop_resize.py crops, resizes and flips the batch, the
auto-augmentation's operators run batched (data/device_augment.py), and the batch is
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
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2

from distres.data.api import BadSamples, DataError, KeyedBatch, SampleKey
from distres.data.crop_resize import GEOMETRY, X, Y, crop_resize
from distres.data.device_augment import AUTO_AUGMENTS, AutoAugmentDraw
from distres.data.device_augment import apply as auto_augment

log = logging.getLogger("distres.data")

# torchvision 0.29 deprecates its image codecs in favour of torchcodec, whose GPU decoder is
# not in the wheels torch's CUDA builds can load everywhere yet; one warning per process
# would say nothing the docs do not.
warnings.filterwarnings("ignore", message=r".*decoding and encoding capabilities of TorchVision")

# after the geometry: the kind of image (KINDS), and the size its header gives; then the
# auto-augmentation's draws, if any (device_augment.SLOT per operator)
KIND, HEIGHT, WIDTH, AUGMENT = GEOMETRY, GEOMETRY + 1, GEOMETRY + 2, GEOMETRY + 3
# not a JPEG (decoded on the CPU), a JPEG for nvJPEG, a JPEG nvJPEG does not take (CMYK/YCCK:
# decoded on the CPU, as the cpu path does, rather than trusted to a GPU colour conversion)
OTHER, NVJPEG, CPU_JPEG = 0, 1, 2

GEOMETRIC = (v2.RandomResizedCrop, v2.RandomCrop, v2.Resize, v2.CenterCrop)
# a batch that has not come out of the decode thread in this long is an error, not a wait
STALL_S = 600.0


class EncodedBatch(NamedTuple):
    """Samples on their way to the decode stage, column by column (a worker's chunk or a
    batch: data/batch.rebatch cuts and joins them)."""

    data: list[torch.Tensor]  # each sample's compressed image, uint8
    labels: torch.Tensor  # int64
    geometry: torch.Tensor  # float64, one row per sample: GEOMETRY, KIND, HEIGHT, WIDTH, draws
    where: list[str]  # shard and key, for errors
    keys: list[SampleKey | None]  # which sample (a KeyedBatch's keys)


def steps(transform: Callable) -> list:
    """The transform's steps, checked to be ones the stage reproduces (DataError if not):
    geometry and flips, then at most one auto-augmentation, last."""
    ops = list(transform.transforms) if isinstance(transform, v2.Compose) else [transform]
    for k, op in enumerate(ops):
        if isinstance(op, AUTO_AUGMENTS) and k == len(ops) - 1:
            continue
        if not isinstance(op, (*GEOMETRIC, v2.RandomHorizontalFlip)):
            raise DataError(
                f"data.decode=gpu cannot apply {type(op).__name__} on the device; "
                "use data.decode=cpu for this augmentation"
            )
        if isinstance(op, v2.RandomCrop) and op.padding_mode != "constant":
            raise DataError("data.decode=gpu pads with zeros only (RandomCrop padding_mode)")
    return ops


def _make_params(op, height: int, width: int) -> dict:
    # query_size reads only the shape: a stride-0 view stands for the image, no pixels
    probe = torch.empty(1, dtype=torch.uint8).expand(1, height, width)
    make = getattr(op, "make_params", None) or op._get_params  # torchvision < 0.21
    return make([probe])


def draw(ops: list, height: int, width: int) -> list[float]:
    """The geometry the CPU path's transform would apply to a height x width image, drawn
    with the same calls on torch's global RNG (what the worker seeded)."""
    # per axis: region start, region length, resized length, window offset, window length
    y, x, flip = [0, height, height, 0, height], [0, width, width, 0, width], 0.0
    for op in ops:
        if isinstance(op, AUTO_AUGMENTS):
            continue  # drawn after the geometry, by Encoder
        if isinstance(op, v2.RandomHorizontalFlip):
            if not torch.rand(1) >= op.p:  # _RandomApplyTransform.forward's draw
                flip = 1.0 - flip
            continue
        p = _make_params(op, y[4], x[4]) if not isinstance(op, v2.Resize) else None
        if isinstance(op, v2.RandomResizedCrop):
            _crop(y, p["top"], p["height"])
            _crop(x, p["left"], p["width"])
            _resize(y, op.size[0])
            _resize(x, op.size[1])
        elif isinstance(op, v2.RandomCrop):
            pad_left, pad_top = p["padding"][0], p["padding"][1]
            _crop(y, p["top"] - pad_top, p["height"])
            _crop(x, p["left"] - pad_left, p["width"])
        elif isinstance(op, v2.CenterCrop):
            _crop(y, _center(y[4], op.size[0]), op.size[0])
            _crop(x, _center(x[4], op.size[1]), op.size[1])
        else:  # Resize
            h, w = v2.functional._geometry._compute_resized_output_size(
                (y[4], x[4]), size=op.size, max_size=op.max_size
            )
            _resize(y, h)
            _resize(x, w)
    return [*y, *x, flip]


def _center(size: int, crop: int) -> int:
    """Where torchvision's center_crop starts along one axis: zero padding of
    (crop - size) // 2 before a smaller image, else the rounded centre."""
    return -((crop - size) // 2) if crop > size else round((size - crop) / 2.0)


def _crop(axis: list, start: int, length: int) -> None:
    if axis[1] == axis[2]:  # nothing resized yet: the crop is a source region
        axis[:] = [axis[0] + axis[3] + start, length, length, 0, length]
    else:  # a window of the resized region
        axis[3], axis[4] = axis[3] + start, length


def _resize(axis: list, length: int) -> None:
    if axis[3] != 0 or axis[4] != axis[2]:
        if axis[1] != axis[2]:
            raise ValueError("data.decode=gpu: a resize after a crop of a resized image")
        axis[:] = [axis[0] + axis[3], axis[4], axis[4], 0, axis[4]]  # crop -> region
    axis[2] = axis[4] = length


class Encoder:
    """Worker side: a sample's compressed bytes and draws, no decoding."""

    def __init__(self, transform: Callable, in_chans: int = 3):
        self.ops = steps(transform)
        aug = [op for op in self.ops if isinstance(op, AUTO_AUGMENTS)]
        self.augment = AutoAugmentDraw(aug[0], in_chans) if aug else None

    def __call__(self, data: bytes, where: str) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            img = Image.open(io.BytesIO(data))  # parses the header only
            width, height = img.size
            kind = (
                OTHER if img.format != "JPEG" else NVJPEG if img.mode in ("RGB", "L") else CPU_JPEG
            )
        except (OSError, UnidentifiedImageError, SyntaxError) as e:
            raise DataError(f"{where}: cannot decode image ({e})") from None
        geometry = draw(self.ops, height, width)
        geometry += [float(kind), height, width]
        if self.augment is not None:  # on the cropped image's size, as the CPU path
            geometry += self.augment(int(geometry[Y + 4]), int(geometry[X + 4]))
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return raw, torch.tensor(geometry, dtype=torch.float64)


def pack(items: list[tuple[torch.Tensor, torch.Tensor, str]]) -> tuple:
    """A worker's (bytes, geometry, where) items as one chunk: all bytes in one tensor, so
    the chunk crosses to the main process in one shared-memory segment."""
    data, geometry, where = zip(*items, strict=True)
    sizes = torch.tensor([len(d) for d in data], dtype=torch.int64)
    return torch.cat(data), sizes, torch.stack(geometry), list(where)


def unpack(chunk: tuple, labels: torch.Tensor, keys: list[SampleKey]) -> EncodedBatch:
    data, sizes, geometry, where = chunk
    return EncodedBatch(list(data.split(sizes.tolist())), labels, geometry, where, keys)


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
                    # (a refill mid-epoch, data/torch_loader.py, is the rare exception)
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
        from distres.data.transforms import decode_jpeg

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
    stage applies data.auto_augment on the device too (data/device_augment.py)."""
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
