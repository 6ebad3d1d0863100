"""One typed description of a loader, whichever backend builds it: data/build.py makes it
from the config; a test or a benchmark writes one directly. A field a backend has no use for
is ignored by it (each says which below)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from distres.data.shards.read import ShardSet


@dataclasses.dataclass(frozen=True)
class LoaderSpec:
    shards: ShardSet
    train: bool  # training (shuffled, augmented, equal steps per rank) or evaluation
    batch_size: int
    mean: Sequence[float]
    std: Sequence[float]
    num_classes: int
    in_chans: int = 3
    device: torch.device | str = "cpu"
    out_dtype: torch.dtype = torch.float32  # the autocast dtype on a GPU (input_dtype)
    channels_last: bool = True
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    skip_bad: bool = False  # data.on_bad_sample=skip
    verify: bool = False  # data.verify_checksums
    keys: bool = False  # yield KeyedBatches (each sample's shard and key: the ledger)
    repeats: int = 1  # data.aug_repeats (training)
    shuffle_buffer: int = 2048  # DALI's reader (the torch backend: window)
    # the torch backend's training order (data/torch/order.py): canonical streams (0: auto)
    # and the samples each stream shuffles at a time
    streams: int = 0
    window: int = 256
    # the geometry: training's crop at epoch 0 (size_at(epoch) for progressive resizing),
    # or evaluation's size with its resize
    image_size: int = 224
    size_at: Callable[[int], int] | None = None
    epochs: int | None = None  # no pipeline is prefetched past the last (DALI)
    random_resized_crop: bool = False
    rrc_min_scale: float = 0.08
    crop_padding: int = 0
    hflip: bool = False
    auto_augment: tuple[str, int, int] = ("none", 0, 0)  # (name, magnitude, num_ops)
    val_resize: int = 0
    # the torch backend: DataLoader workers, where JPEGs are decoded, and a transform of the
    # caller's own (None: torchvision v2 transforms from the geometry above)
    num_workers: int = 0
    decode: str = "cpu"
    transform: Callable | None = None
    transform_at: Callable[[int], Callable] | None = None
    # DALI: its pipeline's CPU threads (0: torch's intra-op count)
    threads: int = 0
