"""The DALI input pipeline over WebDataset shards (`data.backend=dali`).

`fn.readers.webdataset` reads the tars through their DALI index files; decoding and
augmentation are `dali_graph.image_graph`, on the GPU or on the CPU (`device_id=None`).

Epoch accounting is derived here, never configured: the pipeline is rebuilt each epoch with the
shards in that epoch's order (a seed every rank shares; DALI's own shuffle only mixes within
its buffer), and the reader splits the samples into `world_size` contiguous parts. Training
runs floor(floor(N / W) / batch) batches on every rank, the count the smallest part reaches;
validation pads the last batch (`pad_last_batch`) and trims the padding away, so each sample
counts once. The data position is DALI's pipeline checkpoint plus the batch count.
"""

from __future__ import annotations

import base64
import math
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import torch

from distres.data.api import BadSamples, Batch, DataError, KeyedBatch, parse_label, shard_order
from distres.data.buffers import HeldOutputs
from distres.data.dali.index import (
    checked_indexes,
    first_undecodable,
    pipeline_failure,
    repeated_indexes,
    sample_key,
    sample_where,
    unconsumed_indexes,
    verify_part,
)
from distres.data.spec import LoaderSpec

PREFETCH = 2  # batches DALI works ahead of the consumer
HALF = (torch.float16, torch.bfloat16)


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


