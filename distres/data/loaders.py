"""Loaders for a config: the (train, val) shard sets and their per-rank ShardLoaders."""

from __future__ import annotations

import torch

from distres.config import Config
from distres.data.datasets import digits
from distres.data.shards import ShardSet, read_shard_set
from distres.data.torch_loader import ShardLoader, train_transform, val_transform


def resolve_shard_sets(cfg: Config) -> tuple[ShardSet, ShardSet]:
    """The (train, val) shard sets the config names, building a built-in one if needed."""
    if cfg.data.dataset == "digits":
        train_dir, val_dir = digits(cfg.data.cache_dir or None)
        return read_shard_set(train_dir), read_shard_set(val_dir)
    return read_shard_set(cfg.data.train_shards), read_shard_set(cfg.data.val_shards)


def build_loaders(
    cfg: Config, device: torch.device, rank: int = 0, world_size: int = 1
) -> tuple[ShardLoader, ShardLoader]:
    train_set, val_set = resolve_shard_sets(cfg)
    d = cfg.data
    common = dict(
        mean=d.mean,
        std=d.std,
        num_classes=cfg.model.num_classes,
        in_chans=cfg.model.in_chans,
        device=device,
        channels_last=cfg.train.channels_last,
        num_workers=d.num_workers,
        seed=cfg.run.seed,
        rank=rank,
        world_size=world_size,
    )
    train = ShardLoader(
        train_set,
        train=True,
        batch_size=cfg.train.batch_size,
        shuffle_buffer=d.shuffle_buffer,
        transform=train_transform(
            d.image_size, d.random_resized_crop, d.rrc_min_scale, d.crop_padding, d.hflip
        ),
        **common,
    )
    val = ShardLoader(
        val_set,
        train=False,
        batch_size=cfg.train.batch_size,
        transform=val_transform(d.image_size, d.val_resize),
        **common,
    )
    return train, val
