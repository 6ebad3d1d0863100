"""The DALI backend on CPU (device_id=None), against the torch backend and its own rules."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import pytest
import torch

from distres.config import load_config
from distres.data import build_loaders
from distres.data.dali.loader import DaliLoader, dali_available
from distres.data.spec import LoaderSpec

types = pytest.importorskip("nvidia.dali.types")

pytestmark = pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed")


def loaders(backend, *overrides, rank=0, world_size=1):
    cfg = load_config(None, [f"data.backend={backend}", *overrides])
    return build_loaders(cfg, torch.device("cpu"), rank, world_size)


def labels_of(loader):
    return Counter(torch.cat([b.labels for b in loader]).tolist())


def test_auto_picks_dali_where_it_imports():
    train, val = loaders("auto")
    assert isinstance(train, DaliLoader) and isinstance(val, DaliLoader)


def test_both_backends_honour_the_batch_contract():
    for backend in ("dali", "torch"):
        train, val = loaders(backend)
        for loader, n in ((train, 64), (val, 64)):
            batch = next(iter(loader))
            assert batch.images.shape == (n, 3, 32, 32), backend
            assert batch.images.dtype == torch.float32
            assert batch.images.is_contiguous(memory_format=torch.channels_last), backend
            assert batch.labels.dtype == torch.int64
            assert -3 < float(batch.images.mean()) < 3
    nchw, _ = loaders("dali", "train.channels_last=false")
    assert next(iter(nchw)).images.is_contiguous()


def test_both_backends_give_the_same_labels_per_epoch():
    # Batch 4 and 4 streams divide the 1,436 training samples: nothing is dropped by either
    # backend.
    dali_train, dali_val = loaders("dali", "train.batch_size=4")
    torch_train, torch_val = loaders("torch", "train.batch_size=4", "data.streams=4")
    assert labels_of(dali_train) == labels_of(torch_train)
    assert sum(labels_of(dali_train).values()) == 1436
    assert labels_of(dali_val) == labels_of(torch_val)
    assert sum(labels_of(dali_val).values()) == 361


@pytest.mark.parametrize("world", [2, 3])
def test_rank_parts_are_disjoint_and_cover_the_data(world):
    full_train, full_val = loaders("dali", "train.batch_size=1")
    want_train, want_val = labels_of(full_train), labels_of(full_val)
    got_train, got_val, steps = Counter(), Counter(), set()
    for rank in range(world):
        train, val = loaders("dali", "train.batch_size=1", rank=rank, world_size=world)
        starts_ends = [train.part(r) for r in range(world)]
        assert starts_ends[0][0] == 0 and starts_ends[-1][1] == 1436
        assert all(a[1] == b[0] for a, b in itertools.pairwise(starts_ends))
        if 1436 % world == 0:
            got_train += labels_of(train)
        steps.add(len(train))
        got_val += labels_of(val)
    assert len(steps) == 1  # every rank runs the same number of steps
    assert got_val == want_val  # each val sample exactly once over the ranks
    if 1436 % world == 0:
        assert got_train == want_train


def test_order_changes_with_epoch_and_is_reproducible():
    first = [b.labels for b in loaders("dali")[0]]
    again = [b.labels for b in loaders("dali")[0]]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    train, _ = loaders("dali")
    train.set_epoch(1)
    second = [b.labels for b in train]
    assert not all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_checkpoint_mid_epoch_reproduces_the_following_batches():
    train, _ = loaders("dali", "train.batch_size=32")
    train.set_epoch(3)
    it = iter(train)
    for _ in range(7):
        next(it)
    state = train.state_dict()
    assert state["epoch"] == 3 and state["batches"] == 7 and state["dali"]
    rest = list(it)
    assert len(rest) == len(train) - 7

    restored, _ = loaders("dali", "train.batch_size=32")
    restored.load_state_dict(state)
    replay = list(restored)
    assert len(replay) == len(rest)
    for a, b in zip(rest, replay, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_val_pads_nothing_into_the_counts():
    _, val = loaders("dali", "train.batch_size=100")
    sizes = [len(b.labels) for b in val]
    assert sizes == [100, 100, 100, 61]


def test_missing_index_is_built_in_the_cache(tmp_path, digits_dirs, data_cache):
    import shutil

    shutil.copytree(digits_dirs[1], tmp_path / "val")
    for idx in (tmp_path / "val").glob("*.idx"):
        idx.unlink()
    _, val = loaders(
        "dali",
        "data.dataset=shards",
        f"data.train_shards={digits_dirs[0]}",
        f"data.val_shards={tmp_path / 'val'}",
        "train.batch_size=4",
    )
    _, reference = loaders("dali", "train.batch_size=4")
    assert labels_of(val) == labels_of(reference)
    assert all(Path(p).is_relative_to(data_cache) for p in val.index_paths)
    assert not list((tmp_path / "val").glob("*.idx"))  # nothing written beside the shards


def _tiny_set(tmp_path, members):
    """A shard of (key, {ext: bytes}) samples written with webdataset's own TarWriter."""
    import webdataset as wds

    tmp_path.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(tmp_path / "x-000000.tar"), mtime=0.0) as w:
        for key, parts in members:
            w.write({"__key__": key, **parts})
    return tmp_path / "x-000000.tar"


