import io
import json
import tarfile
from collections import Counter

import pytest
import torch

from distres.config import load_config
from distres.data import build_loaders, resolve_shard_sets
from distres.data.api import DataError, shard_order
from distres.data.shards.digits import DIGITS_VAL_SIZE
from distres.data.shards.manifest import ShardError
from distres.data.shards.read import read_shard_set
from distres.data.shards.write import write_shards
from distres.data.spec import LoaderSpec
from distres.data.torch.loader import ShardLoader
from distres.data.torch.transforms import val_transform


def make_loaders(*overrides, rank=0, world_size=1):
    """The torch backend's loaders (test_dali.py covers DALI and both side by side)."""
    cfg = load_config(None, ["data.backend=torch", *overrides])
    return build_loaders(cfg, torch.device("cpu"), rank, world_size)


def test_digits_shards_manifest(digits_dirs):
    train_dir, val_dir = digits_dirs
    train, val = read_shard_set(train_dir), read_shard_set(val_dir)
    assert train.num_samples + val.num_samples == 1797
    assert val.num_samples == DIGITS_VAL_SIZE
    assert train.num_classes == val.num_classes == 10
    manifest = json.loads((train_dir / "manifest.json").read_text())
    assert sum(s["samples"] for s in manifest["shards"]) == manifest["num_samples"]
    assert all(len(s["sha256"]) == 64 for s in manifest["shards"])
    # Each tar holds .jpg + .cls pairs, and the counts agree with the manifest.
    with tarfile.open(train.urls[0]) as tar:
        names = tar.getnames()
    assert len(names) == 2 * train.counts[0]
    assert {n.rsplit(".", 1)[1] for n in names} == {"jpg", "cls"}


def test_digits_build_is_reproducible(tmp_path, digits_dirs):
    from distres.data.shards.digits import digits

    again, _ = digits(tmp_path)
    first = json.loads((digits_dirs[0] / "manifest.json").read_text())
    second = json.loads((again / "manifest.json").read_text())
    assert [s["sha256"] for s in first["shards"]] == [s["sha256"] for s in second["shards"]]


def test_batch_contract():
    train, _val = make_loaders()
    batch = next(iter(train))
    assert batch.images.shape == (64, 3, 32, 32)
    assert batch.images.dtype == torch.float32
    assert batch.images.is_contiguous(memory_format=torch.channels_last)
    assert batch.labels.dtype == torch.int64
    assert batch.labels.min() >= 0 and batch.labels.max() < 10
    # Normalised: roughly zero-centred, not 0..255.
    assert -3 < batch.images.mean() < 3 and batch.images.abs().max() < 10
    nchw, _ = make_loaders("train.channels_last=false")
    assert next(iter(nchw)).images.is_contiguous()


def test_train_epoch_drops_partial_batch_and_val_counts_every_sample_once():
    train, val = make_loaders("train.batch_size=100")
    sizes = [len(b.labels) for b in train]
    assert sizes == [100] * (1436 // 100) == [100] * len(train)
    val_labels = torch.cat([b.labels for b in val])
    assert len(val_labels) == DIGITS_VAL_SIZE
    # The val set is read whole and in order: same labels as the manifest order every time.
    assert torch.equal(val_labels, torch.cat([b.labels for b in val]))


def test_order_is_deterministic_and_changes_with_epoch():
    train, _ = make_loaders()
    first = torch.cat([b.labels for b in train])
    again = torch.cat([b.labels for b in make_loaders()[0]])
    assert torch.equal(first, again)
    train.set_epoch(1)
    second = torch.cat([b.labels for b in train])
    assert not torch.equal(first, second)
    # Same samples, other order (the dropped remainder differs by at most one batch).
    assert sum((Counter(first.tolist()) & Counter(second.tolist())).values()) >= len(first) - 64


def test_shard_order_shared_by_ranks_and_streams_split_disjoint(digits_dirs):
    shards, _ = resolve_shard_sets(load_config())
    for epoch in range(3):
        order = shard_order(shards, epoch, seed=0, shuffle=True)
        assert sorted(order) == list(range(len(shards.urls)))
        loaders = [
            ShardLoader(
                LoaderSpec(
                    shards,
                    train=True,
                    batch_size=8,
                    transform=val_transform(32, 0),
                    mean=[0.5],
                    std=[0.5],
                    num_classes=10,
                    rank=r,
                    world_size=3,
                    seed=0,
                )
            )
            for r in range(3)
        ]
        c = loaders[0].streams
        parts = [ld.order(epoch).rank_streams(0, r, 3) for r, ld in enumerate(loaders)]
        assert sorted(s for p in parts for s in p) == list(range(c))  # disjoint, covering
        o = loaders[0].order(epoch)
        covered = [
            (i, a) for s in range(c) for i, first, last in o.pieces(*o.range(s))
            for a in range(first, last)
        ]  # fmt: skip
        assert len(covered) == len(set(covered)) == o.positions
    assert shard_order(shards, 0, 0, True) != shard_order(shards, 1, 0, True)


def test_workers_give_the_same_batches_as_the_main_process():
    main = [b.labels for b in make_loaders("data.num_workers=0")[1]]
    workers = [b.labels for b in make_loaders("data.num_workers=2")[1]]
    assert Counter(torch.cat(main).tolist()) == Counter(torch.cat(workers).tolist())


def _jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, format="JPEG")
    return buf.getvalue()


