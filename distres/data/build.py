"""Loaders for a config: the (train, val) shard sets and their per-rank ShardLoaders."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from distres.config import Config
from distres.data.api import Loader
from distres.data.shards.cache import ShardCache
from distres.data.shards.digits import digits
from distres.data.shards.read import ShardSet, read_shard_set
from distres.data.shards.scan import default_cache_dir
from distres.data.shards.storage import Transfer
from distres.data.spec import LoaderSpec
from distres.precision import input_dtype, resolve_precision


def resolve_shard_sets(cfg: Config) -> tuple[ShardSet, ShardSet]:
    """The (train, val) shard sets the config names, building a built-in one if needed."""
    if cfg.data.source == "digits":
        train_dir, val_dir = digits(cfg.data.cache_dir or None)
        return read_shard_set(train_dir), read_shard_set(val_dir)
    cache = shard_cache(cfg)
    return (
        read_shard_set(cfg.data.train_shards, cache),
        read_shard_set(cfg.data.val_shards, cache),
    )


def shard_cache(cfg: Config) -> ShardCache:
    """The node-local cache remote shards go through, as the data section sets it."""
    d = cfg.data
    root = Path(d.cache_dir) if d.cache_dir else default_cache_dir()
    return ShardCache(root, d.cache_limit, d.prefetch, Transfer(d.retries, d.read_timeout))


def resolve_backend(name: str) -> str:
    if name == "auto":
        from distres.data.dali.loader import dali_available

        return "dali" if dali_available() else "torch"
    return name


def host_threads(cfg: Config, device: torch.device, local_world_size: int = 1) -> int | None:
    """Intra-op threads for a GPU rank's main process when DataLoader workers decode on the
    same cores (data.backend=torch), or None to leave torch's default.

    The main process then only assembles batches (memory copies), but torch's default is one
    OpenMP thread per core, and every copy wakes all of them to spin on cores the workers
    need (13% fewer img/s with 2 threads than 1 on a 2-core machine with 2 workers; on a GPU
    host 16 threads meet 14 workers). An explicit run.threads or OMP_NUM_THREADS wins.
    """
    if (
        device.type != "cuda"
        or cfg.run.threads
        or "OMP_NUM_THREADS" in os.environ
        or resolve_backend(cfg.data.backend) != "torch"
        or not cfg.data.num_workers
    ):
        return None
    cores = (os.cpu_count() or 1) // max(1, local_world_size)
    return max(1, min(torch.get_num_threads(), cores - cfg.data.num_workers))


def dali_threads(setting: int, local_world_size: int = 1) -> int:
    """data.dali_threads, 0 resolved: the cores this rank may run on.

    Not torch's thread count: torchrun sets OMP_NUM_THREADS=1 for every rank when it starts
    more than one, which left one DALI thread to read the tars and Huffman-decode what the
    hardware decoder does not take. A launcher that binds ranks to cores (Slurm's
    --cpu-bind, torchrun's --numa-binding) gives each rank its own affinity mask; an unbound
    rank sees every core of the node and takes its share of them."""
    if setting:
        return setting
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        allowed = os.cpu_count() or 1
    if allowed >= (os.cpu_count() or allowed):
        allowed //= max(1, local_world_size)
    return max(1, allowed)


def build_loaders(
    cfg: Config,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    local_world_size: int = 1,
    with_train: bool = True,
) -> tuple[Loader, Loader]:
    """The (train, val) loaders of the backend the config resolves to (with_train=False:
    (None, val), for evaluation). Each backend is
    imported only when chosen: torchvision's import (which pulls in torch._dynamo) costs
    2-3 s of CPU per rank and run that a DALI run does not need, and the reverse for DALI."""
    train_set, val_set = resolve_shard_sets(cfg)
    train_set = train_set if with_train else None
    return _loaders(cfg, device, rank, world_size, local_world_size, train_set, val_set)


def build_eval_loader(
    cfg: Config,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    local_world_size: int = 1,
    split: str = "val",
    keys: bool = False,
) -> Loader:
    """An evaluation loader (every sample once over all ranks, the validation transform) of
    the val or the train split; keys=True: it yields KeyedBatches (distres.results.ledger)."""
    train_set, val_set = resolve_shard_sets(cfg)
    shards = val_set if split == "val" else train_set
    return _loaders(cfg, device, rank, world_size, local_world_size, None, shards, keys)[1]


def _loaders(
    cfg: Config,
    device: torch.device,
    rank: int,
    world_size: int,
    local_world_size: int,
    train_set: ShardSet | None,
    val_set: ShardSet,
    keys: bool = False,
) -> tuple[Loader | None, Loader]:
    """The config's loaders: one LoaderSpec each (training's, evaluation's), the backend's
    loader built from it."""
    d = cfg.data
    common = dict(
        mean=tuple(d.mean),
        std=tuple(d.std),
        num_classes=cfg.model.num_classes,
        in_chans=cfg.model.in_chans,
        device=device,
        channels_last=cfg.train.channels_last,
        seed=cfg.run.seed,
        rank=rank,
        world_size=world_size,
        skip_bad=d.on_bad_sample == "skip",
        verify=d.verify_checksums,
        batch_size=cfg.train.batch_size,
        out_dtype=input_dtype(device, resolve_precision(cfg.train.precision, device)),
        shuffle_buffer=d.shuffle_buffer,
    )
    dali = resolve_backend(d.backend) == "dali"
    if dali:
        from distres.data.dali.loader import DaliLoader as make

        common["threads"] = dali_threads(d.dali_threads, local_world_size)
    else:
        from distres.data.torch.gpu_decode import resolve_decode
        from distres.data.torch.loader import ShardLoader as make

        common["num_workers"] = d.num_workers
        common["streams"], common["window"] = d.streams, d.stream_window
        common["decode"] = resolve_decode(d.decode, device, d.auto_augment)
    train = None
    if train_set is not None:
        train = make(LoaderSpec(
            train_set, train=True, image_size=d.image_size,
            size_at=d.train_size,  # image_size every epoch unless progressive resizing
            epochs=cfg.train.epochs, random_resized_crop=d.random_resized_crop,
            rrc_min_scale=d.rrc_min_scale, crop_padding=d.crop_padding, hflip=d.hflip,
            auto_augment=(d.auto_augment, d.ra_magnitude, d.ra_num_ops),
            repeats=d.aug_repeats, **{**common, "keys": cfg.tracking.sample_log},
        ))  # fmt: skip
    # evaluation at its own size (data.val_size), training's from image_size
    val = make(LoaderSpec(val_set, train=False, image_size=d.eval_size,
                          val_resize=d.val_resize, keys=keys, **common))  # fmt: skip
    return train, val


def position_problem(state: object) -> str | None:
    """Why a loader's saved position would not restore, whichever backend wrote it (a
    DALI position carries the pipeline's own checkpoint, checked by the DALI side)."""
    from distres.data import api

    problem = api.position_problem(state)
    if problem is None and isinstance(state, dict) and state.get("dali") is not None:
        from distres.data.dali.index import position_problem as dali_problem

        problem = dali_problem(state["dali"])
    return problem
