"""Which checkpoint a run continues from, whether it fits this run, and the batch plan that
keeps its global batch on this world size."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch.distributed as dist

from distres import checkpoint as ckpt
from distres.config import BatchPlan, Config, ConfigError
from distres.dist import DistEnv
from distres.trainer.state import validate

log = logging.getLogger("distres")

# the tensor format each engine writes
ENGINE_FORMATS = {"ddp": "dcp", "deepspeed": "deepspeed"}


def find_checkpoint(cfg: Config, env: DistEnv, root: Path) -> tuple[Path, dict] | None:
    """Rank 0 picks the checkpoint (warning about any it skips) and validates every part of
    it; every rank gets its choice, so all load the same one."""
    choice: list[Any] = [None]
    if env.is_main and cfg.checkpoint.resume == "none":
        if ckpt.committed(root):
            choice = [
                f"checkpoint.resume=none, but {root} holds checkpoints of an earlier run; set "
                "another run.dir (or checkpoint.dir), or remove them"
            ]
    elif env.is_main:
        try:
            found = ckpt.find_resume(root, cfg.checkpoint.resume, validate)
            choice = [(str(found[0]), found[1]) if found else None]
        except ckpt.CheckpointError as e:
            choice = [[str(e)]]
    if env.distributed:
        dist.broadcast_object_list(choice, src=0)
    if isinstance(choice[0], str):
        raise ConfigError(choice[0])
    if isinstance(choice[0], list):  # [message]: a checkpoint that cannot be used
        raise ckpt.CheckpointError(choice[0][0])
    if not choice[0]:
        return None
    path, meta = Path(choice[0][0]), choice[0][1]
    check_compatible(cfg, path, meta)
    return path, meta


def check_compatible(cfg: Config, path: Path, meta: dict) -> None:
    theirs, ours = meta["model"], dataclasses.asdict(cfg.model)
    for key in ("name", "num_classes", "in_chans", "plain"):
        if theirs.get(key) != ours[key]:
            raise ConfigError(
                f"checkpoint {path} holds model.{key}={theirs.get(key)!r}, this run has "
                f"model.{key}={ours[key]!r}; resume with the same model, or set "
                "checkpoint.resume=none (or another run.dir) to start fresh"
            )
    written_by = meta["tensors"].get("format")
    if written_by != ENGINE_FORMATS[cfg.engine.name]:
        raise ConfigError(
            f"checkpoint {path} was written in the {written_by} format; this run has "
            f"engine.name={cfg.engine.name}; resume with the same engine, or export the "
            "weights (python -m distres.export) and start a new run"
        )


def shard_change(cfg: Config, path: Path, meta: dict, loader: Any) -> str | None:
    """None when the checkpoint counted its data position in this run's training shards
    (wherever they live now); otherwise what differs, in one line. A ConfigError unless
    data.allow_shard_change, with which the caller restarts the epoch on the new set."""
    then = (meta.get("data") or {}).get("train")
    spec = getattr(loader, "spec", None)
    if not then or spec is None:  # written before checkpoints recorded their shards
        return None
    now = spec.shards.fingerprint()
    # the built-in digits are written on each machine: their JPEG bytes follow its libjpeg
    content = ("sha256", "bytes") if cfg.data.source != "digits" else ()
    differs = [k for k in content if k in now and k in then and now[k] != then[k]]
    if now["digest"] == then.get("digest") and not differs:
        return None

    def desc(f: dict) -> str:
        return f"{f['shards']} shards, {f['samples']} samples ({f['first']} .. {f['last']})"

    same = all(now[k] == then.get(k) for k in ("shards", "samples", "first", "last"))
    line = (
        f"data.train_shards differ from the shards checkpoint {path} was reading: now "
        f"{desc(now)}, then {desc(then)}"
        + (
            f"; the same names and counts, but other {' and '.join(differs) or 'order'}"
            if same
            else ""
        )
    )
    if not cfg.data.allow_shard_change:
        raise ConfigError(
            f"{line}. Resume on the same shards (moving them elsewhere is fine), or set "
            "data.allow_shard_change=true to restart the epoch on the new set"
        )
    return line


def replan(cfg, plan: BatchPlan, meta: dict) -> BatchPlan:
    """Keep the checkpoint's global batch on this world size: where it cannot, as
    train.elastic_batch says (a one-line refusal, or the nearest, logged). A global batch the
    user set in this run's config wins over the checkpoint's (the config says it)."""
    from distres.config import plan_batch

    saved = meta["layout"]["global_batch"]
    if plan.global_batch == saved:
        return plan
    if cfg.train.global_batch and cfg.train.global_batch != saved:
        log.warning(
            f"WARNING: train.global_batch={cfg.train.global_batch} is not the checkpoint's "
            f"{saved}: the configured one is used (LR and schedule follow it)"
        )
        return plan
    new = plan_batch(cfg, plan.world_size, target=saved)
    if new.global_batch == saved:
        log.info(
            f"resuming a global batch of {saved} on {plan.world_size} rank(s): "
            f"grad_accum {plan.grad_accum} -> {new.grad_accum}"
        )
    return new


def keep_streams(cfg: Config, path: Path, meta: dict) -> None:
    """The checkpoint's data order (the torch backend's data.streams) for this run: with
    another, the rest of its epoch and the epoch length (the LR schedule) would change."""
    saved = meta["layout"].get("streams")
    if not saved or cfg.data.streams == saved:
        return
    if cfg.data.streams:
        raise ConfigError(
            f"data.streams={cfg.data.streams}: checkpoint {path} orders its epochs in {saved} "
            f"streams; resume with data.streams={saved} (or 0, which keeps it), or start a "
            "new run"
        )
    cfg.data.streams = saved


def same_layout(meta: dict, env: DistEnv, plan: BatchPlan) -> bool:
    """Written by this world size with this micro-batch and accumulation: every rank's own
    parts (data position, RNG, loss window) restore exactly."""
    layout = meta["layout"]
    return (layout["world_size"], layout["micro_batch"], layout["grad_accum"]) == (
        env.world_size,
        plan.micro_batch,
        plan.grad_accum,
    )
