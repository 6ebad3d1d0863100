"""A run's checkpoints as a dict of stateful parts, in the manner of torchtitan's
CheckpointManager: one `save(step)`, one `load(path)`.

Shared parts (the same on every rank: train state, schedule, early stopping) go to meta.json,
each rank's own parts (data position, RNG, loss window) to its rank file, and the engine's
tensors to its own format. Adding state means adding a part: its state_dict is saved and its
load_state_dict called, and its check (by the same name, see distres.trainer.state) validates
the saved state before any collective load.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from distres.checkpoint.store import Check, CheckpointStore, read_rank_state


class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class TensorPart(Stateful, Protocol):
    """A part whose state is tensors the same on every rank (the EMA of the weights): the
    engine writes them beside its own, in its format, so they reshard as its tensors do."""

    def missing(self, model: Any) -> None: ...  # the checkpoint predates this part


class CheckpointManager:
    def __init__(
        self,
        store: CheckpointStore | None,
        engine: Any,
        shared: Mapping[str, Stateful],
        ranks: Mapping[str, Stateful],
        header: Callable[[], dict],
        checks: tuple[Mapping[str, Check], Mapping[str, Check]],
        tensors: Mapping[str, TensorPart] | None = None,
    ):
        """engine: writes and loads the tensors (checkpoint_info, save_tensors, load_tensors);
        header: what meta.json says besides the parts (layout, model, config, metric);
        checks: (shared, per rank) part checks; every part must have one;
        tensors: parts of tensors the engine writes with its own (their names go to
        meta.json's "tensors"."parts", checked by the engine's format)."""
        for kind, parts, known in (("shared", shared, checks[0]), ("rank", ranks, checks[1])):
            if set(parts) != set(known):
                raise ValueError(f"{kind} parts {sorted(parts)} != their checks {sorted(known)}")
        self.store, self.engine, self.header = store, engine, header
        self.shared, self.ranks = dict(shared), dict(ranks)
        self.tensors = dict(tensors or {})
        self.saved_step = -1

    @property
    def enabled(self) -> bool:
        return self.store is not None

    def save(self, step: int, metric: float | None = None) -> Path | None:
        """A collective: every rank writes its parts (async writes commit later)."""
        if self.store is None or self.saved_step == step:
            return None
        meta = {
            **self.header(),
            "tensors": {**self.engine.checkpoint_info(), "parts": sorted(self.tensors)},
            "state": {name: part.state_dict() for name, part in self.shared.items()},
        }
        mine = {name: part.state_dict() for name, part in self.ranks.items()}
        store = self.store
        parts = {name: part.state_dict() for name, part in self.tensors.items()}
        path = store.save(
            step,
            meta,
            mine,
            metric,
            write=lambda d: self.engine.save_tensors(d, store.group, store.async_save, parts),
        )
        self.saved_step = step
        return path

    def load(self, path: Path, meta: dict, rank: int, same_layout: bool) -> None:
        """Restore every part from checkpoint `path` (validated). Rank parts come from this
        rank's file when the batch layout is the one that wrote it; on another layout only
        parts with a `reshard(states, layout)` (the data position) are placed, from every old
        rank's state."""
        saved = meta["tensors"].get("parts", [])
        parts = {n: p.state_dict() for n, p in self.tensors.items() if n in saved}
        self.engine.load_tensors(path, meta, parts)
        for name, part in self.tensors.items():
            if name in parts:
                part.load_state_dict(parts[name])
            else:
                part.missing(self.engine.module)
        for name, part in self.shared.items():
            part.load_state_dict(meta["state"][name])
        if same_layout:
            state = read_rank_state(path, rank)
            for name, part in self.ranks.items():
                part.load_state_dict(state[name])
        else:
            old = meta["layout"]["world_size"]
            states = [read_rank_state(path, r) for r in range(old)]
            for name, part in self.ranks.items():
                if hasattr(part, "reshard"):
                    part.reshard([s[name] for s in states], meta["layout"])
        self.saved_step = meta["step"]

    # -- async writes ---------------------------------------------------------------------
    def busy(self) -> bool:
        """This rank's part of an async write is still being written."""
        return self.store is not None and self.store.pending is not None and not self.store.ready()

    def commit(self) -> None:
        """Commit a finished async write (a collective; call when no rank is busy)."""
        if self.store is not None and self.store.pending is not None:
            self.store.wait()

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
