"""The run's state, as stateful parts of every checkpoint: each declared once in PARTS (its
name, where it lives, its check, its format-1 name), its object named in `run_parts`.

Shared parts (the same on every rank) go to meta.json, each rank's own to its rank file,
tensor parts beside the engine's tensors (see distres.checkpoint.manager). A part has
state_dict() / load_state_dict(); its check says why a saved state would not load, before
any collective load. Adding state means adding a part: one line in PARTS, one in run_parts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from distres.checkpoint.parts import RANK, SHARED, TENSOR, PartSpec
from distres.components.stopping import EarlyStopping
from distres.data.api import Loader
from distres.data.build import position_problem
from distres.engine.base import check_engine_state
from distres.rng import rng_problem, rng_state, set_rng_state


def seed_everything(seed: int, deterministic: bool) -> None:
    """The same seed on every rank: identical initial weights (DDP also broadcasts them)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest algo


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclasses.dataclass
class TrainState:
    """Where the run is (optimizer steps, epochs, samples seen: the same on every rank), its
    best and last evaluation, and its W&B run id (a resumed job continues its W&B run)."""

    step: int = 0
    epoch: int = 0
    epoch_step: int = 0  # optimizer steps done in the current epoch
    samples_seen: int = 0
    best_top1: float = -math.inf
    last_eval: dict[str, float] = dataclasses.field(default_factory=dict)
    wandb_id: str = ""

    def state_dict(self) -> dict:
        state = dataclasses.asdict(self)
        state["best_top1"] = None if self.best_top1 == -math.inf else self.best_top1
        return state

    def load_state_dict(self, state: dict) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, state[field.name])
        if self.best_top1 is None:
            self.best_top1 = -math.inf

    @staticmethod
    def check_state(state: object) -> str | None:
        if not isinstance(state, dict):
            return "not a mapping"
        for key in ("step", "epoch", "epoch_step", "samples_seen"):
            if not _count(state.get(key)):
                return f"{key}={state.get(key)!r}"
        best = state.get("best_top1")
        if best is not None and (isinstance(best, bool) or not isinstance(best, int | float)):
            return f"best_top1={best!r}"
        if not isinstance(state.get("last_eval"), dict):
            return "last_eval is not a mapping"
        if not isinstance(state.get("wandb_id"), str):
            return "wandb_id is not text"
        return None


