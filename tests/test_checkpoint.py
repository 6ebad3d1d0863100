"""Checkpoints and resume: real torchrun, real gloo ranks, real SIGKILLs, deterministic mode.

Every launch has a timeout; a hang fails the test instead of stalling CI.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from commands import REPO, run_cli
from multiproc import EXACT, SMALL, assert_same_weights, kill_at_step, records, resumes, train
from safetensors.torch import load_file

from distres import checkpoint as ckpt
from distres.components.sample_log import read_steps

# every test here launches real runs (torchrun, SIGKILL, the CLI)
pytestmark = pytest.mark.slow

BASE = EXACT


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    proc = train(2, run_dir, *BASE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigkill_mid_epoch_then_resume_is_exact(uninterrupted, tmp_path, mode, test_rng):
    # A random step, never an epoch boundary (11), never a checkpoint step's own boundary.
    target = test_rng.choice([s for s in range(4, 21) if s not in (11, 12)])
    overrides = [*BASE, f"checkpoint.async_save={mode == 'async'}"]
    reached = kill_at_step(tmp_path, target, *overrides)
    latest = ckpt.find_resume(tmp_path / "checkpoints", "auto")
    assert latest is not None and latest[1]["step"] <= reached
    proc = train(2, tmp_path, *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (resumed,) = resumes(tmp_path)
    assert (resumed["checkpoint"], resumed["step"]) == (str(latest[0]), latest[1]["step"]), (
        f"killed at step {reached}"
    )
    assert_same_weights(uninterrupted, tmp_path)
    # The history reads as one run: records past the checkpoint were dropped on resume, and
    # every value from the resume point on matches the uninterrupted run.
    assert records(tmp_path) == records(uninterrupted), f"killed at step {reached}"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 22 and summary["samples_seen"] == 22 * 128


def test_kill_during_a_checkpoint_write_resumes_from_the_previous(uninterrupted, tmp_path):
    # Rank 1 dies after writing its part of step 9, before the commit.
    proc = train(2, tmp_path, *BASE, DISTRES_FAILPOINT="checkpoint.commit@9@1")
    assert proc.returncode != 0
    root = tmp_path / "checkpoints"
    assert (root / ".tmp-step-00000009").is_dir() and not (root / "step-00000009").exists()
    assert (root / "latest").read_text().strip() == "step-00000006"
    proc = train(2, tmp_path, *BASE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (resumed,) = resumes(tmp_path)
    assert resumed["checkpoint"] == str(root / "step-00000006") and resumed["step"] == 6
    assert not (root / ".tmp-step-00000009").exists()  # the partial write was cleaned up
    assert_same_weights(uninterrupted, tmp_path)


# Global batch 192 = 32 x 3 accum x 2 ranks; 6 accum on 1 rank, 2 on 3 ranks.
WORLD = ["run.threads=1", "train.batch_size=32", "train.grad_accum=3", "tracking.log_every=1"]


@pytest.fixture(scope="module")
def four_steps_on_two_ranks(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("two-ranks")
    proc = train(2, run_dir, *WORLD, "train.epochs=2", "train.max_steps=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.parametrize("world", [1, 3])
def test_resume_on_another_world_size(four_steps_on_two_ranks, tmp_path, world):
    tmp_path = copy_of(four_steps_on_two_ranks, tmp_path)
    proc = train(world, tmp_path, *WORLD, "train.epochs=2", timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (resumed,) = resumes(tmp_path)
    assert resumed["step"] == 4
    assert resumed["world_size"] == [2, world] and resumed["grad_accum"] == [3, 192 // (32 * world)]
    train_records = [r for r in records(tmp_path) if r["event"] == "train"]
    after = [r for r in train_records if r["step"] > 4]
    assert after[0]["samples"] == 5 * 192  # continues from the saved samples-seen count
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == world and summary["global_batch"] == 192
    assert summary["samples_seen"] == summary["steps"] * 192
    assert summary["steps"] == 14  # 7 steps per epoch on every world size here


def test_torch_backend_resumes_exactly_on_three_ranks_what_two_left(tmp_path):
    """The torch backend after 2 ranks stopped at step 12 of a 14-step epoch, on 3 ranks:
    the epoch still ends at step 14, and every step trains the very samples a run never
    stopped trains (its global batch, position for position): the epoch's samples once
    each. (The weights differ from the 2-rank run's: BN statistics are per rank.)"""
    run = [*BASE, "data.backend=torch", "train.batch_size=16", "train.global_batch=96",
           "tracking.sample_log=true", "train.epochs=2"]  # fmt: skip
    whole, moved = tmp_path / "whole", tmp_path / "moved"
    proc = train(2, whole, *run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = train(2, moved, *run, DISTRES_FAILPOINT="stop@12")
    assert "exitcode  : 3" in proc.stderr, proc.stderr[-3000:]  # torchrun: 1 for any
    assert (moved / "checkpoints" / "latest").read_text().strip() == "step-00000012"
    proc = train(3, moved, *run, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (resumed,) = resumes(moved)
    assert resumed["step"] == 12 and resumed["world_size"] == [2, 3]
    evals = [r["step"] for r in records(moved) if r["event"] == "eval"]
    assert [r["step"] for r in records(whole) if r["event"] == "eval"] == [14, 28]
    assert evals == [12, 14, 28]  # the stop's own evaluation, then the epoch's end as ever
    ref, got = read_steps(whole), read_steps(moved)
    assert sorted(got) == sorted(ref) == list(range(1, 29))
    assert {got[s]["world"] for s in range(13, 29)} == {3}
    for step in ref:  # each step's global batch: the same samples in the same positions
        assert sorted(got[step]["keys"]) == sorted(ref[step]["keys"]), step
    for epoch in (0, 1):
        keys = [k for s in ref.values() if s["epoch"] == epoch for k in s["keys"]]
        assert len(keys) == len(set(keys)) == 14 * 96


def _short_run(run_dir: Path, *overrides: str, small: bool = True):
    return run_cli(
        f"run.dir={run_dir}",
        *(SMALL if small else ()),
        "run.threads=1",
        "train.epochs=1",
        "checkpoint.every_steps=3",
        *overrides,
    )


def _shared_run(factory, name: str, *overrides: str) -> Path:
    """A short run that several tests start from (each on its own copy, see copy_of)."""
    run_dir = factory.mktemp(name)
    proc = _short_run(run_dir, *overrides)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run_dir


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory) -> Path:
    """One epoch on one process, a checkpoint every 3 steps and the last 10 kept."""
    return _shared_run(tmp_path_factory, "one-epoch", "checkpoint.keep_last=10")


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory) -> Path:
    return _shared_run(tmp_path_factory, "three-steps", "train.max_steps=3")


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    """A test's own copy of a shared run (it damages or continues it)."""
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def test_corrupt_latest_is_skipped_with_a_warning(one_epoch, tmp_path):
    tmp_path = copy_of(one_epoch, tmp_path)
    root = tmp_path / "checkpoints"
    newest = ckpt.committed(root)[0]
    assert newest.name == "step-00000022"
    shard = newest / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])  # truncated, as by a full disk
    proc = _short_run(tmp_path, "train.epochs=2", "checkpoint.keep_last=10")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"skipping checkpoint: {shard}: truncated" in proc.stderr  # the user's one warning
    assert resumes(tmp_path)[-1]["checkpoint"] == str(root / "step-00000021")


