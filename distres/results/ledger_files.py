"""The ledger's files: every rank writes its rows as sorted runs (Parquet, at most RUN_ROWS rows
each), and rank 0 merges all runs into <split>.parquet in the shard set's order with bounded
memory (one batch of each run at a time), feeding the per-class statistics as it goes. So no
rank ever holds the whole split: at ImageNet-21k's 14M rows the merge keeps a few hundred MB.

Columns of the ledger (pandas.read_parquet, polars.read_parquet and DuckDB read it as is):
shard (the shard's URL or path, dictionary-encoded), key, label, pred1..predK (the top-K
classes, K = min(5, classes)), prob1..probK (their probabilities), loss.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distres.errors import USAGE, DistresError, WriteError, why

RUN_ROWS = 1 << 18  # rows per sorted run (plus at most a batch): a rank's rows on the host
FAN_IN = 64  # runs merged at once (open files, and one batch of each in memory)
BATCH = 1 << 14  # rows of each run read at a time by the merge
ROW_GROUP = 1 << 17  # rows per Parquet row group of the ledger
_AT_BITS = 40  # a sample's sort code: shard << 40 | position (a DALI byte offset < 1 TB)


class LedgerError(DistresError, ValueError):
    """A ledger file that cannot be read; the message names it."""

    exit_code, label = USAGE, "ledger error"


def _why(e: Exception) -> str:
    return why(e) if isinstance(e, OSError) and e.errno else str(e)


def sort_code(shard: np.ndarray, at: np.ndarray) -> np.ndarray:
    if len(shard) and (shard.max() >= 1 << (63 - _AT_BITS) or at.max() >= 1 << _AT_BITS):
        raise ValueError(f"a sample key past the ledger's sort code ({shard.max()}, {at.max()})")
    return (shard.astype(np.int64) << _AT_BITS) | at.astype(np.int64)


def write_run(path: Path, code: np.ndarray, key: list[str], label: np.ndarray,
              top: np.ndarray, prob: np.ndarray, loss: np.ndarray) -> Path:  # fmt: skip
    """One sorted run of this rank's rows (sorted here by code)."""
    order = np.argsort(code, kind="stable")
    columns = {"code": code[order], "key": pa.array(key).take(order), "label": label[order]}
    for j in range(top.shape[1]):
        columns[f"pred{j + 1}"] = top[order, j].astype(np.int32)
        columns[f"prob{j + 1}"] = prob[order, j].astype(np.float32)
    columns["loss"] = loss[order].astype(np.float32)
    columns["label"] = columns["label"].astype(np.int32)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # row groups of BATCH rows: the merge reads a run one row group at a time
        pq.write_table(pa.table(columns), path, compression="zstd", row_group_size=BATCH)
    except OSError as e:
        raise WriteError(f"{path}: cannot write ({why(e)})") from None
    return path


class _Run:
    """A sorted run read one row group (BATCH rows) at a time. Not iter_batches: it reads
    ahead through the whole file (at 56 runs of 14M rows, every run was in memory)."""

    def __init__(self, path: Path):
        try:
            self.file = pq.ParquetFile(path, pre_buffer=False)
        except FileNotFoundError:
            raise LedgerError(
                f"{path}: a part of the ledger is not visible on rank 0; the ledger's "
                "directory must be one every node shares"
            ) from None
        except (OSError, pa.ArrowException) as e:
            raise LedgerError(f"{path}: a part of the ledger is unreadable ({_why(e)})") from None
        self.groups = iter(range(self.file.metadata.num_row_groups))
        self.buf: pa.Table | None = None
        self.codes = np.zeros(0, np.int64)

    def fill(self) -> bool:
        """Load the next row group when this one is used up; False when the run is done."""
        while self.buf is None or self.buf.num_rows == 0:
            group = next(self.groups, None)
            if group is None:
                return False
            self.buf = self.file.read_row_group(group)
            self.codes = self.buf.column("code").to_numpy()
        return True

    def take_upto(self, bound: int) -> pa.Table:
        n = int(np.searchsorted(self.codes, bound, side="right"))
        out, self.buf, self.codes = self.buf.slice(0, n), self.buf.slice(n), self.codes[n:]
        return out


