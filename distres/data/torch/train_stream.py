"""One rank's training samples from its canonical streams (data/torch/order.py), in a
DataLoader worker: each worker reads its share of the rank's streams, a window at a time in
tar order, and hands its samples over in the rank's position order, CHUNK at a time.

Worker w of K takes the rank's streams w, w+K, ... (K divides their count), so its t-th
sample is the rank's sample t*K + w: the main process puts the K workers' chunks back in
position order by interleaving them (loader.py). Every chunk holds exactly CHUNK good
samples; a bad one is replaced by the same stream's next, and the slot of every sample
handed over travels with it (the data position is each stream's next slot).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import torch
from torch.utils.data import get_worker_info

from distres.data.api import DataError, SampleKey
from distres.data.shards.storage import RemoteError
from distres.data.torch.order import EpochOrder
from distres.data.torch.stream import CHUNK, SampleStream, tar_samples
from distres.errors import DistresError


class CanonicalStream(SampleStream):
    """The rank's streams (`streams`, in position order) from their slots in `starts`, for
    `total` samples (the rest of the rank's epoch: a worker never decodes past it)."""

    def __init__(self, order: EpochOrder, streams: list[int], starts: dict[int, int],
                 total: int, *args, **kwargs):  # fmt: skip
        super().__init__(*args, **kwargs)
        self.order, self.streams, self.starts, self.total = order, streams, starts, total

    def __iter__(self) -> Iterator[tuple]:  # (items, labels, skipped, keys, positions)
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # in the main process torch's generator is also the model's: each sample's draws
        # happen on its own seed and the model's state is put back after them
        restore = info is None
        mine = self.streams[worker::workers]
        left = len(range(worker, self.total, workers))  # the rank's samples w, w+K, ...
        if not mine or not left:
            return
        with contextlib.ExitStack() as files:
            readers = [self._slots(s, self.starts.get(s, 0), files) for s in mine]
            items, labels, keys, where = [], [], [], []
            turns = itertools.cycle(zip(mine, readers, strict=True))
            for s, reader in itertools.islice(turns, left):
                slot, sample, item, label = self._good(s, reader, restore)
                items.append(item)
                labels.append(label)
                keys.append(SampleKey(sample["__shard__"], sample["__at__"],
                                      sample["__key__"]))  # fmt: skip
                where.append((s, slot))
                if len(items) == CHUNK:
                    yield self._pack(items, labels, keys, where)
                    items, labels, keys, where = [], [], [], []
            if items:
                yield self._pack(items, labels, keys, where)

    def _pack(self, items: list, labels: list, keys: list, where: list) -> tuple:
        return (self._chunk(items), torch.tensor(labels), self.bad.take(), keys,
                torch.tensor(where, dtype=torch.int64))  # fmt: skip

    def _good(self, s: int, reader: Iterator, restore: bool) -> tuple:
        """Stream s's next good sample: (slot, sample, item, label)."""
        for misses, (slot, sample) in enumerate(reader):
            if sample is not None:
                try:
                    with _seeded(self.order.sample_seed(s, slot), restore):
                        item = self._item(sample)
                    return slot, sample, item, self._label(sample)
                except DataError as e:
                    self.bad(e)
            if misses >= self.order.length:  # a whole pass, nothing usable: no refill helps
                shards = sorted({i for i, _, _ in self.order.pieces(*self.order.range(s))})
                raise DataError(
                    f"{self.shards.root}: no usable sample in shard(s) "
                    f"{', '.join(self.shards.urls[i] for i in shards[:4])}"
                    f"{' ...' if len(shards) > 4 else ''} (stream {s} of the epoch's order)"
                )
        raise AssertionError("a stream's slots never end")

    def _slots(self, s: int, start: int, files: contextlib.ExitStack) -> Iterator[tuple]:
        """(slot, raw sample or None where it could not be read) from slot `start` on."""
        o = self.order
        lo, hi = o.range(s)
        refill, j = divmod(start, o.length)
        cursor = _Cursor(self, files, o.shards_from(s, 0))
        while True:
            for k in range(j // o.window, o.windows(s)):
                a = lo + k * o.window
                window = cursor.read(o.pieces(a, min(a + o.window, hi)))
                perm = o.permutation(s, refill, k)
                base = refill * o.length + k * o.window
                for n in range(j - k * o.window if k == j // o.window else 0, len(perm)):
                    yield base + n, window[perm[n]]
            refill, j = refill + 1, 0


class _Cursor:
    """A stream's open tar: consecutive windows in one shard read on without reopening it;
    the stream's next shards are fetched ahead (remote shard sets)."""

    def __init__(self, stream: SampleStream, files: contextlib.ExitStack, shard_ids: list[int]):
        self.stream, self.shard_ids = stream, shard_ids
        self.ahead = stream.shards.shard_cache().prefetch if stream.shards.remote else 0
        self.at: tuple[int, int] | None = None  # (shard, next sample) of `samples`
        self.samples: Iterator[dict] | None = None
        self.scope: contextlib.ExitStack | None = None
        files.callback(self._close)

    def read(self, pieces: list[tuple[int, int, int]]) -> list[dict | None]:
        out: list[dict | None] = []
        for shard, first, last in pieces:
            out += self._piece(shard, first, last)
        return out

    def _piece(self, i: int, first: int, last: int) -> list[dict | None]:
        st = self.stream
        url = st.shards.urls[i]
        try:
            if self.at != (i, first):
                self._open(i, first)
            got = []
            for sample in self.samples:
                sample["__shard__"], sample["__at__"] = i, first + len(got)
                got.append(sample)
                if len(got) == last - first:
                    break
            self.at = (i, first + len(got))
            if len(got) < last - first:
                short = DataError(f"{url}: {first + len(got)} samples, the manifest counts "
                                  f"{st.shards.counts[i]}")  # fmt: skip
                st.bad(short, count=last - first - len(got))
            return got + [None] * (last - first - len(got))
        except RemoteError as e:
            st.bad(DataError(f"{e} (shard {i} of {st.shards.root})"), count=last - first)
        except DistresError:
            raise
        except Exception as e:  # tarfile/webdataset raise several types for a bad tar
            st.bad(DataError(f"{url}: unreadable tar ({type(e).__name__}: {e})"),
                   count=last - first)  # fmt: skip
        self._close()
        return [None] * (last - first)

    def _open(self, i: int, first: int) -> None:
        st = self.stream
        self._close()
        if self.ahead and i in self.shard_ids:
            n = self.shard_ids.index(i)
            st.shards.prefetch(self.shard_ids[n + 1 : n + 1 + self.ahead], st.verify)
        self.scope = contextlib.ExitStack()
        path = self.scope.enter_context(st.shards.local(i, st.verify))
        f = self.scope.enter_context(open(path, "rb"))  # noqa: SIM115 (the scope closes it)
        self.samples, self.at = tar_samples(f, st.shards.urls[i], first), (i, first)

    def _close(self) -> None:
        if self.scope is not None:
            self.scope.close()
        self.scope, self.samples, self.at = None, None, None


@contextlib.contextmanager
def _seeded(seed: int, restore: bool):
    """torch's CPU generator (what torchvision v2 draws from) seeded for one sample; the
    CUDA generators are left alone (torch.manual_seed would reseed them too)."""
    gen = torch.default_generator
    outer = gen.get_state() if restore else None
    gen.manual_seed(seed)
    try:
        yield
    finally:
        if outer is not None:
            gen.set_state(outer)


def interleave(chunks: list[tuple]) -> tuple:
    """K workers' chunks as one, sample by sample (worker w's t-th sample is the rank's
    t*K + w-th): tensors stacked and transposed, lists zipped. The epoch's last chunks may
    be shorter, the later workers' by one."""
    if len(chunks) == 1:
        return chunks[0]
    sizes = [len(c[1]) for c in chunks]  # column 1: the labels
    if len(set(sizes)) > 1:
        order = [(w, t) for t in range(max(sizes)) for w in range(len(chunks)) if t < sizes[w]]
        return tuple(
            torch.stack([column[w][t] for w, t in order])
            if isinstance(column[0], torch.Tensor)
            else [column[w][t] for w, t in order]
            for column in zip(*chunks, strict=True)
        )
    out = []
    for column in zip(*chunks, strict=True):
        if isinstance(column[0], torch.Tensor):
            both = torch.stack(column, 1)
            out.append(both.reshape(-1, *both.shape[2:]))
        else:
            out.append([item for row in zip(*column, strict=True) for item in row])
    return tuple(out)