def _loader(shard_dir, num_classes=10):
    return ShardLoader(
        LoaderSpec(
            read_shard_set(shard_dir),
            train=False,
            batch_size=4,
            transform=val_transform(32, 0),
            mean=[0.5],
            std=[0.5],
            num_classes=num_classes,
        )
    )


def _ten_class_shard(out, samples):
    """One shard `x-000000.tar` holding `samples`, with digits' ten classes."""
    write_shards(samples, out, "x", {str(i): i for i in range(10)}, 10)


def test_label_out_of_range_names_shard_and_key(tmp_path):
    _ten_class_shard(tmp_path, [("a", _jpeg(), 1), ("bad-key", _jpeg(), 12)])
    with pytest.raises(DataError, match=r"x-000000\.tar: sample 'bad-key': label 12 outside"):
        list(_loader(tmp_path))


def test_corrupt_image_names_shard_and_key(tmp_path):
    _ten_class_shard(tmp_path, [("ok", _jpeg(), 1), ("broken", b"\xff\xd8 not a jpeg", 2)])
    with pytest.raises(DataError, match=r"sample 'broken': cannot decode"):
        list(_loader(tmp_path))


def test_missing_listed_shard_and_missing_manifest(tmp_path):
    write_shards([(str(i), _jpeg(), 1) for i in range(4)], tmp_path, "x", {"a": 0, "b": 1}, 2)
    (tmp_path / "x-000001.tar").unlink()
    with pytest.raises(ShardError, match=r"x-000001\.tar: listed in .* but missing"):
        read_shard_set(tmp_path)
    with pytest.raises(ShardError, match="elsewhere: no such shard"):
        read_shard_set(tmp_path / "elsewhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match=r"empty: no manifest\.json and no \.tar files"):
        read_shard_set(tmp_path / "empty")


def test_streams_that_ranks_or_data_cannot_share_are_a_clear_error(tmp_path):
    write_shards([(str(i), _jpeg(), 1) for i in range(6)], tmp_path, "x", {"a": 0, "b": 1}, 4)

    def loader(streams: int, world: int) -> ShardLoader:
        return ShardLoader(LoaderSpec(
            read_shard_set(tmp_path), train=True, batch_size=2, transform=val_transform(32, 0),
            mean=[0.5], std=[0.5], num_classes=2, world_size=world, streams=streams,
        ))  # fmt: skip

    with pytest.raises(DataError, match=r"6 training samples for data\.streams=8"):
        loader(8, 1)
    with pytest.raises(
        DataError, match=r"data.streams=4 .* over 3 ranks; world sizes that continue it "
        r"exactly: 1, 2, 4$"
    ):  # fmt: skip
        loader(4, 3)
    assert loader(0, 3).streams == 3  # auto: what the data allows


def test_torch_backend_position_resumes_mid_epoch_exactly():
    train, _ = make_loaders("data.backend=torch", "train.batch_size=32")
    train.set_epoch(2)
    it = iter(train)
    for _ in range(5):
        next(it)
    state = train.state_dict()
    assert (state["epoch"], state["batches"], state["position"]) == (2, 5, 5 * 32)
    assert sum(slot for _, slot in state["slots"]) == 5 * 32  # no bad sample: one slot each
    rest = list(it)
    restored, _ = make_loaders("data.backend=torch", "train.batch_size=32")
    restored.load_state_dict(state)
    replay = list(restored)
    assert len(replay) == len(rest) == len(train) - 5
    for a, b in zip(rest, replay, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


@pytest.mark.parametrize("drop_last", [True, False])
def test_rebatch_cuts_uneven_chunks_into_exact_batches(drop_last):
    """Workers hand over chunks of any size (the last of a shard is short); batches straddle
    them, keep the order, and the tail is dropped only for training."""
    from distres.data.buffers import rebatch

    gen = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, 45, (40,), generator=gen).tolist()
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    chunks = [
        (
            torch.arange(a, a + n).view(-1, 1, 1, 1).expand(-1, 2, 2, 3).clone(),
            torch.arange(a, a + n),
        )
        for a, n in zip(starts, sizes, strict=True)
    ]
    batches = list(rebatch(iter(chunks), 32, drop_last=drop_last))
    total = sum(sizes)
    kept = total // 32 * 32 if drop_last else total
    assert [len(y) for _, y in batches[:-1]] == [32] * (len(batches) - 1)
    assert torch.equal(torch.cat([y for _, y in batches]), torch.arange(kept))
    assert torch.equal(torch.cat([x[:, 0, 0, 0] for x, _ in batches]), torch.arange(kept))
    # each batch owns its memory: no view into a worker's chunk outlives the hand-over
    storages = {x.untyped_storage().data_ptr() for x, _ in batches}
    assert len(storages) == len(batches)


def test_jpeg_decoder_falls_back_to_torchvision_without_torchcodec(monkeypatch):
    """A cluster image whose torch differs from the one torchcodec was built for cannot load
    torchcodec; the torch backend still decodes, through torchvision.io, to the same pixels."""
    import builtins

    from PIL import Image

    from distres.data.torch import transforms as torch_loader

    real_import = builtins.__import__

    def no_torchcodec(name, *args, **kwargs):
        if name.startswith("torchcodec"):
            raise ImportError("torchcodec cannot load here")
        return real_import(name, *args, **kwargs)

    buf = io.BytesIO()
    pixels = torch.randint(
        0, 255, (24, 40, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    Image.fromarray(pixels.numpy()).save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    expected = torch_loader.decode_jpeg(data, mode="RGB")
    monkeypatch.setattr(builtins, "__import__", no_torchcodec)
    fallback = torch_loader._jpeg_decoder()
    assert fallback is not torch_loader.decode_jpeg
    got = fallback(data, mode="RGB")
    assert got.shape == (3, 24, 40) and got.dtype == torch.uint8
    # both are libjpeg-turbo; allow an IDCT rounding difference of one level
    assert (got.int() - expected.int()).abs().max() <= 1
    assert fallback(data, mode="GRAY").shape == (1, 24, 40)


def test_gpu_rank_main_process_leaves_the_cores_to_its_decode_workers(monkeypatch):
    """On a GPU rank whose DataLoader workers decode (data.backend=torch), the main process's
    intra-op threads are cut to the cores the workers leave; explicit settings win."""
    from distres.data.build import host_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    cuda = torch.device("cuda", 0)
    cfg = load_config(None, ["data.backend=torch", "data.num_workers=14"])
    assert host_threads(cfg, cuda) == 2
    assert host_threads(cfg, torch.device("cpu")) is None  # the main process trains there
    assert host_threads(cfg, cuda, local_world_size=2) == 1  # 8 cores per rank, 14 workers
    assert host_threads(load_config(None, ["data.backend=torch", "run.threads=6",
                                           "data.num_workers=14"]), cuda) is None  # fmt: skip
    assert host_threads(load_config(None, ["data.backend=torch"]), cuda) is None  # no workers
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert host_threads(cfg, cuda) is None