class DaliLoader:
    """Batches of one rank's part of a shard set, one epoch per iteration; see the module doc."""

    def __init__(self, spec: LoaderSpec):
        # DALI's readers open files: remote shards are read from the node-local cache
        shards, train, batch_size = spec.shards.localized(spec.verify), spec.train, spec.batch_size
        image_size, num_classes, in_chans = spec.image_size, spec.num_classes, spec.in_chans
        mean, std, skip_bad, verify = spec.mean, spec.std, spec.skip_bad, spec.verify
        self.spec = spec
        self.shards, self.train, self.batch_size = shards, train, batch_size
        # yield KeyedBatches: each sample's key from DALI's source_info, its shard's index
        self.keys = {url: i for i, url in enumerate(shards.urls)} if spec.keys else None
        self.image_size, self.num_classes, self.in_chans = image_size, num_classes, in_chans
        # progressive resizing: the crop size of each epoch (every epoch builds its pipeline)
        self.size_at = spec.size_at
        self.device = torch.device(spec.device)
        self.out_dtype, self.channels_last = spec.out_dtype, spec.channels_last
        self.rrc, self.rrc_min_scale = spec.random_resized_crop, spec.rrc_min_scale
        self.crop_padding, self.hflip, self.val_resize = (
            spec.crop_padding,
            spec.hflip,
            spec.val_resize,
        )
        self.shuffle_buffer, self.seed = spec.shuffle_buffer, spec.seed
        self.auto_augment = spec.auto_augment  # (data.auto_augment, ra_magnitude, ra_num_ops)
        self.repeats = spec.repeats if train else 1  # data.aug_repeats; see _sequence
        self._repeat_dir: tempfile.TemporaryDirectory | None = None
        self._repeated: dict[int, tuple[list[str], list[str], int]] = {}
        self.threads = spec.threads or max(1, torch.get_num_threads())  # see build.dali_threads
        self.epochs = spec.epochs  # no pipeline is prefetched for an epoch past the last
        self.rank, self.world_size = spec.rank, spec.world_size
        self.mean = [m * 255 for m in mean] * (in_chans if len(mean) == 1 else 1)
        self.std = [s * 255 for s in std] * (in_chans if len(std) == 1 else 1)
        self.bad = BadSamples(skip_bad)
        self.epoch, self._done, self._pipe, self._held = 0, 0, None, HeldOutputs()
        self._resume: tuple[int, str] | None = None  # (batches done, DALI checkpoint)
        self._next: tuple[int, object] | None = None  # (epoch, pipeline already prefetching)
        self._defining: tuple[int, Future] | None = None  # (epoch, pipeline being defined)
        self._stopped: dict | None = None  # the position an abandoned epoch had reached
        # (epoch, shard paths, index paths, samples): the rest of an epoch resumed on another
        # world size; see resume_from_ranks
        self._subset: tuple[int, list[str], list[str], int] | None = None
        self._subset_dir: tempfile.TemporaryDirectory | None = None
        self.verify = verify
        # Index files checked before DALI reads them: bad samples are reported (and, with
        # skip, left out of the index files DALI gets); counts follow what DALI will read.
        self._filtered_dir: tempfile.TemporaryDirectory | None = None
        self.index_paths, self.counts = self._checked_indexes()

    # -- accounting -----------------------------------------------------------------------
    def part(self, rank: int | None = None) -> tuple[int, int]:
        """[start, end) of the samples DALI's reader gives this rank (its sharding rule) in
        this epoch's sequence."""
        r = self.rank if rank is None else rank
        n, w = self._sequence()[2], self.world_size
        return n * r // w, n * (r + 1) // w

    def num_samples(self, epoch: int | None = None) -> int:
        if self.train:
            return self._sequence(epoch)[2] // self.world_size
        start, end = self.part()
        return end - start

    def __len__(self) -> int:
        n = self.num_samples()
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    # -- the pipeline ---------------------------------------------------------------------
    def _build(self, checkpoint: str | None = None):
        if not checkpoint:
            pipe = self._pipeline()
            pipe.build()
            return pipe
        try:
            pipe = self._pipeline(checkpoint)
            pipe.build()
        except RuntimeError as e:
            first = next((x.strip() for x in str(e).splitlines() if x.strip()), "RuntimeError")
            raise DataError(
                f"rank {self.rank}'s saved DALI position does not restore ({first}); "
                "resume from another checkpoint (checkpoint.resume=PATH)"
            ) from None
        return pipe

    def _pipeline(self, checkpoint: str | None = None, epoch: int | None = None):
        """An epoch's pipeline (this one's by default), defined but not built (a test
        inspects the GPU graph on a machine without one)."""
        from nvidia.dali import types

        from distres.data.dali.graph import epoch_pipeline

        gpu = self.device.type == "cuda"
        epoch = self.epoch if epoch is None else epoch
        paths, index_paths, n = self._sequence(epoch)
        w, r = self.world_size, self.rank
        if self.verify:  # the shards overlapping this rank's part
            verify_part(self.shards, paths, self.counts, n * r // w, n * (r + 1) // w)
        return epoch_pipeline(
            paths,
            index_paths,
            checkpoint=checkpoint,
            batch_size=self.batch_size,
            threads=self.threads,
            device_id=(self.device.index or 0) if gpu else None,
            seed=hash((self.seed, epoch, r)) & 0x7FFF_FFFF,
            rank=r,
            world_size=w,
            train=self.train,
            initial_fill=min(self.shuffle_buffer, 1024),
            prefetch=PREFETCH,
            decoder="mixed" if gpu else "cpu",
            color=types.RGB if self.in_chans == 3 else types.GRAY,
            size=self.size_at(epoch) if self.size_at else self.image_size,
            rrc_min_scale=self.rrc_min_scale if self.rrc else None,
            crop_padding=self.crop_padding,
            hflip=self.hflip,
            val_resize=self.val_resize,
            aug=self.auto_augment,
            mean=self.mean,
            std=self.std,
            # DALI has no bfloat16: half precision out, cast on the device (_to_batch)
            dtype=types.FLOAT16 if self.out_dtype in HALF else types.FLOAT,
        )

    def __iter__(self) -> Iterator[Batch]:
        resume, self._resume = self._resume, None
        self._stopped = None
        done, checkpoint = resume if resume else (0, None)
        pipe, self._next = self._next, None
        if pipe is not None and pipe[0] == self.epoch and not checkpoint:
            fresh = False  # built and prefetching since the last epoch's end
        else:
            pipe, fresh = (self.epoch, self._build(checkpoint)), True
        self._pipe = pipe = pipe[1]
        self._done = done
        total, remaining = len(self), self.num_samples() - done * self.batch_size
        # NOTE: the scheduled API rather than run(): run() keeps PREFETCH batches in flight
        # past the end of the epoch, work that is thrown away with the pipeline. Scheduling
        # stops at the epoch's last batch, and the next epoch's pipeline (a new shard order
        # needs a new reader) is built and starts prefetching then, so the epoch boundary
        # costs no stall. Neither changes a sample: the next pipeline is exactly the one a
        # fresh __iter__ would build.
        more = self.train and (self.epochs is None or self.epoch + 1 < self.epochs)
        if more and (self._defining is None or self._defining[0] != self.epoch + 1):
            self._define_next(self.epoch + 1)
        try:
            scheduled = done + PREFETCH
            while self._done < total:
                if fresh:
                    pipe.schedule_run()  # the first call prefetches PREFETCH runs
                    fresh = False
                elif self._done > done and scheduled < total:
                    pipe.schedule_run()
                    scheduled += 1
                if scheduled >= total and self._next is None and more:
                    self._next = (self.epoch + 1, self._prefetched(self.epoch + 1))
                images, labels, where = self._outputs(pipe)
                batch = self._to_batch(images, labels, where, keep=min(self.batch_size, remaining))
                self._done += 1
                remaining -= self.batch_size
                yield batch
        finally:
            # The caller may stop mid-epoch (a stop, max_steps) and checkpoint afterwards:
            # keep the position the pipeline had reached before it goes (close() has kept it
            # when it released the pipeline under a suspended iteration).
            if self._done < total and self._pipe is not None:
                self._stopped = self._position()
            self._pipe = None

    def close(self) -> None:
        """Release the pipelines (their GPU memory and threads) now rather than at exit: the
        one prefetched for the next epoch, and the outputs still held for the consumer. Closed
        mid-epoch, the position reached stays the loader's state_dict()."""
        self._next = self._defining = None
        if self._pipe is not None:  # an iteration not run to its end
            try:
                self._stopped = self._position()
            except Exception as e:  # a pipeline in an error state: the error is the caller's
                self._stopped = {"epoch": self.epoch, "error": e}
        self._pipe = None
        self._held.clear()

    def _epoch_files(self) -> tuple[list[str], list[str]]:
        """The shards and index files the reader takes this epoch, in its order."""
        paths, index_paths, _ = self._sequence()
        return paths, index_paths

    def _sequence(self, epoch: int | None = None) -> tuple[list[str], list[str], int]:
        """The epoch's sample sequence, which the reader cuts into one contiguous part per
        rank: (shards, index files, samples); with data.aug_repeats, see repeated_indexes."""
        epoch = self.epoch if epoch is None else epoch
        if self._subset is not None and self._subset[0] == epoch:
            _, paths, index_paths, total = self._subset
            return paths, index_paths, total
        order = shard_order(self.shards, epoch, self.seed, shuffle=self.train)
        order = [i for i in order if self.counts[i]]  # a shard left with no sample
        paths = [self.shards.urls[i] for i in order]
        index_paths = [self.index_paths[i] for i in order]
        n = sum(self.counts)
        if self.repeats == 1:
            return paths, index_paths, n
        if epoch not in self._repeated:
            if self._repeat_dir is None:
                self._repeat_dir = tempfile.TemporaryDirectory(prefix="distres-repeat-idx-")
            out = Path(self._repeat_dir.name) / f"epoch-{epoch}"
            # this epoch's and the previous one's (a prefetched pipeline) are kept
            self._repeated = {e: v for e, v in self._repeated.items() if e >= epoch - 1}
            self._repeated[epoch] = repeated_indexes(paths, index_paths, n, self.repeats, out)
        return self._repeated[epoch]

    def _define_next(self, epoch: int) -> None:
        """Define `epoch`'s pipeline in a background thread while this epoch runs. Defining
        traces the graph in Python: 1-7 s with an auto-augmentation (DALI's conditionals
        convert each operator's branch), which would otherwise stall every epoch's end.
        DALI keeps its tracing state per thread. A daemon thread: a live non-daemon one
        would make the process's exit wait for Python's teardown (distres.log.exit_process)."""
        future: Future = Future()

        def define() -> None:
            try:
                future.set_result(self._pipeline(None, epoch))
            except BaseException as e:  # raised where the pipeline is wanted
                future.set_exception(e)

        threading.Thread(target=define, name="distres-dali-define", daemon=True).start()
        self._defining = (epoch, future)

    def _prefetched(self, epoch: int):
        defining, self._defining = self._defining, None
        if defining is not None and defining[0] == epoch:
            pipe = defining[1].result()
        else:
            pipe = self._pipeline(None, epoch)
        pipe.build()
        pipe.schedule_run()
        return pipe

    def _outputs(self, pipe):
        try:
            return pipe.outputs()
        except RuntimeError as e:
            # DALI's error names neither shard nor key: look among the samples DALI may have
            # drawn the failed batch from (its shuffle window around this rank's position)
            start, _ = self.part()
            window = min(self.shuffle_buffer, 1024) if self.train else 0
            lo = start + self._done * self.batch_size - window
            hi = start + (self._done + PREFETCH + 1) * self.batch_size + window
            near = lambda: first_undecodable(*self._epoch_files(), lo, hi)  # noqa: E731
            where = f"epoch {self.epoch} batch {self._done}"
            raise pipeline_failure(e, where, self.shards.root, near) from None

    @property
    def skipped(self) -> int:
        """Bad samples reported and left out so far (data.on_bad_sample=skip)."""
        return self.bad.count

    @skipped.setter
    def skipped(self, count: int) -> None:
        self.bad.count = count

    # -- index files ----------------------------------------------------------------------
    def _checked_indexes(self) -> tuple[list[str], list[int]]:
        """Each shard's DALI index, checked: every sample has an image and a .cls and lies
        inside the tar. A bad sample stops the run (error) or is reported, counted and left
        out of a filtered copy of the index (skip)."""
        if self._filtered_dir is None:
            self._filtered_dir = tempfile.TemporaryDirectory(prefix="distres-idx-")
        # every rank checks every index; one reports and counts
        return checked_indexes(
            self.shards, Path(self._filtered_dir.name), lambda e: self.bad(e, self.rank == 0)
        )

    def _to_batch(self, images, labels, where, keep: int) -> Batch:
        # The dynamic executor hands out reference-counted buffers: zero copy, on the GPU
        # too (77 MB a step at batch 256 that feed_ndarray copied). On the GPU, __dlpack__
        # makes torch's current stream wait for DALI's, and _held keeps DALI's buffer until
        # the kernels torch queued on it have run.
        dense = images.as_tensor()
        x = torch.from_dlpack(dense)
        if self.device.type == "cuda":
            self._held.add(dense, x)
        x = x[:keep].permute(0, 3, 1, 2)  # NHWC memory seen as NCHW: channels_last strides
        good, ys = [], []
        for i in range(keep):
            try:
                ys.append(self._label(labels[i], where[i]))
                good.append(i)
            except DataError as e:
                self.bad(e)
        if len(good) < keep:
            # NOTE: DALI decodes a batch as a whole, so skipping covers label problems only
            # (a bad image fails the batch); the batch shrinks by the skipped samples.
            x = x.index_select(0, self._to_device(torch.tensor(good, dtype=torch.int64)))
        if x.dtype != self.out_dtype:
            x = x.to(self.out_dtype)  # keeps the channels_last strides
        if not self.channels_last:
            x = x.contiguous()
        y = self._to_device(torch.tensor(ys, dtype=torch.int64))
        if self.keys is not None:
            return KeyedBatch(x, y, [sample_key(where[i], self.keys) for i in good])
        return Batch(x, y)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A small host tensor to the device without a host sync (pinned, non-blocking)."""
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def _label(self, raw, where) -> int:
        return parse_label(bytes(np.asarray(raw)), sample_where(where), self.num_classes)

    def resume_from_ranks(
        self, epoch: int, states: list[dict], micro_batch: int, world_size: int
    ) -> int:
        """Continue `epoch` after another world size stopped in it: the rest of the epoch is
        the samples no old rank had consumed, split over this world size. Returns this rank's
        batches left in the epoch.

        Old rank r read its contiguous part of the epoch's sample sequence and had delivered
        states[r]["batches"] x micro_batch samples; those are taken to be the first ones of its
        part. DALI's shuffle draws them from a window of initial_fill samples ahead, so up to
        initial_fill (1,024 at most) samples per old rank are repeated and as many skipped.
        The rest is exact: index files listing only the unconsumed samples feed the reader.
        """
        self.epoch, self._subset = epoch, None
        urls, indexes, n = self._sequence(epoch)
        consumed = []
        for r, state in enumerate(states):
            start, end = n * r // world_size, n * (r + 1) // world_size
            consumed.append((start, min(end, start + state["batches"] * micro_batch)))
        self._subset_dir = tempfile.TemporaryDirectory(prefix="distres-resume-idx-")
        paths, index_paths, total = unconsumed_indexes(
            urls, indexes, consumed, Path(self._subset_dir.name)
        )
        self._subset = (epoch, paths, index_paths, total)
        self._resume, self._next, self._defining = None, None, None
        return len(self)

    # -- data position ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The position mid-epoch: epoch, batches delivered, and DALI's pipeline checkpoint
        (reader position, shuffle buffer and RNG state after the last delivered batch)."""
        if self._pipe is not None:
            return self._position()
        if self._stopped is not None and self._stopped["epoch"] == self.epoch:
            if "error" in self._stopped:  # close() could not take the position
                raise self._stopped["error"]
            return self._stopped
        return {"epoch": self.epoch, "batches": 0, "dali": None}

    def _position(self) -> dict:
        # DALI's checkpoint is a serialized protobuf: base64 keeps the state JSON.
        dali_state = base64.b64encode(self._pipe.checkpoint()).decode("ascii")
        return {"epoch": self.epoch, "batches": self._done, "dali": dali_state}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        dali_state = state["dali"]
        if isinstance(dali_state, str):
            dali_state = base64.b64decode(dali_state)
        self._resume = (state["batches"], dali_state) if dali_state else None
