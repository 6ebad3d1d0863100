"""The data contract both backends (torch_loader, dali) honour, and what they share.

A loader yields `Batch`es (`KeyedBatch`es, with each sample's `SampleKey`, when built with
keys=True): images N x C x H x W on the model's device (channels_last strides
when asked for), labels int64. Every rank gets the same number of batches per epoch. Its
position is a JSON-able state_dict, restored exactly on the same world size; on another
world size `resume_from_ranks` places it from all old ranks' states.

A sample that cannot be used is a `DataError` naming its shard and key; `BadSamples` applies
`data.on_bad_sample` to it: raise it ("error"), or report it and count it ("skip").
"""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING, NamedTuple, Protocol

import torch

from distres.errors import DataError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from distres.data.shards.read import ShardSet

__all__ = ["BadSamples", "Batch", "DataError", "KeyedBatch", "Loader", "SampleKey"]


class Batch(NamedTuple):
    images: torch.Tensor
    """N x C x H x W float on the model's device, channels_last strides when asked for."""
    labels: torch.Tensor
    """N int64 class indices on the model's device."""


class SampleKey(NamedTuple):
    """Which sample: world-size-free, so per-sample results from any number of ranks merge
    into one order (the shard set's order, then tar order)."""

    shard: int
    """The shard's index in the shard set (its manifest order)."""
    at: int
    """Where in the shard, in tar order: the sample's ordinal (torch) or byte offset (DALI)."""
    key: str
    """The webdataset key (the member names' common stem)."""


class KeyedBatch(NamedTuple):
    """A Batch with each sample's SampleKey: what a loader built with keys=True yields
    (the per-sample ledger, distres.results.ledger). Training never asks for keys."""

    images: torch.Tensor
    labels: torch.Tensor
    keys: list[SampleKey]


class Loader(Protocol):
    """What the trainer and evaluation need of an input pipeline."""

    shards: ShardSet
    skipped: int  # bad samples reported and left out so far (data.on_bad_sample=skip)

    def __len__(self) -> int: ...  # batches per epoch, the same on every rank
    def __iter__(self) -> Iterator[Batch]: ...
    def set_epoch(self, epoch: int) -> None: ...
    def num_samples(self) -> int: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def close(self) -> None: ...  # release pipelines, workers and device memory now
    def resume_from_ranks(
        self, epoch: int, states: list[dict], micro_batch: int, world_size: int
    ) -> int: ...


class BadSamples:
    """data.on_bad_sample for one reader: raise the error, or report it and count it."""

    def __init__(self, skip: bool):
        self.skip, self.count = skip, 0

    def __call__(self, error: DataError, report: bool = True, count: int = 1) -> None:
        """count: the samples it stands for (a shard that could not be fetched: all of
        them)."""
        if not self.skip:
            raise error
        if report:  # where every rank sees the same bad sample, one reports and counts
            logging.getLogger("distres.data").warning(f"skipped bad data: {error}")
            self.count += count

    def take(self) -> int:
        """The count since the last take (how a worker hands its count to the main process)."""
        n, self.count = self.count, 0
        return n


def shard_order(shards: ShardSet, epoch: int, seed: int, shuffle: bool) -> list[int]:
    """Shard indices in this epoch's order; identical on every rank (seed and epoch shared)."""
    order = list(range(len(shards.urls)))
    if shuffle:
        random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


def parse_label(raw: bytes, where: str, num_classes: int) -> int:
    """A sample's .cls member (ASCII digits) as a class index; DataError naming `where`
    (shard and key) when it is not one. Both backends use it, so their messages agree."""
    try:
        label = int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise DataError(f"{where}: .cls is not an integer: {raw[:20]!r}") from None
    if not 0 <= label < num_classes:
        raise DataError(f"{where}: label {label} outside [0, {num_classes})")
    return label


def position_problem(state: object) -> str | None:
    """Why a loader's saved position (its state_dict) would not restore, or None: the part
    every backend shares (epoch and batches); a backend checks its own further."""
    if not isinstance(state, dict):
        return "not a mapping"
    for key in ("epoch", "batches", "position", "streams"):
        value = state.get(key)
        if (key in ("epoch", "batches") or value is not None) and not _count(value):
            return f"{key}={value!r}"
    slots = state.get("slots", [])
    if not isinstance(slots, list) or not all(
        isinstance(p, list) and len(p) == 2 and all(map(_count, p)) for p in slots
    ):
        return "slots: not a list of [stream, slot] pairs"
    return None


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def class_names(classes: dict[str, int], num_classes: int) -> list[str]:
    """One name per output index from a shard set's class map; an index no name maps to is
    its own name."""
    names = [str(i) for i in range(num_classes)]
    for name, index in classes.items():
        if 0 <= index < num_classes:
            names[index] = name
    return names
