"""The torch backend's training order: canonical streams, a function of (seed, epoch, streams)
and never of the world size (MosaicML Streaming's canonical partitions, for tar shards).

The epoch's sample sequence is its shards, in the epoch's shuffled order, one after another.
It is cut into C equal contiguous ranges, the streams. A stream reads its range in tar order,
`window` samples at a time, and hands each window out in a seeded random order: reads stay
sequential, and a stream's k-th output (its slot k) is known without reading anything. The
epoch's position p is slot p // C of stream p % C: position after position, one sample of
each stream in turn. A step of global batch G takes positions [t*G, (t+1)*G).

Rank r of W (W dividing C) takes the positions p >= P with (p - P) % W == r after a start at
position P: those are the slots of the streams s with s % W == (P + r) % W, so a rank reads
only its own streams. Which samples were consumed is then a matter of positions, not ranks:
any new world size that divides C subtracts them exactly and continues in the same order.
Each sample's augmentation is seeded by (seed, epoch, stream, slot), so the batches (and,
apart from floating-point reduction order, the training) do not depend on the world size.

A bad sample (data.on_bad_sample=skip) uses its slot and gives nothing: the stream's next
good sample takes its position. A stream that runs out (bad samples) reads its range again
with new windows: slots go on past its length.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from itertools import accumulate

MIN_PER_STREAM = 8  # data.streams=0 never picks streams shorter than this


def auto_streams(world: int, workers: int, samples: int, repeats: int = 1) -> int:
    """data.streams=0 at a run's first start: a multiple of every rank's worker count (each
    worker its own streams) and of 24, so that 1, 2, 3, 4, 6, 8, 12 and 24 ranks, or those
    times the first world size, continue the run exactly; fewer where the data is small."""
    unit = math.lcm(world * max(1, workers), repeats)
    for c in (math.lcm(unit, 24), unit, math.lcm(world, repeats)):
        if samples // c >= MIN_PER_STREAM:
            return c
    return math.lcm(world, repeats)


def world_sizes(streams: int, limit: int = 12) -> str:
    sizes = [d for d in range(1, streams + 1) if streams % d == 0]
    return ", ".join(map(str, sizes[:limit])) + (", ..." if len(sizes) > limit else "")


class EpochOrder:
    """One epoch's canonical streams over a shard set's counts (see the module doc)."""

    def __init__(self, counts: list[int], order: list[int], streams: int, window: int,
                 seed: int, epoch: int, repeats: int = 1):  # fmt: skip
        self.counts, self.order, self.streams = counts, order, streams
        self.window, self.seed, self.epoch, self.repeats = window, seed, epoch, repeats
        total = sum(counts[i] for i in order)
        self.length = total // streams  # every stream's samples (the remainder is dropped)
        # where each shard of the order starts in the sequence
        self._starts = list(accumulate([counts[i] for i in order], initial=0))

    @property
    def positions(self) -> int:
        """The positions of the epoch: every stream's samples, C at a time."""
        return self.length * self.streams

    def range(self, s: int) -> tuple[int, int]:
        """Stream s's part of the sequence. With repeated augmentation (aug_repeats=R) the
        first C/R ranges are read by R streams each (see permutation)."""
        base = s // self.repeats
        return base * self.length, (base + 1) * self.length

    def pieces(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """[start, end) of the sequence as (shard, first, last) runs in tar order."""
        out = []
        k = bisect_right(self._starts, start) - 1
        while start < end:
            shard, base = self.order[k], self._starts[k]
            last = min(end, self._starts[k + 1]) - base
            if last > start - base:
                out.append((shard, start - base, last))
            start, k = base + last, k + 1
        return out

    def shards_from(self, s: int, slot: int) -> list[int]:
        """The shards stream s reads from its slot `slot` on, in order (a re-read: all)."""
        lo, hi = self.range(s)
        refill, j = divmod(slot, self.length)
        start = lo if refill else lo + j // self.window * self.window
        return [i for i, _, _ in self.pieces(start, hi)]

    def windows(self, s: int) -> int:
        return -(-self.length // self.window)

    def permutation(self, s: int, refill: int, k: int) -> list[int]:
        """The order window k of stream s hands its samples out in (refill: a re-read). The
        R streams of a repeated range share it: a sample's R copies take the same slot, so
        they sit at adjacent positions, on R different ranks, in the same step."""
        n = min(self.window, self.length - k * self.window)
        perm = list(range(n))
        base = s // self.repeats
        random.Random(f"{self.seed}:{self.epoch}:{base}:{refill}:{k}").shuffle(perm)
        return perm

    def sample_seed(self, s: int, slot: int) -> int:
        """The augmentation seed of stream s's slot: the same on any world size."""
        return hash((self.seed, self.epoch, s, slot)) & 0x7FFF_FFFF_FFFF_FFFF

    # -- ranks and positions --------------------------------------------------------------
    def rank_streams(self, start: int, rank: int, world: int) -> list[int]:
        """Rank's streams in the order its positions visit them from position `start`."""
        return [(start + rank + j * world) % self.streams for j in range(self.streams // world)]

    def consumed(self, position: int) -> list[int]:
        """Each stream's outputs among the first `position` positions."""
        c = self.streams
        return [max(0, -(-(position - s) // c)) for s in range(c)]
