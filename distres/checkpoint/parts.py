"""What a checkpoint part is, declared once: its name, where it lives (meta.json for the parts
the same on every rank, each rank's file for its own, the engine's format for tensors), the
check that says why a saved state would not load, and where format 1 (distres before the
parts) kept it. The store knows no part names; a run's parts are declared by its trainer
(distres.trainer.state.PARTS), each in one line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

Check = Callable[[Any], "str | None"]  # a part's saved state -> why it would not load, or None
SHARED, RANK, TENSOR = "shared", "rank", "tensor"


class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class TensorPart(Stateful, Protocol):
    """A part whose state is tensors the same on every rank (the EMA of the weights): the
    engine writes them beside its own, in its format, so they reshard as its tensors do."""

    def missing(self, model: Any) -> None: ...  # the checkpoint predates this part


@dataclasses.dataclass(frozen=True)
class PartSpec:
    name: str
    scope: str  # SHARED (meta.json), RANK (rank-NNNNN.json) or TENSOR (the engine's format)
    check: Check | None = None  # SHARED and RANK parts: why a saved state would not load
    # format 1: a flat meta.json whose keys `v1` (a tuple) made this part's state, or whose
    # key `v1` (a string) held it; rank parts were top-level keys of their name
    v1: tuple[str, ...] | str | None = None

    def __post_init__(self) -> None:
        if self.scope not in (SHARED, RANK, TENSOR):
            raise ValueError(f"part {self.name}: scope {self.scope!r}")
        if self.scope != TENSOR and self.check is None:
            raise ValueError(f"part {self.name}: a {self.scope} part needs its check")


def checks(specs: tuple[PartSpec, ...], scope: str) -> dict[str, Check]:
    return {s.name: s.check for s in specs if s.scope == scope}


def v1_state(specs: tuple[PartSpec, ...], old: dict) -> dict[str, Any]:
    """The shared parts' states of a format-1 meta.json, as its specs say (a part whose keys
    are absent is left out: validation names it)."""
    state: dict[str, Any] = {}
    for spec in specs:
        if spec.scope != SHARED or spec.v1 is None:
            continue
        if isinstance(spec.v1, str):
            if spec.v1 in old:
                state[spec.name] = old[spec.v1]
        elif any(k in old for k in spec.v1):
            state[spec.name] = {k: old[k] for k in spec.v1 if k in old}
    return state