def _jpeg_bytes(value=0):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (value, value, value)).save(buf, format="JPEG")
    return buf.getvalue()


def _dali(shards, policy="error"):
    from distres.data.shards.read import read_shard_set

    return DaliLoader(
        LoaderSpec(
            read_shard_set(shards),
            train=False,
            batch_size=4,
            image_size=32,
            mean=[0.5],
            std=[0.5],
            num_classes=10,
            skip_bad=policy == "skip",
        )
    )


def _six_with_a_gap(tmp_path):
    good = [(f"g{i}", {"jpg": _jpeg_bytes(i), "cls": str(i).encode()}) for i in range(6)]
    return _tiny_set(tmp_path, [*good[:3], ("no-label", {"jpg": _jpeg_bytes()}), *good[3:]])


def test_missing_cls_names_shard_and_key_or_is_skipped(tmp_path, capfd):
    from distres.data.api import DataError

    tar = _six_with_a_gap(tmp_path / "a")
    with pytest.raises(DataError, match=r"x-000000\.tar: sample 'no-label': no \.cls member"):
        _dali(tar)
    loader = _dali(tar, "skip")
    assert sorted(labels_of(loader).elements()) == [0, 1, 2, 3, 4, 5]
    assert loader.skipped == 1 and "no-label" in capfd.readouterr().err


def test_truncated_tar_names_the_shard_or_skips_its_tail(tmp_path, capfd):
    import shutil

    from distres.data.api import DataError
    from distres.data.shards.read import read_shard_set

    good = [(f"g{i}", {"jpg": _jpeg_bytes(i), "cls": str(i).encode()}) for i in range(8)]
    tar = _tiny_set(tmp_path / "a", good)
    _dali(tar)  # builds the index of the whole tar (in the cache)
    index = read_shard_set(tar).dali_index(0)
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copy(index, cut / "x-000000.idx")  # the index of the whole tar, the tar cut short
    (cut / "x-000000.tar").write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    with pytest.raises(DataError, match=r"cut/x-000000\.tar: sample 'g\d': lies past the end"):
        _dali(cut / "x-000000.tar")
    loader = _dali(cut / "x-000000.tar", "skip")
    got = sorted(labels_of(loader).elements())
    assert 1 <= len(got) < 8 and got == list(range(len(got)))
    assert loader.skipped == 8 - len(got) and "lies past the end" in capfd.readouterr().err


def test_foreign_jpeg_extension_is_read(tmp_path):
    samples = [(f"k{i}", {"jpeg": _jpeg_bytes(i), "cls": str(i).encode()}) for i in range(5)]
    tar = _tiny_set(tmp_path, samples)
    assert sorted(labels_of(_dali(tar)).elements()) == [0, 1, 2, 3, 4]


def test_corrupt_jpeg_is_a_data_error_naming_the_shard_set(tmp_path):
    import io

    from PIL import Image

    from distres.data.api import DataError
    from distres.data.shards.write import write_shards

    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="JPEG")
    write_shards(
        [("a", buf.getvalue(), 1), ("broken", b"\xff\xd8 not a jpeg", 2)],
        tmp_path,
        "x",
        {str(i): i for i in range(10)},
        10,
    )
    loader = _dali(tmp_path)
    with pytest.raises(
        DataError, match=r"x-000000\.tar: sample 'broken': cannot decode image .* DALI pipeline"
    ):
        list(loader)


def test_label_out_of_range_names_shard_and_key(tmp_path):
    import io

    from PIL import Image

    from distres.data.api import DataError
    from distres.data.shards.write import write_shards

    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="JPEG")
    write_shards(
        [("a", buf.getvalue(), 1), ("bad-key", buf.getvalue(), 12)],
        tmp_path,
        "x",
        {str(i): i for i in range(10)},
        10,
    )
    loader = _dali(tmp_path)
    with pytest.raises(DataError, match=r"x-000000\.tar: sample 'bad-key': label 12 outside"):
        list(loader)


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_batches_kept_by_the_caller_are_never_overwritten(backend):
    # Both backends reuse host memory (DALI's reference-counted outputs, the torch backend's
    # buffer pool); a batch still referenced, as with grad accumulation, must stay intact
    # through later batches and the next epoch.
    train, _ = loaders(backend)
    kept = []
    for epoch in range(2):
        train.set_epoch(epoch)
        for batch in itertools.islice(train, 12):
            kept.append((batch.images, batch.images.clone()))
    assert all(torch.equal(held, copy) for held, copy in kept)
    assert len({held.data_ptr() for held, _ in kept}) == len(kept)


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_released_batch_memory_is_reused(backend):
    train, _ = loaders(backend)
    seen = set()
    for batch in itertools.islice(train, 12):
        seen.add(batch.images.data_ptr())
        del batch
    assert len(seen) < 12  # no fresh allocation (and page faults) per batch


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_progressive_resizing_changes_the_training_size_per_epoch(backend):
    """Each epoch trains at data.train_size(epoch) (both backends build a new pipeline or
    worker pool per epoch); validation stays at data.image_size."""
    train, val = loaders(
        backend,
        "data.random_resized_crop=true",
        "data.progressive_min_size=16",
        "data.progressive_epochs=[1,3]",
        "data.progressive_step=8",
    )
    sizes = []
    for epoch in range(4):
        train.set_epoch(epoch)
        batches = list(train)
        assert len(batches) == len(train)
        assert len({b.images.shape for b in batches}) == 1
        sizes.append(batches[0].images.shape[-1])
        assert batches[0].images.is_contiguous(memory_format=torch.channels_last)
    assert sizes == [16, 16, 24, 32]
    assert next(iter(val)).images.shape[-1] == 32


