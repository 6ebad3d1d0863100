"""tracking.sample_log: which samples each optimizer step trained on, per rank, for auditing
the data order (an epoch seen once, a resume on another world size that repeats or skips
nothing). One JSON line per step in <run.dir>/samples/rank-<R>.jsonl:

    {"attempt": <start time>, "step": s, "epoch": e, "rank": r, "world": W,
     "keys": [[shard, at], ...]}

`shard` is the sample's index in the shard set and `at` its place in the tar (SampleKey).
A resumed run appends: where two attempts logged the same step, the later attempt's line is
the one that trained (`read_steps`)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

from distres.data.api import Batch, KeyedBatch


class SampleLog:
    def __init__(self, run_dir: Path, rank: int, world: int, attempt: float | None = None):
        """attempt: the same on every rank of an attempt (rank 0's start time)."""
        self.path = Path(run_dir) / "samples" / f"rank-{rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rank, self.world = rank, world
        self.attempt = time.time() if attempt is None else attempt
        self._file = None

    def take(self, step: int, epoch: int, micro_batches: list) -> list[Batch]:
        """Log the step's keys; the batches without them (what the engine takes)."""
        keys = [[k.shard, k.at] for b in micro_batches for k in getattr(b, "keys", [])]
        if self._file is None:
            self._file = self.path.open("a", buffering=1)  # a line at a time
        line = {"attempt": self.attempt, "step": step, "epoch": epoch, "rank": self.rank,
                "world": self.world, "keys": keys}  # fmt: skip
        self._file.write(json.dumps(line, separators=(",", ":")) + "\n")
        return [Batch(b.images, b.labels) if isinstance(b, KeyedBatch) else b
                for b in micro_batches]  # fmt: skip

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_steps(run_dir: Path) -> dict[int, dict]:
    """{step: {"epoch", "keys" (every rank's, rank order), "world"}} as trained: of the
    attempts that logged a step, the latest's lines."""
    lines: Iterable[dict] = (
        json.loads(line)
        for path in sorted((Path(run_dir) / "samples").glob("rank-*.jsonl"))
        for line in path.read_text().splitlines()
        if line.strip()
    )
    latest: dict[int, float] = {}
    by_step: dict[tuple[int, float], list[dict]] = {}
    for rec in lines:
        step, attempt = rec["step"], rec["attempt"]
        latest[step] = max(latest.get(step, attempt), attempt)
        by_step.setdefault((step, attempt), []).append(rec)
    out = {}
    for step, attempt in sorted(latest.items()):
        recs = sorted(by_step[(step, attempt)], key=lambda r: r["rank"])
        out[step] = {
            "epoch": recs[0]["epoch"],
            "world": recs[0]["world"],
            "ranks": len(recs),
            "keys": [tuple(k) for r in recs for k in r["keys"]],
        }
    return out
