"""The torch input pipeline: webdataset tar reading + torchvision transforms v2.

Workers decode and augment single images as uint8 CHW tensors and hand over small uint8
chunks; the main process cuts them into exact batches, moves them to the device (uint8 is a
quarter of the bytes of fp32) and normalises there, in channels_last memory. The order is a
pure function of (seed, epoch, rank): shards are reshuffled per epoch with a seed every rank
shares, then samples are mixed in a seeded buffer, so a run is reproducible.
"""

from __future__ import annotations

import itertools
import signal
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader

from distres.data.api import (
    Batch,
    DataError,
    KeyedBatch,
    SampleKey,
    shard_order,
)
from distres.data.buffers import BufferPool, rebatch
from distres.data.shards import storage
from distres.data.spec import LoaderSpec
from distres.data.torch.encode import EncodedBatch, Encoder, steps, unpack
from distres.data.torch.gpu_decode import DecodeStage
from distres.data.torch.stream import SampleStream
from distres.data.torch.transforms import train_transform, val_transform


class ShardLoader:
    """Batches of one rank's part of a shard set, one epoch per iteration.

    Training splits whole shards across ranks after the per-epoch shuffle (rank r takes
    order[r::world]). Every rank then runs the same number of batches, fixed for the whole run:
    each rank holds at least floor(S/W) of the S shards, so the floor(S/W) smallest shards'
    samples, divided by the batch size, is a count every rank reaches in every epoch. A rank
    holding more stops there; what it leaves differs each epoch, as the shuffle moves shards
    between ranks. Fewer shards than ranks is an error.

    Validation counts every sample exactly once with no padding: whole shards per rank when
    there are at least as many shards as ranks, otherwise every rank reads all shards and
    keeps the samples whose index is its rank modulo the world size. Batch counts may differ
    between ranks; evaluation has no collective until its final sums.
    """

    def __init__(self, spec: LoaderSpec):
        shards, train, world_size = spec.shards, spec.train, spec.world_size
        if train and len(shards.urls) < world_size:
            raise DataError(
                f"{shards.root}: {len(shards.urls)} shards for {world_size} ranks; every rank "
                "needs at least one shard (write more, smaller shards)"
            )
        self.spec = spec
        self.shards, self.train, self.batch_size = shards, train, spec.batch_size
        self.num_classes, self.in_chans = spec.num_classes, spec.in_chans
        self.transform, self.transform_at = transforms(spec)  # progressive resizing: per epoch
        self.device = torch.device(spec.device)
        self.out_dtype = spec.out_dtype  # the autocast dtype on a GPU (precision.input_dtype)
        self.memory_format = torch.channels_last if spec.channels_last else torch.contiguous_format
        self.num_workers, self.shuffle_buffer = spec.num_workers, spec.shuffle_buffer
        self.seed, self.rank, self.world_size = spec.seed, spec.rank, world_size
        self.repeats = spec.repeats if train else 1  # data.aug_repeats; see my_shards
        self.keys = spec.keys  # yield KeyedBatches (each sample's shard and key)
        self.epoch = 0
        self._done = self._skip = 0  # batches delivered this epoch; batches to replay
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

    @property
    def strided(self) -> bool:
        return not self.train and len(self.shards.urls) < self.world_size

    def my_shards(self, epoch: int) -> list[int]:
        """This rank's shards in `epoch`. Repeated augmentation (data.aug_repeats=N,
        torchvision's RASampler at shard granularity): each shard of the epoch's order N times
        in a row, cut to the order's length, dealt round-robin, so a shard's N copies go to N
        different ranks (N <= world size), each augmenting with its own seed. Every rank reads
        as many shards as without repeats; the epoch covers a different 1/N of the shards
        each epoch, as the order changes."""
        order = shard_order(self.shards, epoch, self.seed, shuffle=self.train)
        if self.repeats > 1:
            order = [i for i in order for _ in range(self.repeats)][: len(order)]
        return order if self.strided else order[self.rank :: self.world_size]

    def num_samples(self, epoch: int | None = None) -> int:
        """Samples this rank reads in the epoch (train: the guaranteed count, see above)."""
        if self.train:
            per_rank = len(self.shards.urls) // self.world_size
            return sum(sorted(self.shards.counts)[:per_rank])
        if self.strided:
            n, w = self.shards.num_samples, self.world_size
            return (n - self.rank + w - 1) // w
        ids = self.my_shards(self.epoch if epoch is None else epoch)
        return sum(self.shards.counts[i] for i in ids)

    def __len__(self) -> int:
        n = self.num_samples()
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def _chunks(self, refill: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[SampleKey]]]:
        """One pass over this rank's shards (refill > 0: a re-read with its own seed)."""
        seed = hash((self.seed, self.epoch, self.rank) + ((refill,) if refill else ()))
        if self.verify:  # in this process, which remembers what it checked (workers do not)
            for i in self.my_shards(self.epoch):
                self.shards.verify(i)
        transform = self.transform_at(self.epoch) if self.transform_at else self.transform
        stream = SampleStream(
            self.shards,
            self.my_shards(self.epoch),
            transform,
            self.shuffle_buffer if self.train else 0,
            seed,
            self.num_classes,
            self.in_chans,
            stride=(self.rank, self.world_size) if self.strided else (0, 1),
            skip_bad=self.skip_bad,
            encoder=Encoder(transform, self.in_chans) if self.stage else None,
            verify=self.verify,
        )
        workers = min(self.num_workers, len(stream.shard_ids))
        if self.shards.remote:
            self._fetch_first(stream.shard_ids, max(1, workers))
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
            generator=torch.Generator().manual_seed(seed & 0x7FFF_FFFF),
        )
        delivered = 0
        chunks = iter(loader)
        try:
            for images, labels, skipped, keys in chunks:
                self.skipped += skipped
                if images is not None:
                    delivered += len(labels)
                    yield images, labels, keys
        finally:
            # Workers ignore SIGTERM (_ignore_stop_signals), so one left waiting after an
            # error or an early stop would hang the interpreter's exit, which joins it; a
            # traceback kept alive (a logger, a test) would keep this iterator from freeing.
            getattr(chunks, "_shutdown_workers", lambda: None)()
        if delivered == 0 and self.train:
            raise DataError(
                f"{self.shards.root}: rank {self.rank} found no usable sample in "
                f"its shards this epoch ({self.skipped} skipped)"
            )

    def _fetch_first(self, ids: list[int], workers: int) -> None:
        """Start downloading this rank's shards of the epoch in the order its workers will
        read them, up to 16 at once, while the workers start: their shuffle buffers fill
        from the first few shards of each (a cold start waits for those alone). With a
        cache limit, only as many as it holds beside the ones being read; the workers
        fetch the rest data.prefetch ahead of themselves."""
        cache = self.shards.shard_cache()
        per_worker = [ids[w::workers] for w in range(workers)]
        order = [p[k] for k in range(max(map(len, per_worker))) for p in per_worker
                 if k < len(p)]  # fmt: skip
        if self.num_workers:
            # a command started from a thread while DataLoader forks its workers can hand
            # its exec-error pipe to a worker and never return: pipe: shards are fetched
            # ahead by the workers themselves, which fork nothing
            order = [i for i in order if not storage.is_pipe(self.shards.urls[i])]
        if cache.limit:
            biggest = max((self.shards.size(i) or 0 for i in ids), default=0) or 1
            order = order[: max(workers, cache.limit // biggest - workers)]
        self.shards.prefetch(order, self.verify, threads=min(16, len(order)))

    def _all_chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[SampleKey]]]:
        yield from self._chunks(0)
        if self.train:
            # Only reached when skipped samples left this rank short of the step count every
            # rank agreed on: re-read its shards (fresh order and augmentation) rather than
            # run fewer steps, which would leave the other ranks waiting in an all-reduce.
            for refill in itertools.count(1):
                yield from self._chunks(refill)

    def __iter__(self) -> Iterator[Batch]:
        # Training stops at len(self) steps even if a rank could read more (every rank runs
        # the same number of steps); validation reads everything.
        skip, self._skip = self._skip, 0
        # The order and the augmentation are functions of (seed, epoch, rank), so replaying
        # the first `skip` batches on the host resumes the stream exactly where it stopped.
        self._done = skip
        if self.stage is not None:
            chunks = (unpack(x, y, keys) for x, y, keys in self._all_chunks())
            batches = (
                EncodedBatch(*b)
                for b in rebatch(chunks, self.batch_size, self.train, pin=self.pin_batches)
            )
            # replayed batches are read and their geometry drawn, but never decoded
            for batch in self.stage(itertools.islice(batches, skip, len(self))):
                self._done += 1
                self.skipped += self.stage.take_skipped()
                yield batch if self.keys else Batch(batch.images, batch.labels)
            return
        batches = rebatch(
            self._all_chunks(), self.batch_size, drop_last=self.train, pin=self.pin_batches
        )
        for images, labels, keys in itertools.islice(batches, skip, len(self)):
            self._done += 1
            batch = self._to_device(images, labels)
            yield KeyedBatch(*batch, keys) if self.keys else batch

    def resume_from_ranks(
        self, epoch: int, states: list[dict], micro_batch: int, world_size: int
    ) -> int:
        """Continue `epoch` after another world size stopped in it; returns this rank's
        batches left in the epoch.

        This backend hands whole shards to ranks and interleaves its workers, so which samples
        an old rank had consumed is not a prefix of anything this world size reads. Every
        rank skips the same fraction of its new part as the old ranks had consumed of theirs;
        the samples repeated plus those skipped are bounded by that fraction of the epoch
        (data.backend=dali bounds them by its shuffle window instead).
        """
        old_total = sum(sorted(self.shards.counts)[: len(self.shards.urls) // world_size])
        consumed = max(s["batches"] for s in states) * micro_batch
        self.epoch = epoch
        skip = min(len(self), round(len(self) * consumed / max(1, old_total)))
        self._skip = skip
        return len(self) - skip

    def close(self) -> None:
        """Nothing to release between epochs: workers live for one epoch's iteration."""

    def state_dict(self) -> dict:
        """The data position: the epoch and the batches already delivered in it."""
        return {"epoch": self.epoch, "batches": self._done}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self._skip = state["epoch"], state["batches"]

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
