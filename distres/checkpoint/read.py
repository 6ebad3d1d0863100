"""Reading checkpoints: which ones are committed, which one to resume from, and validation of
everything a resume will read before any collective load (meta.json and its header, each
part by its spec's check, every rank file, the tensors by their format's own check). Format 1
(distres before the parts) is read as format 2. The layout is distres.checkpoint.store's.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from distres.checkpoint.parts import RANK, SHARED, Check, PartSpec, checks, v1_state
from distres.errors import CheckpointError
from distres.io import read_json_object

log = logging.getLogger("distres")

FORMAT_VERSION = 2  # 2: parts' state_dicts under "state"; the tensor format under "tensors"
STEP_DIR = re.compile(r"^step-(\d{8,})$")
META, LATEST, BEST = "meta.json", "latest", "best.json"
# The module that reads each tensor format (see tensor_format).
FORMATS = {"dcp": "distres.checkpoint.dcp", "deepspeed": "distres.engine.deepspeed"}


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def committed(root: Path) -> list[Path]:
    """Committed checkpoints under root, newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def read_meta(path: Path, specs: tuple[PartSpec, ...] = ()) -> dict:
    """meta.json of checkpoint `path`, format 1 read as format 2 (a run resumes across the
    upgrade; its parts' states placed as `specs` declare, the header by the store)."""
    meta = read_json_object(path / META, CheckpointError) if (path / META).exists() else None
    if meta is None:
        raise CheckpointError(f"{path}: no {META} (not a distres checkpoint?)")
    if meta.get("format_version") == 1:
        meta = _from_v1(meta, specs)
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {meta.get('format_version')!r}, this distres reads "
            f"1 and {FORMAT_VERSION}"
        )
    return meta


def _from_v1(old: dict, specs: tuple[PartSpec, ...]) -> dict:
    """A format-1 meta.json (one flat object) read as format 2; a key it lacks is left out,
    and validation names it."""
    meta = {k: old[k] for k in ("step", "model", "config", "metric", "time") if k in old}
    meta["format_version"] = FORMAT_VERSION
    meta["layout"] = {k: old[k] for k in LAYOUT if k in old}
    meta["tensors"] = {"format": old.get("format", "dcp"), "zero_stage": old.get("zero_stage", 0)}
    meta["state"] = v1_state(specs, old)
    return meta


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.json"


# What every checkpoint's meta.json holds besides its parts, with the JSON type of each.
HEADER: dict[str, type] = {
    "step": int,
    "tensors": dict,
    "layout": dict,
    "model": dict,
    "config": str,
    "state": dict,
}
LAYOUT = ("world_size", "micro_batch", "grad_accum", "global_batch", "steps_per_epoch")


def validate(path: Path, specs: tuple[PartSpec, ...] = ()) -> dict:
    """Everything a resume will read must be there and parse, checked before any collective
    load: meta.json and its header, each shared part of `specs` (by its check), every rank
    file and each rank part, and the engine's tensors (by their format's own check). Returns
    the meta."""
    meta = read_meta(path, specs)
    for key, kind in HEADER.items():
        if key not in meta:
            raise CheckpointError(f"{path / META}: incomplete (missing {key})")
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            raise CheckpointError(f"{path / META}: {key}={meta[key]!r} is not a {kind.__name__}")
    layout = meta["layout"]
    for key in LAYOUT:
        value = layout.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CheckpointError(f"{path / META}: layout.{key}={value!r} is not a count")
    parts = meta["tensors"].get("parts", [])
    if not isinstance(parts, list) or not all(isinstance(p, str) for p in parts):
        raise CheckpointError(f"{path / META}: tensors.parts={parts!r} is not a list of names")
    _check_parts(path / META, meta["state"], checks(specs, SHARED))
    for rank in range(layout["world_size"]):
        read_rank_state(path, rank, checks(specs, RANK))
    tensor_format(path, meta).validate_tensors(path, meta)
    return meta


def tensor_format(path: Path, meta: dict) -> Any:
    """The module that reads this checkpoint's tensors: validate_tensors(path, meta) and
    consolidated_weights(path, meta, model, trust)."""
    fmt = meta["tensors"].get("format")
    if fmt not in FORMATS:
        raise CheckpointError(f"{path / META}: unknown tensor format {fmt!r}")
    return importlib.import_module(FORMATS[fmt])


def _check_parts(where: Path, state: dict, checks: Mapping[str, Check]) -> None:
    for name, check in checks.items():
        if name not in state:
            raise CheckpointError(f"{where}: no state for {name!r}")
        problem = check(state[name])
        if problem:
            raise CheckpointError(f"{where}: {name} cannot be restored ({problem})")


def read_rank_state(path: Path, rank: int, checks: Mapping[str, Check] | None = None) -> dict:
    """One rank's parts (name -> state), each part in `checks` checked."""
    f = path / rank_file(rank)
    try:
        saved = json.loads(f.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{f}: missing (an incomplete checkpoint)") from None
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError included
        raise CheckpointError(f"{f}: not a rank state ({type(e).__name__}: {e})") from None
    if isinstance(saved, dict) and "state" not in saved and saved and "format" not in saved:
        saved = {"state": saved}  # format 1: the rank's parts at the top level
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict):
        raise CheckpointError(f'{f}: not a rank state (no "state" mapping)')
    _check_parts(f, saved["state"], checks or {})
    return saved["state"]


def find_resume(
    root: Path, resume: str, check: Callable[[Path], dict] | None = None
) -> tuple[Path, dict] | None:
    """The checkpoint to resume from, with its meta: `resume` is "auto" (the newest complete
    one under root, skipping with a warning any that `check` refuses), "none", or a path (a
    checkpoint, or a directory of them). `check` (default: validate with no part checks)
    returns the meta or raises CheckpointError."""
    check = check or validate
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.exists():
            raise CheckpointError(f"checkpoint.resume={resume}: no such checkpoint")
        if not (path / META).is_file() and committed(path):
            root = path  # a directory of checkpoints: its newest complete one
        else:
            return path, check(path)
    latest = root / LATEST
    candidates = committed(root)
    if latest.is_file():  # the pointer first; a newer committed dir (crash after rename) next
        named = root / latest.read_text().strip()
        candidates.sort(key=lambda p: (p != named and _step(p) < _step(named), -_step(p)))
    for path in candidates:
        try:
            return path, check(path)
        except CheckpointError as e:
            log.warning(f"skipping checkpoint: {e}")
    if resume != "auto":
        raise CheckpointError(f"checkpoint.resume={resume}: no complete checkpoint in it")
    return None


def _step(path: Path) -> int:
    m = STEP_DIR.match(path.name)
    return int(m.group(1)) if m else -1