def _ops(pipe) -> dict[str, dict[str, str]]:
    """Every operator of a defined (not built) pipeline: schema name -> {argument: value},
    plus its output device, read from DALI's own OpSpec."""
    pipe._build_graph()
    ops, todo, seen = {}, list(pipe._graph_outputs), set()
    while todo:
        node = todo.pop()
        op = node.source
        if id(op) in seen:
            continue
        seen.add(id(op))
        lines = repr(op.spec).splitlines()
        name = lines[0].removeprefix("OpSpec for ").rstrip(":")
        args = dict(x.strip().split(": ", 1) for x in lines if x.startswith("    ") and ": " in x)
        ops[name] = {**args, "output_device": node.device}
        todo.extend(op.inputs)
    return ops


@pytest.mark.parametrize("train", [True, False])
def test_the_gpu_graph_as_defined(train, monkeypatch):
    """The graph a GPU run builds, inspected on this CPU machine without building it: the
    mixed (nvJPEG) decoder with NVIDIA's ImageNet settings, the images leave on the GPU in
    fp16, and the pipeline gets the threads dali_threads gives it, not torchrun's
    OMP_NUM_THREADS=1."""
    from distres.data.build import dali_threads

    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # as under torchrun
    cfg = load_config(None, ["data.backend=dali", "train.precision=bf16",
                             "data.random_resized_crop=true", "data.hflip=true"])  # fmt: skip
    train_l, val_l = build_loaders(cfg, torch.device("cpu"))
    loader = train_l if train else val_l
    loader.device = torch.device("cuda", 0)
    loader.out_dtype = torch.float16
    pipe = loader._pipeline()
    assert pipe.device_id == 0
    assert pipe.num_threads == loader.threads == dali_threads(0) >= 1
    ops = _ops(pipe)
    decoder = ops["decoders__ImageRandomCrop" if train else "decoders__Image"]
    assert decoder["device"] == "mixed" and decoder["output_device"] == "gpu"
    assert float(decoder["hw_decoder_load"]) == pytest.approx(0.99)
    assert int(decoder["preallocate_width_hint"]) == 5980
    normalize = ops["CropMirrorNormalize"]
    assert normalize["output_device"] == "gpu" and normalize["output_layout"] == "HWC"
    assert int(normalize["dtype"]) == int(types.FLOAT16)


def test_dali_threads_follow_the_affinity_mask(monkeypatch):
    from distres.data import build as mod

    monkeypatch.setattr(mod.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(mod.os, "sched_getaffinity", lambda pid: set(range(16)))
    assert mod.dali_threads(0, 1) == 16
    assert mod.dali_threads(0, 8) == 2  # unbound ranks share the node's cores
    monkeypatch.setattr(mod.os, "sched_getaffinity", lambda pid: {4, 5, 6})
    assert mod.dali_threads(0, 8) == 3  # a bound rank has its own cores
    assert mod.dali_threads(5, 8) == 5  # data.dali_threads wins


def test_no_pipeline_is_prefetched_past_the_last_epoch():
    train, _ = loaders("dali", "train.epochs=2")
    train.set_epoch(0)
    list(train)
    assert train._next is not None and train._next[0] == 1  # the next epoch, prefetching
    train.set_epoch(1)
    list(train)
    assert train._next is None  # epoch 2 does not exist
    train.close()
    assert train._pipe is None and len(train._held) == 0


def test_held_outputs_wait_for_the_consumer_and_the_stream():
    """The zero-copy GPU hand-over's bookkeeping (HeldOutputs), with a stand-in for the
    CUDA event: a buffer is let go only once no view of it is alive and the event recorded
    after that has passed."""
    from distres.data.buffers import HeldOutputs

    class Event:
        done = False

        def query(self):
            return self.done

    events = []
    held = HeldOutputs(event=lambda: events.append(Event()) or events[-1])
    first = torch.zeros(4, 3)
    view = first[:2].t()  # what the consumer holds (a micro-batch kept for accumulation)
    held.add("dali-0", first)
    del first
    held.add("dali-1", torch.zeros(4, 3))
    assert len(held) == 2 and not events  # dali-0 still in use; dali-1 not checked yet
    del view
    held.release_done()
    assert len(events) == 2 and len(held) == 2  # both recorded, neither passed yet
    for e in events:
        e.done = True
    held.release_done()
    assert len(held) == 0
