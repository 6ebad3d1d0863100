"""One rank's samples for the torch input pipeline, in a DataLoader worker: webdataset tar
reading, decoding, labels and each sample's key, the per-worker seed, and the hand-over in
small chunks (data/torch/loader.py cuts them into batches)."""

from __future__ import annotations

import contextlib
import io
import itertools
import random
import re
import tarfile
from collections.abc import Callable, Iterator

import torch
import webdataset as wds
from PIL import Image, UnidentifiedImageError
from torch.utils.data import IterableDataset, get_worker_info
from torchvision.transforms import v2

from distres.data.api import BadSamples, DataError, SampleKey, parse_label
from distres.data.shards.read import ShardSet
from distres.data.shards.storage import RemoteError
from distres.data.torch.encode import pack
from distres.data.torch.transforms import decode_jpeg
from distres.errors import DistresError

CHUNK = 32  # samples per worker->main hand-over; amortises IPC without holding back a batch


class SampleStream(IterableDataset):
    """Decoded, augmented samples of this rank's shards, split further across workers."""

    def __init__(
        self,
        shards: ShardSet,
        shard_ids: list[int],
        transform: Callable,
        shuffle_buffer: int,
        seed: int,
        num_classes: int,
        in_chans: int,
        stride: tuple[int, int] = (0, 1),
        skip_bad: bool = False,
        encoder: Callable | None = None,
        verify: bool = False,
    ):
        self.shards, self.shard_ids = shards, shard_ids
        self.verify = verify  # data.verify_checksums: remote shards checked as downloaded
        self.encoder = encoder  # data.decode=gpu: bytes + geometry instead of pixels
        self.bad = BadSamples(skip_bad)
        # (rank, world): keep only the samples whose global index is rank mod world.
        self.stride = stride
        starts = itertools.accumulate((0, *shards.counts))
        self.offsets = dict(zip(shards.urls, starts, strict=False))
        self.transform, self.shuffle_buffer = transform, shuffle_buffer
        self.seed, self.num_classes = seed, num_classes
        self.mode = "RGB" if in_chans == 3 else "L"
        self.read_mode = "RGB" if in_chans == 3 else "GRAY"
        self.draft_size = getattr(transform, "draft_size", None)

    def __iter__(self) -> Iterator[tuple]:  # (items, labels, skipped, keys) chunks
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        seed = hash((self.seed, worker)) & 0x7FFF_FFFF
        # NOTE: v2 transforms draw from torch's global RNG; seeding it here makes the
        # augmentation a function of (seed, epoch, rank, worker). In the main process
        # (num_workers=0) that RNG is also the model's (stochastic depth, dropout), so the
        # stream keeps its own state and swaps it in around each sample: the model's draws
        # stay where a checkpoint restores them, and a replay on resume draws the same.
        rng = StreamRng(seed) if info is None else None
        if rng is None:
            torch.manual_seed(seed)
        samples = self._read(self.shard_ids[worker::workers])
        if self.stride[1] > 1:
            samples = self._strided(samples)
        if self.shuffle_buffer > 1:
            samples = wds.filters._shuffle(
                samples,
                bufsize=self.shuffle_buffer,
                initial=self.shuffle_buffer,
                rng=random.Random(seed),
            )
        # Chunks are (images, labels, samples skipped since the last chunk, sample keys);
        # images is None for a chunk that only carries a skip count. With an encoder "images"
        # is the GPU-decode stage's packed bytes and geometry (gpu_decode.pack).
        items, labels, keys = [], [], []
        for sample in samples:
            try:
                with rng or contextlib.nullcontext():
                    item = self._item(sample)
                label = self._label(sample)
            except DataError as e:
                self.bad(e)
                continue
            items.append(item)
            labels.append(label)
            keys.append(SampleKey(sample["__shard__"], sample["__at__"], sample["__key__"]))
            if len(items) == CHUNK:
                yield self._chunk(items), torch.tensor(labels), self.bad.take(), keys
                items, labels, keys = [], [], []
        if items:
            yield self._chunk(items), torch.tensor(labels), self.bad.take(), keys
        elif self.bad.count:
            yield None, None, self.bad.take(), None

    def _read(self, shard_ids: list[int]) -> Iterator[dict]:
        """Samples of each tar in turn, each with its shard index and ordinal in the tar
        (__shard__, __at__); a tar that breaks off (truncated, unreadable) ends with a
        DataError naming it, or, when skipping, is counted as one bad item. A remote shard
        is read from the node-local cache, the next `prefetch` ones fetched meanwhile; one
        that cannot be fetched within the retry budget is an error naming it, or, when
        skipping, all its samples are counted as skipped."""
        ahead = self.shards.shard_cache().prefetch if self.shards.remote else 0
        for n, i in enumerate(shard_ids):
            url = self.shards.urls[i]
            if ahead:
                self.shards.prefetch(shard_ids[n + 1 : n + 1 + ahead], self.verify)
            try:
                with self.shards.local(i, self.verify) as path, open(path, "rb") as f:
                    for at, sample in enumerate(tar_samples(f, url)):
                        sample["__shard__"], sample["__at__"] = i, at
                        yield sample
            except RemoteError as e:
                where = f"shard {i} of {self.shards.root}"
                self.bad(DataError(f"{e} ({where})"), count=self._share(i))
            except DistresError:  # a bad sample (already judged) or a cache write that failed
                raise
            except Exception as e:  # tarfile/webdataset raise several types for a bad tar
                self.bad(DataError(f"{url}: unreadable tar ({type(e).__name__}: {e})"))

    def _share(self, i: int) -> int:
        """The samples of shard i this reader would have kept."""
        rank, world = self.stride
        start = self.offsets[self.shards.urls[i]]
        return len(range((rank - start) % world, self.shards.counts[i], world))

    def _strided(self, samples: Iterator[dict]) -> Iterator[dict]:
        rank, world = self.stride
        for sample in samples:
            if (self.offsets[sample["__url__"]] + sample["__at__"]) % world == rank:
                yield sample

    def _where(self, sample: dict) -> str:
        return f"{sample.get('__url__', '?')}: sample {sample.get('__key__', '?')!r}"

    def _chunk(self, items: list) -> torch.Tensor | tuple:
        return torch.stack(items) if self.encoder is None else pack(items)

    def _item(self, sample: dict) -> torch.Tensor | tuple:
        data = sample.get("jpg") or sample.get("jpeg") or sample.get("png")
        if data is None:
            raise DataError(f"{self._where(sample)}: no .jpg/.jpeg/.png member")
        if self.encoder is not None:
            return (*self.encoder(data, self._where(sample)), self._where(sample))
        try:
            img = Image.open(io.BytesIO(data))  # reads the header only
            if img.format == "JPEG" and not self._draft_helps(img.size):
                # torchcodec (libjpeg-turbo) into a uint8 tensor, then the geometry on the
                # tensor: 1.7x faster per image than PIL decode + PIL resize
                # (docs/performance.md).
                image = decode_jpeg(data, mode=self.read_mode)
            else:
                if self.draft_size and img.format == "JPEG":
                    # DCT-domain downscaling by 2, 4 or 8, never below the requested size
                    img.draft(self.mode, (self.draft_size, self.draft_size))
                img = img.convert(self.mode) if img.mode != self.mode else img
                img.load()
                image = v2.functional.pil_to_tensor(img)
        except (OSError, UnidentifiedImageError, SyntaxError, RuntimeError) as e:
            raise DataError(f"{self._where(sample)}: cannot decode image ({e})") from None
        # HWC chunks: the batch is then channels_last with no transpose in the main process.
        return self.transform(image).permute(1, 2, 0)

    def _draft_helps(self, size: tuple[int, int]) -> bool:
        return bool(self.draft_size) and min(size) >= 2 * self.draft_size

    def _label(self, sample: dict) -> int:
        raw = sample.get("cls")
        if raw is None:
            raise DataError(f"{self._where(sample)}: no .cls member")
        return parse_label(raw, self._where(sample), self.num_classes)