def merged(runs: list[Path]) -> Iterator[pa.Table]:
    """All runs' rows in code order: each step emits every buffered row up to the smallest
    of the runs' last buffered codes, so at least one run's batch is used up and memory stays
    at one batch per run. More than FAN_IN runs are first merged FAN_IN at a time into
    intermediate runs beside them (a thousand ranks' runs never hold a thousand files open)."""
    level = 0
    while len(runs) > FAN_IN:
        runs = [_merge_to_run(runs[i : i + FAN_IN], level, i // FAN_IN)
                for i in range(0, len(runs), FAN_IN)]  # fmt: skip
        level += 1
    yield from _merged(runs)


def _merge_to_run(runs: list[Path], level: int, n: int) -> Path:
    out = runs[0].with_name(f"merge{level:02d}-{n:05d}.parquet")
    try:
        with pq.ParquetWriter(out, pq.read_schema(runs[0]), compression="zstd") as writer:
            for table in _merged(runs):
                writer.write_table(table, row_group_size=BATCH)
    except OSError as e:
        raise WriteError(f"{out}: cannot write ({why(e)})") from None
    return out


def _merged(runs: list[Path]) -> Iterator[pa.Table]:
    active = [r for r in map(_Run, runs) if r.fill()]
    while active:
        bound = min(int(r.codes[-1]) for r in active)
        table = pa.concat_tables([r.take_upto(bound) for r in active])
        order = np.argsort(table.column("code").to_numpy(), kind="stable")
        yield table.take(order)
        active = [r for r in active if r.fill()]


def columns_of(table: pa.Table | pa.RecordBatch) -> dict[str, Any]:
    """A chunk of ledger rows as numpy arrays: label (n,), top (n, k), prob (n, k), loss (n,)."""
    names = table.schema.names
    k = sum(n.startswith("pred") for n in names)
    col = table.column
    return {
        "label": col("label").to_numpy().astype(np.int64),
        "top": np.stack([col(f"pred{j}").to_numpy() for j in range(1, k + 1)], 1).astype(np.int64),
        "prob": np.stack([col(f"prob{j}").to_numpy() for j in range(1, k + 1)], 1),
        "loss": col("loss").to_numpy(),
    }


def merge(runs: list[Path], out: Path, urls: tuple[str, ...], stats) -> int:
    """Merge the runs into the ledger `out` (atomically: <out>.tmp renamed), updating `stats`
    (a per_class.ClassStats) chunk by chunk; returns the number of rows."""
    dictionary = pa.array(urls, pa.string())
    # a name of its own (and a dot: io.sweep's pattern), removed on any failure
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    rows, pending, writer = 0, [], None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for table in merged(runs):
            shard = (table.column("code").to_numpy() >> _AT_BITS).astype(np.int32)
            table = table.drop_columns(["code"])
            table = table.add_column(0, "shard", pa.DictionaryArray.from_arrays(shard, dictionary))
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema, compression="zstd")
            c = columns_of(table)
            stats.update(c["label"], c["top"], c["loss"], _rows_of(table))
            pending.append(table)
            rows += table.num_rows
            if sum(t.num_rows for t in pending) >= ROW_GROUP:
                writer.write_table(pa.concat_tables(pending), row_group_size=ROW_GROUP)
                pending = []
        if writer is None:
            return 0
        if pending:
            writer.write_table(pa.concat_tables(pending), row_group_size=ROW_GROUP)
        writer.close()
        writer = None
        os.replace(tmp, out)
    except OSError as e:
        raise WriteError(f"{out}: cannot write ({why(e)})") from None
    finally:
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()
        tmp.unlink(missing_ok=True)
    return rows


def _rows_of(table: pa.Table):
    def rows(indices: np.ndarray) -> list[dict]:
        out = table.take(pa.array(indices, pa.int64())).to_pylist()
        # float32's 7 significant digits, not float64's 17
        return [{k: float(f"{v:.7g}") if isinstance(v, float) else v for k, v in r.items()}
                for r in out]  # fmt: skip

    return rows


def read_chunks(path: Path) -> Iterator[pa.Table]:
    """The ledger's rows, a row group at a time (LedgerError naming the file); one row group
    in memory, never the read-ahead of the whole file."""
    try:
        f = pq.ParquetFile(path, pre_buffer=False)
        for group in range(f.metadata.num_row_groups):
            yield f.read_row_group(group)
    except FileNotFoundError:
        raise LedgerError(f"{path}: missing") from None
    except (OSError, pa.ArrowException) as e:
        raise LedgerError(f"{path}: not a ledger ({_why(e)})") from None
