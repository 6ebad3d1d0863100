"""The torch backend's training order (data/torch/order.py): a function of (seed, epoch,
data.streams), never of the world size or the worker count; a position that any world size
dividing the stream count continues exactly; reads in tar order."""

from __future__ import annotations

import io
import itertools
import json
import tarfile

import pytest
import torch
from PIL import Image

from distres.config import load_config
from distres.data import build_loaders
from distres.data.shards.read import read_shard_set
from distres.data.shards.write import write_shards
from distres.data.spec import LoaderSpec
from distres.data.torch.loader import ShardLoader
from distres.data.torch.order import EpochOrder
from distres.data.torch.stream import tar_samples
from distres.data.torch.transforms import train_transform


def digits(rank: int, world: int, *overrides: str):
    cfg = load_config(None, ["data.backend=torch", "data.streams=24", *overrides])
    return build_loaders(cfg, torch.device("cpu"), rank, world)[0]


def interleaved(per_rank: list[list]) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Every rank's batches put back in position order (rank r holds positions r, r+W, ...)."""
    cat = [
        (torch.cat([b.images for b in bs]), torch.cat([b.labels for b in bs]),
         [k for b in bs for k in b.keys])
        for bs in per_rank
    ]  # fmt: skip
    images = torch.stack([c[0] for c in cat], 1).flatten(0, 1)
    labels = torch.stack([c[1] for c in cat], 1).flatten()
    keys = [k for row in zip(*(c[2] for c in cat), strict=True) for k in row]
    return images, labels, keys


def epoch_of(world: int, workers: int, epoch: int = 1, batch: int = 16) -> tuple:
    per_rank = []
    for r in range(world):
        loader = digits(r, world, f"data.num_workers={workers}", f"train.batch_size={batch}",
                        "tracking.sample_log=true")  # fmt: skip
        loader.set_epoch(epoch)
        per_rank.append(list(loader))
    return interleaved(per_rank)


