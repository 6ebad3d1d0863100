"""The worker side of the torch backend's GPU-decode stage (data.decode=gpu): a sample's
compressed bytes, and the crop box, flip and auto-augmentation operators the CPU path's
torchvision v2 transform would draw for it (the same random calls, in the same order, on the
worker's seeded RNG), packed so no pixels cross the process boundary. The main side,
decoding and augmenting whole batches on the device, is data/torch/gpu_decode.py.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import NamedTuple

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2

from distres.data.api import DataError, SampleKey
from distres.data.torch.crop_resize import GEOMETRY, X, Y
from distres.data.torch.device_augment import AUTO_AUGMENTS, AutoAugmentDraw

# after the geometry: the kind of image (KINDS), and the size its header gives; then the
# auto-augmentation's draws, if any (device_augment.SLOT per operator)
KIND, HEIGHT, WIDTH, AUGMENT = GEOMETRY, GEOMETRY + 1, GEOMETRY + 2, GEOMETRY + 3
# not a JPEG (decoded on the CPU), a JPEG for nvJPEG, a JPEG nvJPEG does not take (CMYK/YCCK:
# decoded on the CPU, as the cpu path does, rather than trusted to a GPU colour conversion)
OTHER, NVJPEG, CPU_JPEG = 0, 1, 2

GEOMETRIC = (v2.RandomResizedCrop, v2.RandomCrop, v2.Resize, v2.CenterCrop)


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