class LossWindow:
    """Train loss summed on the device between log records: the hot loop never syncs; the
    window spans epoch ends, so every step lands in exactly one record."""

    def __init__(self, device: torch.device):
        self.total = torch.zeros((), device=device)
        self.steps, self.t0 = 0, time.perf_counter()
        self.data_wait = 0.0  # host seconds spent waiting for input in this window

    def add(self, loss: torch.Tensor) -> None:
        self.total += loss
        self.steps += 1

    def state_dict(self) -> dict:
        return {"total": self.total.item(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.total.fill_(state["total"])
        self.steps = state["steps"]

    @staticmethod
    def check_state(state: object) -> str | None:
        if not isinstance(state, dict) or not _count(state.get("steps")):
            return "no step count"
        total = state.get("total")
        if isinstance(total, bool) or not isinstance(total, int | float):
            return f"total={total!r}"
        return None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (evaluation, a checkpoint) is not training time: leave it out
        of the window's img/s and step time."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.t0 += time.perf_counter() - t0

    def drain(self) -> tuple[float, int, float]:
        """(mean loss, steps, seconds) since the last drain; one host-device sync."""
        mean = (self.total / max(1, self.steps)).item()
        out = (mean, self.steps, time.perf_counter() - self.t0)
        self.total.zero_()
        self.steps, self.t0 = 0, time.perf_counter()
        self.data_wait = 0.0
        return out


class RngStates:
    """Every generator this rank draws from (Python, NumPy, torch CPU and CUDA)."""

    def __init__(self, device: torch.device):
        self.device = device

    def state_dict(self) -> dict:
        return rng_state(self.device)

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(state, self.device)


class SkipCounts:
    """Bad samples the train and val loaders reported and left out (data.on_bad_sample)."""

    def __init__(self, train: Loader, val: Loader):
        self.train, self.val = train, val

    def state_dict(self) -> dict:
        return {"train": self.train.skipped, "val": self.val.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.train.skipped, self.val.skipped = state["train"], state["val"]

    @staticmethod
    def check_state(state: object) -> str | None:
        if not isinstance(state, dict) or not all(_count(state.get(k)) for k in ("train", "val")):
            return "not two counts"
        return None


class DataPosition:
    """The train loader's position in its epoch. Restored exactly on the batch layout that
    wrote it; on another, placed from every old rank's position (reshard)."""

    def __init__(self, loader: Loader, state: TrainState, steps_per_epoch: int, grad_accum: int):
        self.loader, self.train_state = loader, state
        self.steps_per_epoch, self.grad_accum = steps_per_epoch, grad_accum
        self.pending: dict | None = None  # a mid-epoch position to restore

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.train_state.epoch_step:  # at an epoch start the epoch alone places it
            self.pending = state

    def reshard(self, states: list[dict], layout: dict) -> None:
        s = self.train_state
        if s.epoch_step:
            left = self.loader.resume_from_ranks(
                s.epoch, states, layout["micro_batch"], layout["world_size"]
            )
            s.epoch_step = max(0, self.steps_per_epoch - left // self.grad_accum)

    def begin_epoch(self) -> None:
        if self.pending is not None:  # resumed mid-epoch on the same layout
            self.loader.load_state_dict(self.pending)
            self.pending = None
        elif self.train_state.epoch_step == 0:
            self.loader.set_epoch(self.train_state.epoch)


# format 1 (distres before the parts): the train state's fields at meta.json's top level
_V1_TRAIN = ("step", "epoch", "epoch_step", "samples_seen", "best_top1", "last_eval", "wandb_id")
PARTS: tuple[PartSpec, ...] = (
    PartSpec("train", SHARED, TrainState.check_state, v1=_V1_TRAIN),
    PartSpec("engine", SHARED, check_engine_state, v1=("scheduler", "scaler")),
    PartSpec("early_stopping", SHARED, EarlyStopping.check_state, v1="early_stopping"),
    PartSpec("data", RANK, position_problem),
    PartSpec("rng", RANK, rng_problem),
    PartSpec("window", RANK, LossWindow.check_state),
    PartSpec("skipped", RANK, SkipCounts.check_state),
    PartSpec("ema", TENSOR),  # train.ema_decay > 0 (a checkpoint without it: missing())
)


def run_parts(t: Any) -> tuple[tuple[PartSpec, ...], dict[str, Any]]:
    """The specs and objects of a trainer's checkpoint (t: a distres.trainer.loop.Trainer);
    a tensor part the run has not (no EMA) is left out of both."""
    objects = {
        "train": t.state,
        "engine": t.engine,
        "early_stopping": t.early_stopping,
        "data": t.data,
        "rng": RngStates(t.device),
        "window": t.window,
        "skipped": SkipCounts(t.train_data, t.val_data),
        **t.tensor_parts,
    }
    specs = tuple(s for s in PARTS if s.name in objects)
    return specs, {s.name: objects[s.name] for s in specs}


def validate(path: Any) -> dict:
    """A checkpoint of a training run, every part of it checked; its meta."""
    from distres.checkpoint import validate as validate_checkpoint

    return validate_checkpoint(path, PARTS)


def _fingerprint(loader: Any) -> dict | None:
    spec = getattr(loader, "spec", None)  # a test's own loader may have none
    return spec.shards.fingerprint() if spec is not None else None


def checkpoint_header(t: Any) -> dict[str, Any]:
    """What a trainer's meta.json says besides its parts' states (t: the Trainer)."""
    import dataclasses as dc

    from distres.config import to_yaml
    from distres.trainer.records import metric

    plan, es = t.plan, t.early_stopping
    return {
        "layout": {
            "world_size": t.env.world_size,
            "micro_batch": plan.micro_batch,
            "grad_accum": plan.grad_accum,
            "global_batch": plan.global_batch,
            "steps_per_epoch": t.steps_per_epoch,
            # the torch backend's epoch order (data.streams): every resume keeps it
            "streams": getattr(t.train_data, "streams", None),
        },
        "model": dc.asdict(t.cfg.model),
        # which shards the data position counts in (a resume on other shards is refused)
        "data": {"train": _fingerprint(t.train_data)},
        "config": to_yaml(t.cfg),
        "metric": {"name": es.monitor, "mode": es.mode, "value": metric(t)},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