def test_the_order_and_the_augmentation_do_not_depend_on_ranks_or_workers():
    images, labels, keys = epoch_of(1, 0)
    assert len(keys) == len(set(keys)) == 24 * (1436 // 24) // 16 * 16  # once each
    for world, workers in ((2, 2), (3, 1)):
        x, y, k = epoch_of(world, workers)
        n = len(k)  # the tail a bigger global batch cannot fill is left out
        assert n >= len(keys) - world * 16
        assert k == keys[:n] and torch.equal(y, labels[:n]) and torch.equal(x, images[:n])
    again = epoch_of(1, 0, epoch=2)[2]
    # each epoch its own order (and its own few samples left out)
    assert len(set(again) & set(keys)) >= len(keys) - 40 and again[:100] != keys[:100]


@pytest.mark.parametrize(("old", "new"), [(2, 3), (3, 1), (2, 2)])
def test_a_position_continues_exactly_on_another_world_size(old, new):
    keys = epoch_of(1, 0, batch=8)[2]
    states, taken = [], []
    for r in range(old):  # 3 batches of 24 // old samples on each old rank
        loader = digits(r, old, "data.num_workers=2", f"train.batch_size={24 // old}",
                        "tracking.sample_log=true")  # fmt: skip
        loader.set_epoch(1)
        taken.append(list(itertools.islice(iter(loader), 3)))
        states.append(json.loads(json.dumps(loader.state_dict())))  # as the checkpoint holds it
    first = interleaved(taken)[2]
    position = states[0]["position"]
    assert position == len(first) == 72 and first == keys[:72]
    rest, lefts = [], []
    for r in range(new):
        loader = digits(r, new, "data.num_workers=1", f"train.batch_size={24 // new}",
                        "tracking.sample_log=true")  # fmt: skip
        lefts.append(loader.resume_from_ranks(1, states, 24 // old, old))
        rest.append(list(loader))
        assert loader.state_dict()["position"] == loader.order(1).positions // 24 * 24
    assert len(set(lefts)) == 1
    after = interleaved(rest)[2]
    assert first + after == keys[: len(first) + len(after)]
    assert len(first) + len(after) == 24 * (1436 // 24) // 24 * 24


def _jpeg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value, value, value)).save(buf, format="JPEG")
    return buf.getvalue()


def test_a_bad_sample_takes_its_slot_and_the_position_stays_exact(tmp_path):
    samples = [(f"s{k:03d}", _jpeg(k) if k != 13 else b"\xff\xd8 broken", k % 4)
               for k in range(96)]  # fmt: skip
    write_shards(samples, tmp_path, "x", {str(i): i for i in range(4)}, 10)

    def loader(rank: int, world: int, batch: int) -> ShardLoader:
        return ShardLoader(LoaderSpec(
            read_shard_set(tmp_path), train=True, batch_size=batch, mean=[0.5], std=[0.5],
            num_classes=4, transform=train_transform(8, False, 0.08, 2, True), rank=rank,
            world_size=world, skip_bad=True, keys=True, streams=4, window=5,
        ))  # fmt: skip

    whole = loader(0, 1, 4)
    keys = [k for b in whole for k in b.keys]
    # the bad sample's stream is one short: it reads its range again for the last position
    assert len(keys) == 96 and len(set(keys)) == 95 and whole.skipped == 1
    assert 13 not in [k.at + 10 * k.shard for k in keys]  # (10 samples a shard)
    # two ranks stop after 5 batches of 2 (the bad sample is behind them), one continues
    states, taken = [], []
    for r in range(2):
        part = loader(r, 2, 2)
        taken.append(list(itertools.islice(iter(part), 5)))
        states.append(part.state_dict())
    one = loader(0, 1, 4)
    one.resume_from_ranks(0, states, 2, 2)
    assert interleaved(taken)[2] + [k for b in one for k in b.keys] == keys


def test_repeated_augmentation_gives_each_sample_to_different_ranks():
    per_rank = []
    for r in range(2):
        loader = digits(r, 2, "data.aug_repeats=2", "tracking.sample_log=true")
        loader.set_epoch(0)
        per_rank.append([k for b in loader for k in b.keys])
    both = per_rank[0] + per_rank[1]
    assert all(n == 2 for n in itertools.chain(
        {k: both.count(k) for k in both}.values()))  # fmt: skip
    assert per_rank[0] == per_rank[1]  # a sample's two copies: both ranks, the same step


def test_epoch_order_pieces_windows_and_consumed_counts():
    o = EpochOrder([5, 0, 7, 3], [2, 1, 0, 3], streams=3, window=2, seed=0, epoch=0)
    assert o.length == 5 and o.positions == 15
    assert [o.pieces(*o.range(s)) for s in range(3)] == [
        [(2, 0, 5)],
        [(2, 5, 7), (0, 0, 3)],
        [(0, 3, 5), (3, 0, 3)],
    ]
    assert sorted(o.permutation(0, 0, 2)) == [0] and sorted(o.permutation(0, 0, 0)) == [0, 1]
    assert o.shards_from(1, 0) == [2, 0] and o.shards_from(1, 2) == [0]  # window 1: shard 0
    assert o.shards_from(1, 5) == [2, 0]  # a re-read starts over
    assert o.consumed(7) == [3, 2, 2] and o.rank_streams(7, 0, 1) == [1, 2, 0]
    assert [o.rank_streams(7, r, 3) for r in range(3)] == [[1], [2], [0]]
    assert o.sample_seed(1, 4) != o.sample_seed(1, 5)


def test_tar_samples_from_a_start_reads_headers_only(tmp_path):
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("__meta__", b"x")
        for k in range(7):
            stem = f"{'d' * 120}/k{k}" if k == 3 else f"k{k}"  # a GNU/pax long name too
            add(f"{stem}.jpg", bytes([k]) * 600)
            add(f"{stem}.cls", b"1")
        tar.addfile(tarfile.TarInfo("dir/"))
    with path.open("rb") as f:
        whole = [s["__key__"] for s in tar_samples(f, "t.tar")]
    assert len(whole) == 7
    for start in range(9):
        with path.open("rb") as f:
            assert [s["__key__"] for s in tar_samples(f, "t.tar", start)] == whole[start:]