def tar_samples(f, url: str, start: int = 0) -> Iterator[dict]:
    """webdataset's samples of an open tar (its tarfile_samples without its opener): the
    same grouping by key, `__url__` the shard's own URL wherever the bytes came from.
    start > 0: from the tar's start-th sample, found by reading headers only (tarfile seeks
    over the members' data), where the file can seek."""
    if start and f.seekable():
        at = _sample_offset(f, start)
        if at is None:
            return iter(())
        f.seek(at)
    files = wds.tariterators.tar_file_expander([{"url": url, "stream": f}])
    samples = wds.tariterators.group_by_keys(files)
    if start and not f.seekable():
        samples = itertools.islice(samples, start, None)
    return samples


def _sample_offset(f, start: int) -> int | None:
    """The byte offset of the header of the start-th sample's first member (None: the tar
    has fewer samples), counted the way webdataset groups members into samples."""
    key, n = None, -1
    with tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
            name = member.name
            if not member.isreg() or _skipped(name):
                continue
            prefix, _ = wds.tariterators.base_plus_ext(name)
            if prefix is None or prefix == key:
                continue
            key, n = prefix, n + 1
            if n == start:
                return member.offset  # absolute: tarfile counts from where f stood
    return None


def _skipped(name: str) -> bool:
    # tar_file_iterator's rules: metadata files (__*__) are not members of any sample
    return ("/" not in name and name.startswith("__") and name.endswith("__")) or bool(
        re.match(r"__[^/]*__($|/)", name)
    )


class StreamRng:
    """A stream's own state of torch's global CPU generator, swapped in while it draws."""

    def __init__(self, seed: int):
        self.state = torch.Generator().manual_seed(seed).get_state()
        self.outer: torch.Tensor | None = None

    def __enter__(self) -> None:
        self.outer = torch.get_rng_state()
        torch.set_rng_state(self.state)

    def __exit__(self, *exc) -> None:
        self.state = torch.get_rng_state()
        torch.set_rng_state(self.outer)
