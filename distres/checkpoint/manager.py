"""A run's checkpoints as a dict of stateful parts, in the manner of torchtitan's
CheckpointManager: one `save(step)`, one `load(path)`.

Shared parts (the same on every rank: train state, schedule, early stopping) go to meta.json,
each rank's own parts (data position, RNG, loss window) to its rank file, and tensor parts
(the EMA) beside the engine's tensors in its format. Adding state means adding a part: a
PartSpec (distres.checkpoint.parts: its name, scope, check and format-1 name, in one line)
and the object whose state_dict is saved and load_state_dict called.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from distres.checkpoint.parts import RANK, SHARED, TENSOR, PartSpec, Stateful, TensorPart
from distres.checkpoint.read import read_rank_state
from distres.checkpoint.store import CheckpointStore


class CheckpointManager:
    def __init__(
        self,
        store: CheckpointStore | None,
        engine: Any,
        specs: tuple[PartSpec, ...],
        parts: Mapping[str, Stateful],
        header: Callable[[], dict],
    ):
        """engine: writes and loads the tensors (checkpoint_info, save_tensors, load_tensors);
        specs: every part's declaration; parts: the object of each, by name (the two must
        name the same parts); header: what meta.json says besides the parts (layout, model,
        config, metric). Tensor parts' names go to meta.json's "tensors"."parts", checked by
        the engine's format."""
        if set(parts) != {s.name for s in specs}:
            raise ValueError(f"parts {sorted(parts)} != their specs {[s.name for s in specs]}")
        self.store, self.engine, self.header, self.specs = store, engine, header, specs
        by_scope = {scope: {s.name: parts[s.name] for s in specs if s.scope == scope}
                    for scope in (SHARED, RANK, TENSOR)}  # fmt: skip
        self.shared, self.ranks = by_scope[SHARED], by_scope[RANK]
        self.tensors: dict[str, TensorPart] = by_scope[TENSOR]  # type: ignore[assignment]
        self.saved_step = -1

    @property
    def enabled(self) -> bool:
        return self.store is not None

    def save(self, step: int, metric: float | None = None) -> Path | None:
        """A collective: every rank writes its parts (async writes commit later)."""
        if self.store is None or self.saved_step == step:
            return None
        for part in self.tensors.values():  # one state on every rank (the EMA's statistics)
            getattr(part, "before_save", lambda: None)()
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

    def load(
        self, path: Path, meta: dict, rank: int, same_layout: bool, skip: tuple[str, ...] = ()
    ) -> None:
        """Restore every part from checkpoint `path` (validated). Rank parts come from this
        rank's file when the batch layout is the one that wrote it; on another layout only
        parts with a `reshard(states, layout)` (the data position) are placed, from every old
        rank's state. Rank parts named in `skip` keep their fresh state."""
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
                if name not in skip:
                    part.load_state_dict(state[name])
        else:
            old = meta["layout"]["world_size"]
            states = [read_rank_state(path, r) for r in range(old)]
            for name, part in self.ranks.items():
                if hasattr(part, "reshard") and name not in skip:
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