def test_resume_none_and_resume_path(one_epoch, tmp_path):
    tmp_path = copy_of(one_epoch, tmp_path)
    picked = tmp_path / "checkpoints" / "step-00000009"
    shutil.copytree(picked, tmp_path / "kept")
    proc = _short_run(tmp_path / "other", f"checkpoint.resume={tmp_path / 'kept'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (resumed,) = resumes(tmp_path / "other")
    assert resumed["checkpoint"] == str(tmp_path / "kept") and resumed["step"] == 9
    # none: a fresh start, which refuses to mix its checkpoints with an earlier run's
    fresh = _short_run(tmp_path / "fresh", "checkpoint.resume=none", "train.max_steps=2")
    assert fresh.returncode == 0 and not resumes(tmp_path / "fresh")
    mixed = _short_run(tmp_path, "checkpoint.resume=none")
    assert mixed.returncode == 2 and "holds checkpoints of an earlier run" in mixed.stderr
    missing = _short_run(tmp_path / "x", f"checkpoint.resume={tmp_path / 'nope'}")
    assert missing.returncode == 5 and "no such checkpoint" in missing.stderr  # checkpoint


def test_retention_keeps_the_last_k_and_the_best(tmp_path):
    proc = _short_run(tmp_path, "train.epochs=3", "checkpoint.keep_last=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    root = tmp_path / "checkpoints"
    best = json.loads((root / "best.json").read_text())
    names = {p.name for p in ckpt.committed(root)}
    assert {"step-00000066", "step-00000063"} <= names
    assert names <= {"step-00000066", "step-00000063", best["name"]}
    evals = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    top1 = max(r["val/top1"] for r in evals if r["event"] == "eval")
    assert best["metric"] == pytest.approx(top1)


def test_incompatible_resume_names_the_mismatch(three_steps, tmp_path):
    tmp_path = copy_of(three_steps, tmp_path)
    proc = _short_run(tmp_path, "model.name=resnet32")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "model.name='resnet20'" in lines[0] and "model.name='resnet32'" in lines[0]
    # A checkpoint of a 12-class head (the built-in set has 10 classes, so the meta says so)
    meta_file = tmp_path / "checkpoints" / "step-00000003" / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["model"]["num_classes"] = 12
    meta_file.write_text(json.dumps(meta))
    proc = _short_run(tmp_path)
    assert proc.returncode == 2
    assert "model.num_classes=12, this run has model.num_classes=10" in proc.stderr


def test_export_of_an_imagenet_variant_loads_into_torchvision(tmp_path):
    import torchvision

    proc = _short_run(
        tmp_path,
        "model.name=resnet18",
        "data.image_size=64",
        "train.batch_size=16",
        "train.max_steps=2",
        small=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "export" / "resnet18.safetensors"
    proc = run_cli(str(tmp_path / "checkpoints"), "--out", str(out), module="distres.export")
    assert proc.returncode == 0, proc.stderr
    weights = load_file(str(out))
    tv = torchvision.models.resnet18(num_classes=10)
    tv.load_state_dict(weights, strict=True)
    final = load_file(str(tmp_path / "final" / "model.safetensors"))
    for k, v in final.items():
        assert torch.equal(weights[k], v), k


class Boom:
    def __reduce__(self):
        return (os.system, ("touch BOOM",))


def test_untrusted_pickles_are_refused(three_steps, tmp_path):
    tmp_path = copy_of(three_steps, tmp_path)
    target = tmp_path / "checkpoints" / "step-00000003"
    (target / ".metadata").write_bytes(pickle.dumps(Boom()))
    proc = _short_run(tmp_path / "other", f"checkpoint.resume={target}")
    assert proc.returncode == 5 and "refused to unpickle" in proc.stderr, proc.stderr
    proc = run_cli(str(target), "--out", str(tmp_path / "x.safetensors"), module="distres.export")
    assert proc.returncode == 5 and "refused to unpickle" in proc.stderr, proc.stderr
    # The non-tensor items DCP stores (optimizer hyper-parameters) go through
    # torch.load(weights_only=True) as well.
    from distres.checkpoint.dcp import SafeLoadPlanner

    planner = SafeLoadPlanner()
    item = type("Item", (), {"dest_index": type("I", (), {"fqn": "optim.param_groups"})()})()
    with pytest.raises(ckpt.CheckpointError, match="refused the non-tensor item"):
        planner.load_bytes(item, io.BytesIO(pickle.dumps(Boom())))
    assert not (REPO / "BOOM").exists() and not (tmp_path / "BOOM").exists()


def test_recipe_options_resume_exactly(tmp_path, test_rng):
    """Every recipe option at once: LARS (timm's, its momentum in the DCP checkpoint), the
    poly schedule, label smoothing, progressive resizing (16 px in epoch 0, 32 in epoch 1),
    RandAugment, color jitter, random erasing, mixup + cutmix, the bce loss, stochastic
    depth, repeated augmentation (each shard on both ranks) and a separate evaluation size:
    an EMA of the weights updated every other step with the warm-up: a run SIGKILLed in the
    second epoch resumes at the right size and ends bitwise equal to one never interrupted,
    the EMA included.

    On the torch backend, decoding in the main process: there the data's draws and the
    model's (stochastic depth) share torch's global RNG, which is where exactness broke
    (test_augmentation's DALI case resumes RandAugment in-process)."""
    recipe = [
        *(o for o in BASE if o not in SMALL),  # its own sizes: 16 px, then 32
        "optim.name=lars",
        "optim.lr=1.0",
        "optim.schedule=poly",
        "train.label_smoothing=0.1",
        "data.random_resized_crop=true",
        "data.progressive_min_size=16",
        "data.progressive_epochs=[0,1]",
        "data.progressive_step=16",
        "data.auto_augment=randaugment",
        "data.ra_magnitude=6",
        "data.color_jitter=0.3",
        "data.random_erasing=0.5",
        "data.val_size=24",
        "train.mixup_alpha=0.2",
        "train.cutmix_alpha=1.0",
        "train.loss=bce",
        "model.drop_path_rate=0.1",
        "data.aug_repeats=2",
        "data.backend=torch",
        "train.ema_decay=0.9",
        "train.ema_every=2",
        "train.ema_warmup=true",
    ]
    whole = tmp_path / "whole"
    proc = train(2, whole, *recipe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sizes = {r["epoch"]: r["image_size"] for r in records(whole) if r["event"] == "train"}
    assert sizes == {0: 16, 1: 32}
    killed = tmp_path / "killed"
    kill_at_step(killed, test_rng.choice([14, 16, 19]), *recipe)
    proc = train(2, killed, *recipe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert resumes(killed)
    assert_same_weights(whole, killed)
    assert records(killed) == records(whole)
    assert "val_ema/top1" in records(whole)[-1]
    from distres.artifacts.consolidate import checkpoint_weights

    ema = [checkpoint_weights(run / "checkpoints", ema=True)[0] for run in (whole, killed)]
    assert all(torch.equal(ema[0][k], ema[1][k]) for k in ema[0])
