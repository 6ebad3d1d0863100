"""The torch input pipeline: webdataset tar reading + torchvision transforms v2.

Workers decode and augment single images as uint8 CHW tensors and hand over small uint8
chunks; the main process cuts them into exact batches, moves them to the device (uint8 is a
quarter of the bytes of fp32) and normalises there, in channels_last memory. The training
order and each sample's augmentation are functions of (seed, epoch, data.streams), not of the
world size (data/torch/order.py), so a run is reproducible and resumes exactly on any world
size that divides the stream count.
"""

from __future__ import annotations

import collections
import itertools
import logging
import signal
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader

from distres.data.api import (
    Batch,
    DataError,
    KeyedBatch,
    shard_order,
)
from distres.data.buffers import BufferPool, rebatch
from distres.data.shards import storage
from distres.data.spec import LoaderSpec
from distres.data.torch.encode import EncodedBatch, Encoder, steps, unpack
from distres.data.torch.gpu_decode import DecodeStage
from distres.data.torch.order import EpochOrder, auto_streams, world_sizes
from distres.data.torch.stream import SampleStream
from distres.data.torch.train_stream import CanonicalStream, interleave
from distres.data.torch.transforms import train_transform, val_transform

log = logging.getLogger("distres")


class ShardLoader:
    """Batches of one rank's part of a shard set, one epoch per iteration.

    Training follows the epoch's canonical streams (data/torch/order.py): an order that is a
    function of (seed, epoch, data.streams) alone, whose consumed part any world size that
    divides the stream count subtracts exactly. Every rank runs the same number of batches:
    the epoch's positions (every stream's equal share of the samples) over the global batch.

    Validation counts every sample exactly once with no padding: whole shards per rank when
    there are at least as many shards as ranks, otherwise every rank reads all shards and
    keeps the samples whose index is its rank modulo the world size. Batch counts may differ
    between ranks; evaluation has no collective until its final sums.
    """

    def __init__(self, spec: LoaderSpec):
        shards, train, world_size = spec.shards, spec.train, spec.world_size
        self.spec = spec
        self.streams = streams(spec) if train else 0  # the epoch order's canonical streams
        if train and shards.remote and shards.shard_cache().limit:
            _check_cache(spec, self.streams)
        self.window = spec.window
        self.shards, self.train, self.batch_size = shards, train, spec.batch_size
        self.num_classes, self.in_chans = spec.num_classes, spec.in_chans
        self.transform, self.transform_at = transforms(spec)  # progressive resizing: per epoch
        self.device = torch.device(spec.device)
        self.out_dtype = spec.out_dtype  # the autocast dtype on a GPU (precision.input_dtype)
        self.memory_format = torch.channels_last if spec.channels_last else torch.contiguous_format
        self.num_workers = spec.num_workers
        self.seed, self.rank, self.world_size = spec.seed, spec.rank, world_size
        self.repeats = spec.repeats if train else 1  # data.aug_repeats; see EpochOrder.range
        self.keys = spec.keys  # yield KeyedBatches (each sample's shard and key)
        self.epoch = 0
        self._done = 0  # batches delivered this epoch
        # training: the position this rank's part of the epoch starts at, each stream's first
        # slot there, and each of its streams' next slot as batches are delivered
        self._start: tuple[int, dict[int, int]] = (0, {})
        self._slots: dict[int, int] = {}
        self._position = 0
        self.skip_bad, self.verify = spec.skip_bad, spec.verify
        self.skipped = 0  # bad samples skipped so far (data.on_bad_sample=skip)
        scale = 255.0
        std = torch.tensor(list(spec.std), device=self.device).view(1, -1, 1, 1)
        self.inv_std = 1.0 / (std * scale)
        mean = torch.tensor(list(spec.mean), device=self.device).view(1, -1, 1, 1)
        self.bias = -mean * scale * self.inv_std
        self._pool = BufferPool()
        self.pin_batches = self.device.type == "cuda"  # see rebatch
        self.stage = None  # data.decode=gpu: decoding and augmentation in gpu_decode
        if spec.decode == "gpu":
            for t in (self.transform, *((self.transform_at(0),) if self.transform_at else ())):
                steps(t)  # an augmentation the stage cannot apply: an error before training
            self.stage = DecodeStage(self.device, spec.out_dtype, list(spec.mean),
                                     list(spec.std), spec.in_chans, spec.skip_bad,
                                     spec.channels_last)  # fmt: skip

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.train:
            self._begin(0, {})

    def _begin(self, position: int, slots: dict[int, int]) -> None:
        """Training: this rank's part of the epoch starts at `position`, each stream at its
        slot in `slots` (absent: 0)."""
        streams = self.order().rank_streams(position, self.rank, self.world_size)
        self._slots = {s: slots.get(s, 0) for s in streams}
        self._start, self._position = (position, dict(self._slots)), position
        self._done = position // (self.world_size * self.batch_size)

    @property
    def strided(self) -> bool:
        return not self.train and len(self.shards.urls) < self.world_size

    def my_shards(self) -> list[int]:
        """Evaluation: this rank's shards (all of them when strided)."""
        order = list(range(len(self.shards.urls)))
        return order if self.strided else order[self.rank :: self.world_size]

    def order(self, epoch: int | None = None) -> EpochOrder:
        """Training: the epoch's canonical streams."""
        epoch = self.epoch if epoch is None else epoch
        return EpochOrder(self.shards.counts, shard_order(self.shards, epoch, self.seed, True),
                          self.streams, self.window, self.seed, epoch, self.repeats)  # fmt: skip

    def num_samples(self, epoch: int | None = None) -> int:
        """Samples this rank reads in the epoch."""
        if self.train:
            return self.streams * (self.shards.num_samples // self.streams) // self.world_size
        if self.strided:
            n, w = self.shards.num_samples, self.world_size
            return (n - self.rank + w - 1) // w
        return sum(self.shards.counts[i] for i in self.my_shards())

    def __len__(self) -> int:
        n = self.num_samples()
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    # -- evaluation --------------------------------------------------------------------------
    def _eval_chunks(self) -> Iterator[tuple]:
        if self.verify:  # in this process, which remembers what it checked (workers do not)
            for i in self.my_shards():
                self.shards.verify(i)
        stream = SampleStream(
            self.shards, self.my_shards(), self.transform, 0, 0, self.num_classes,
            self.in_chans, stride=(self.rank, self.world_size) if self.strided else (0, 1),
            skip_bad=self.skip_bad, encoder=Encoder(self.transform, self.in_chans)
            if self.stage else None, verify=self.verify,
        )  # fmt: skip
        workers = min(self.num_workers, len(stream.shard_ids))
        if self.shards.remote:
            k = max(1, workers)
            self._fetch_first([stream.shard_ids[w::k] for w in range(k)])
        for images, labels, skipped, keys in self._run(stream, workers, seed=0):
            self.skipped += skipped
            if images is not None:
                yield (unpack(images, labels, keys) if self.stage else (images, labels, keys))

    # -- training ----------------------------------------------------------------------------
    def _train_chunks(self, order: EpochOrder, streams: list[int], starts: dict[int, int],
                      total: int):  # fmt: skip
        """The rank's samples in position order, each with its (stream, slot)."""
        transform = self.transform_at(self.epoch) if self.transform_at else self.transform
        # what is left to read: a resumed stream's consumed windows are neither checked nor
        # fetched again
        reads = [order.shards_from(s, starts.get(s, 0)) for s in streams]
        if self.verify:
            for i in sorted({i for ids in reads for i in ids}):
                self.shards.verify(i)
        stream = CanonicalStream(
            order, streams, starts, total, self.shards, [], transform, 0, 0, self.num_classes,
            self.in_chans, skip_bad=self.skip_bad, verify=self.verify,
            encoder=Encoder(transform, self.in_chans) if self.stage else None,
        )  # fmt: skip
        workers = max(d for d in range(1, max(1, self.num_workers) + 1) if len(streams) % d == 0)
        workers = workers if self.num_workers else 0
        if self.shards.remote:
            self._fetch_first(reads)
        group = []
        for images, labels, skipped, keys, where in self._run(stream, workers, self.epoch):
            self.skipped += skipped
            chunk = unpack(images, labels, keys) if self.stage else (images, labels, keys)
            group.append((*chunk, where))
            if len(group) == max(1, workers):
                yield interleave(group)
                group = []
        if group:  # the epoch's last chunks, one sample shorter from the later workers
            yield interleave(group)

    def _run(self, stream, workers: int, seed: int) -> Iterator[tuple]:
        loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=workers,
            # batches are assembled in pinned memory by rebatch: pinning the chunks first
            # would only add a copy
            pin_memory=False,
            prefetch_factor=4 if workers else None,
            worker_init_fn=_ignore_stop_signals,
            # its iterator draws a base seed; from torch's global RNG (the model's) without
            # a generator, one draw per pass that a resumed run would make at another step
            generator=torch.Generator().manual_seed(hash((self.seed, seed)) & 0x7FFF_FFFF),
        )
        chunks = iter(loader)
        try:
            yield from chunks
        finally:
            # Workers ignore SIGTERM (_ignore_stop_signals), so one left waiting after an
            # error or an early stop would hang the interpreter's exit, which joins it; a
            # traceback kept alive (a logger, a test) would keep this iterator from freeing.
            getattr(chunks, "_shutdown_workers", lambda: None)()

    def _fetch_first(self, reads: list[list[int]]) -> None:
        """Start downloading this rank's first shards of the epoch in the order its readers
        take them, up to 16 at once, while the workers start. With a cache limit, only as
        many as it holds beside the ones being read; the readers fetch the rest
        data.prefetch ahead of themselves."""
        cache = self.shards.shard_cache()
        order = list(dict.fromkeys(
            p[k] for k in range(max(map(len, reads), default=0)) for p in reads if k < len(p)
        ))  # fmt: skip
        if self.num_workers:
            # a command started from a thread while DataLoader forks its workers can hand
            # its exec-error pipe to a worker and never return: pipe: shards are fetched
            # ahead by the workers themselves, which fork nothing
            order = [i for i in order if not storage.is_pipe(self.shards.urls[i])]
        if cache.limit:
            biggest = max((self.shards.size(i) or 0 for i in order), default=0) or 1
            slots = max(1, len(reads))
            order = order[: max(slots, cache.limit // biggest - slots)]
        self.shards.prefetch(order, self.verify, threads=min(16, len(order)))

    def __iter__(self) -> Iterator[Batch]:
        if not self.train:
            yield from self._deliver(self._eval_chunks(), None)
            return
        order = self.order()
        self._begin(*self._start)
        position, starts = self._start
        left = (order.positions - position) // (self.world_size * self.batch_size)
        chunks = self._train_chunks(order, list(starts), starts, left * self.batch_size)
        yield from self._deliver(chunks, left)

    def _deliver(self, chunks: Iterator[tuple], left: int | None) -> Iterator[Batch]:
        """Batches cut from chunks (training: `left` of them, full ones, each chunk's last
        column the samples' (stream, slot), taken as the position when delivered)."""
        where: collections.deque = collections.deque()

        def cut() -> Iterator[tuple]:
            for b in rebatch(chunks, self.batch_size, self.train, pin=self.pin_batches):
                if left is not None:
                    where.append(b[-1])
                    b = b[:-1]
                yield EncodedBatch(*b) if self.stage else b

        batches = itertools.islice(cut(), left)
        if self.stage is not None:
            for batch in self.stage(batches):
                self._delivered(where)
                self.skipped += self.stage.take_skipped()
                yield batch if self.keys else Batch(batch.images, batch.labels)
            return
        for images, labels, keys in batches:
            self._delivered(where)
            batch = self._to_device(images, labels)
            yield KeyedBatch(*batch, keys) if self.keys else batch

    def _delivered(self, where: collections.deque) -> None:
        self._done += 1
        if where:
            self._position += self.world_size * self.batch_size
            for s, slot in where.popleft().tolist():
                if slot >= self._slots.get(s, 0):
                    self._slots[s] = slot + 1

    def resume_from_ranks(
        self, epoch: int, states: list[dict], micro_batch: int, world_size: int
    ) -> int:
        """Continue `epoch` after another world size stopped in it, exactly: the position
        every rank shares and each stream's next slot, from all old ranks' states. Returns
        this rank's batches left in the epoch."""
        self.epoch = epoch
        first = states[0]
        position = first.get("position", first["batches"] * micro_batch * world_size)
        slots = {s: v for state in states for s, v in state.get("slots", [])}
        self._begin(position, self._place(first, position, slots))
        return (self.order().positions - position) // (self.world_size * self.batch_size)

    def _place(self, state: dict, position: int, slots: dict[int, int]) -> dict[int, int]:
        saved = state.get("streams", self.streams)
        if saved != self.streams:
            raise DataError(
                f"{self.shards.root}: the checkpoint's data position counts {saved} streams, "
                f"this run has data.streams={self.streams}; resume with data.streams={saved}"
            )
        if "slots" not in state:  # written before canonical streams: the epoch's rest is new
            log.warning(
                f"WARNING: the checkpoint's data position in epoch {self.epoch} predates "
                "canonical streams: the epoch goes on in the new order from the same step "
                "(some of its samples may repeat or be left out in this epoch only)"
            )
            return dict(enumerate(self.order().consumed(position)))
        return slots

    def close(self) -> None:
        """Nothing to release between epochs: workers live for one epoch's iteration."""

    def state_dict(self) -> dict:
        """The data position: the epoch, the batches delivered in it (on this layout), the
        position every rank shares and the next slot of each of this rank's streams."""
        if not self.train:
            return {"epoch": self.epoch, "batches": self._done}
        return {
            "epoch": self.epoch,
            "batches": self._done,
            "position": self._position,
            "streams": self.streams,
            "slots": [[s, v] for s, v in sorted(self._slots.items())],
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        position = state.get("position", state["batches"] * self.world_size * self.batch_size)
        slots = {s: v for s, v in state.get("slots", [])}
        self._begin(position, self._place(state, position, slots))

    def _to_device(self, images: torch.Tensor, labels: torch.Tensor) -> Batch:
        # uint8 NHWC crosses to the device (a quarter of fp32's bytes); seen as NCHW it has
        # channels_last strides already.
        x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        if self.device.type == "cpu":
            out = self._pool.take(x.shape, self.out_dtype, torch.channels_last)
        else:
            out = torch.empty_like(x, dtype=self.out_dtype)  # keeps the channels_last strides
        # (x - mean) / std as one fused pass, computed in fp32, written in the input dtype
        torch.addcmul(self.bias, x, self.inv_std, out=out)
        if self.memory_format != torch.channels_last:
            out = out.contiguous(memory_format=self.memory_format)
        return Batch(out, labels.to(self.device, non_blocking=True))


def _ignore_stop_signals(worker_id: int) -> None:
    # A preemption signal is the training process's to handle (stop at a step boundary);
    # Slurm may signal every process of the job, and a terminal's Ctrl-C every process of
    # its foreground group: a worker killed by either would crash the loader mid-step.
    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def transforms(spec: LoaderSpec) -> tuple[Callable, Callable[[int], Callable] | None]:
    """The spec's own transform, or torchvision v2's from its geometry (training: one per
    epoch's size, for progressive resizing)."""
    if spec.transform is not None:
        return spec.transform, spec.transform_at
    if not spec.train:
        return val_transform(spec.image_size, spec.val_resize), None

    def transform_at(epoch: int) -> Callable:
        size = spec.size_at(epoch) if spec.size_at is not None else spec.image_size
        return train_transform(size, spec.random_resized_crop, spec.rrc_min_scale,
                               spec.crop_padding, spec.hflip, spec.auto_augment)  # fmt: skip

    return transform_at(0), (transform_at if spec.size_at is not None else None)


def streams(spec: LoaderSpec) -> int:
    """The training order's canonical streams (data.streams; 0: auto_streams), checked
    against this world size and the data."""
    n, world, repeats = spec.shards.num_samples, spec.world_size, spec.repeats
    c = spec.streams or auto_streams(world, spec.num_workers, n, repeats)
    if c % world or c % repeats:
        which = "ranks" if c % world else "data.aug_repeats"
        raise DataError(
            f"data.streams={c} (the order of this run's epochs) cannot be split evenly over "
            f"{world if c % world else repeats} {which}; world sizes that continue it exactly: "
            f"{world_sizes(c)}"
        )
    if n < c:
        raise DataError(
            f"{spec.shards.root}: {n} training samples for data.streams={c}; every stream "
            "needs at least one sample (set fewer streams)"
        )
    return c


def _check_cache(spec: LoaderSpec, streams: int) -> None:
    """A cache limit that cannot hold the shards this rank reads at once (one per stream of
    its own) would evict a shard being read: refused before training."""
    shards = spec.shards
    limit, biggest = (
        shards.shard_cache().limit,
        max(shards.size(i) or 0 for i in range(len(shards.urls))),
    )
    at_once = min(streams // spec.world_size, len(shards.urls))
    if biggest and limit < at_once * biggest:
        raise DataError(
            f"data.cache_limit={limit} bytes holds {limit // biggest} shard(s) of up to "
            f"{biggest} bytes; this rank reads {at_once} shards at once (data.streams="
            f"{streams} over {spec.world_size} rank(s)): raise the limit or set fewer streams"
        )
