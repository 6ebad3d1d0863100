"""The Trainer in-process: a fake engine and a tiny in-memory loader, no subprocess, no
process group. It trains, saves through the checkpoint manager, and a second Trainer resumes
from a mid-epoch checkpoint to the same final state, bit for bit."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from distres.checkpoint import CheckpointStore, find_resume
from distres.checkpoint.dcp import load_tensors, save_tensors
from distres.checkpoint.manager import CheckpointManager
from distres.checkpoint.parts import SHARED, PartSpec
from distres.components.stopping import EarlyStopping, StopConsensus
from distres.components.tracking import Tracker
from distres.config import load_config, plan_batch
from distres.data.api import Batch
from distres.dist import DistEnv
from distres.engine.base import check_engine_state
from distres.trainer.loop import Trainer
from distres.trainer.resume import same_layout
from distres.trainer.state import (
    PARTS,
    DataPosition,
    LossWindow,
    TrainState,
    run_parts,
    validate,
)

BATCH, FEATURES, CLASSES = 8, 12, 10


class TinyLoader:
    """Batches drawn from (seed, epoch, index): a position is (epoch, batches delivered)."""

    def __init__(self, batches: int, seed: int):
        self.batches, self.seed = batches, seed
        self.epoch, self._done, self._skip, self.skipped = 0, 0, 0, 0
        self.shards = type("Shards", (), {"classes": {str(i): i for i in range(CLASSES)}})()

    def __len__(self) -> int:
        return self.batches

    def num_samples(self) -> int:
        return self.batches * BATCH

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._skip = epoch, 0

    def __iter__(self):
        start, self._skip = self._skip, 0
        for i in range(start, self.batches):
            g = torch.Generator().manual_seed(self.seed * 10_000 + self.epoch * 100 + i)
            x = torch.randn(BATCH, FEATURES, generator=g)
            y = torch.randint(0, CLASSES, (BATCH,), generator=g)
            self._done = i + 1
            yield Batch(x, y)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches": self._done}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self._skip = state["epoch"], state["batches"]

    def resume_from_ranks(self, epoch, states, micro_batch, world_size) -> int:
        raise AssertionError("one layout only in this test")

    def close(self) -> None:
        self.closed = True


class FakeEngine:
    """The Engine contract over a linear model and SGD; tensors through DCP, no process group.
    Its step also draws from torch's RNG (like dropout), so a resume that misses the RNG
    state ends elsewhere."""

    input_dtype = None
    amp_dtype = None
    last_grad_norm = None
    num_params = FEATURES * CLASSES + CLASSES

    def __init__(self, steps: int):
        torch.manual_seed(0)
        self.module = nn.Linear(FEATURES, CLASSES)
        self.lr = 0.1
        self.optimizer = torch.optim.SGD(self.module.parameters(), lr=self.lr, momentum=0.9)
        self.scheduler = torch.optim.lr_scheduler.LinearLR(self.optimizer, 1.0, 0.1, steps)

    def train(self) -> None:
        self.module.train()

    def train_step(self, micro_batches, grad_norm=False):
        total = torch.zeros(())
        for x, y in micro_batches:
            noise = 0.01 * torch.randn_like(x)
            loss = nn.functional.cross_entropy(self.module(x + noise), y) / len(micro_batches)
            loss.backward()
            total += loss.detach()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.scheduler.step()
        return total

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()

    def current_lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def sync_buffers(self) -> None:
        pass

    def full_state_dict(self):
        return self.module.state_dict()

    def state_dict(self) -> dict:
        return {"scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state["scheduler"])

    def checkpoint_info(self) -> dict:
        return {"format": "dcp"}

    def _tensors(self):
        # DCP loads in place: get_state_dict gives a fresh optimizer its (empty) momentum
        model, optim = get_state_dict(self.module, self.optimizer)
        return {"model": model, "optim": optim}

    def save_tensors(self, directory: Path, group, async_save: bool, parts: dict):
        return save_tensors({**self._tensors(), **parts}, directory, group, async_save)

    def load_tensors(self, directory: Path, meta: dict, parts: dict) -> None:
        tensors = {**self._tensors(), **parts}
        load_tensors(directory, tensors)
        set_state_dict(
            self.module,
            self.optimizer,
            model_state_dict=tensors["model"],
            optim_state_dict=tensors["optim"],
        )


def make_trainer(run_dir: Path, *overrides: str, checkpoints: bool = True) -> Trainer:
    cfg = load_config(
        None,
        [
            "train.epochs=3",
            f"train.batch_size={BATCH}",
            "tracking.log_every=2",
            "tracking.progress=off",
            "tracking.plots=false",
            "checkpoint.save_final=false",
            "checkpoint.every_steps=4",
            "checkpoint.keep_last=20",
            "checkpoint.on_stop=false",
            *overrides,
        ],
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    env, device, plan = DistEnv(), torch.device("cpu"), plan_batch(cfg, 1)
    train, val = TinyLoader(5, seed=1), TinyLoader(2, seed=2)
    steps_per_epoch = len(train) // plan.grad_accum
    total = steps_per_epoch * cfg.train.epochs
    engine = FakeEngine(total)
    early = EarlyStopping(cfg.early_stop)
    state, window = TrainState(), LossWindow(device)
    data = DataPosition(train, state, steps_per_epoch, plan.grad_accum)
    trainer = Trainer(
        cfg=cfg,
        env=env,
        device=device,
        plan=plan,
        run_dir=run_dir,
        train_data=train,
        val_data=val,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        engine=engine,
        early_stopping=early,
        consensus=StopConsensus(device),
        tracker=Tracker(run_dir, "off", total, cfg.train.epochs, 2),
        state=state,
        window=window,
        data=data,
    )
    if not checkpoints:
        return trainer  # built without a store: checkpoints off
    store = CheckpointStore(
        run_dir / "checkpoints",
        rank=0,
        world_size=1,
        keep_last=20,
        keep_best=False,
        mode="max",
        async_save=False,
    )
    trainer.attach_checkpoints(store)
    return trainer


def test_trainer_runs_in_process_and_resumes_mid_epoch_to_identical_state(tmp_path):
    whole = make_trainer(tmp_path / "whole")
    summary = whole.fit()
    assert summary["stop_reason"] == "completed" and summary["steps"] == 15
    assert whole.train_data.closed and whole.val_data.closed  # released at the end
    assert summary["samples_seen"] == 15 * BATCH and summary["epochs"] == 3
    saved = sorted(p.name for p in (tmp_path / "whole" / "checkpoints").iterdir())
    assert "step-00000004" in saved and "step-00000012" in saved

    # Resume from step 12 (epoch 3, step 2 of 5) in a fresh Trainer, as a restarted job would.
    part = make_trainer(tmp_path / "part")
    path, meta = find_resume(tmp_path / "whole" / "checkpoints", "auto", validate)
    assert path.name == "step-00000012" and meta["state"]["train"]["epoch_step"] == 2
    assert same_layout(meta, part.env, part.plan)
    assert part.fit((path, meta))["steps"] == 15
    for k, v in whole.engine.module.state_dict().items():
        assert torch.equal(v, part.engine.module.state_dict()[k]), k
    assert part.state == whole.state
    assert part.engine.current_lr() == whole.engine.current_lr()

    # the records after the resume point, the loss window carried over included
    def after(run: str) -> list[tuple]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(x) for x in lines]
        keys = ("event", "step", "epoch", "samples", "lr", "train/loss", "val/loss")
        return [tuple(r.get(k) for k in keys) for r in records if r["step"] > 12]

    assert after("part") == after("whole") and len(after("whole")) >= 3
    # and the history says where it continued
    lines = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    (resumed,) = [r for r in map(json.loads, lines) if r["event"] == "resume"]
    assert resumed["checkpoint"] == str(path) and (resumed["step"], resumed["epoch"]) == (12, 2)
    assert resumed["world_size"] == [1, 1] and resumed["samples"] == 12 * BATCH


def test_a_format_1_checkpoint_still_resumes(tmp_path):
    """Checkpoints written before the parts (one flat meta.json, rank files without "state")
    resume after the upgrade: a long run is not lost to it."""
    import shutil

    whole = make_trainer(tmp_path / "whole")
    whole.fit()
    old = tmp_path / "old" / "step-00000012"
    shutil.copytree(tmp_path / "whole" / "checkpoints" / "step-00000012", old)
    meta = json.loads((old / "meta.json").read_text())
    flat = {
        "format_version": 1,
        **{k: meta[k] for k in ("step", "model", "config", "metric", "time")},
        **meta["layout"],
        **meta["state"]["train"],
        **meta["state"]["engine"],
        "early_stopping": meta["state"]["early_stopping"],
        "format": "dcp",
        "zero_stage": 0,
    }
    (old / "meta.json").write_text(json.dumps(flat))
    rank = json.loads((old / "rank-00000.json").read_text())
    (old / "rank-00000.json").write_text(json.dumps(rank["state"]))
    part = make_trainer(tmp_path / "part")
    path, read = find_resume(old, str(old), validate)
    assert read["state"]["train"]["step"] == 12
    part.fit((path, read))
    for k, v in whole.engine.module.state_dict().items():
        assert torch.equal(v, part.engine.module.state_dict()[k]), k


def test_a_trainer_without_checkpoints_trains_and_writes_none(tmp_path):
    trainer = make_trainer(tmp_path, checkpoints=False)
    assert trainer.fit()["steps"] == 15
    assert not (tmp_path / "checkpoints").exists()


def test_manager_refuses_a_part_without_a_spec_and_a_spec_without_a_check(tmp_path):
    trainer = make_trainer(tmp_path)
    specs, parts = run_parts(trainer)
    with pytest.raises(ValueError, match="extra"):
        CheckpointManager(None, trainer.engine, specs, {**parts, "extra": trainer.state}, dict)
    with pytest.raises(ValueError, match="part extra: a shared part needs its check"):
        PartSpec("extra", SHARED)
    # every shared and rank part of a run is checked before any load, by its spec's check
    assert {s.name for s in PARTS if s.check} == set(parts) - {"ema"}


@pytest.mark.parametrize(
    ("state", "problem"),
    [
        ({"step": -1}, "step=-1"),
        ({"best_top1": "high"}, "best_top1"),
        ({"last_eval": []}, "last_eval"),
    ],
)
def test_train_state_check_names_the_field(state, problem):
    good = TrainState().state_dict()
    assert TrainState.check_state(good) is None
    assert problem in TrainState.check_state({**good, **state})
    assert check_engine_state({"scheduler": {}}) is None
    assert check_engine_state({"scheduler": []}) is not None


def test_train_state_round_trips_minus_infinity():
    s = TrainState(step=3, best_top1=-math.inf)
    t = TrainState()
    t.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert t == s


@pytest.mark.slow
def test_fit_returns_the_summary_in_a_plain_python_process(tmp_path):
    """distres.fit, as a notebook or script calls it: the same run as the CLI, in-process."""
    import subprocess
    import sys

    from commands import REPO

    code = (
        "import json, distres\n"
        f"s = distres.fit(['train.max_steps=4', 'run.dir={tmp_path}', 'run.threads=1', "
        "'tracking.plots=false', 'tracking.progress=off'])\n"
        "print('SUMMARY', json.dumps(s))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("SUMMARY "))
    summary = json.loads(line.removeprefix("SUMMARY "))
    assert summary == json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["stop_reason"] == "completed"
    assert (tmp_path / "final" / "model.safetensors").is_file()


def _exit_with(code: int, marker: str) -> None:
    from distres.log import exit_process

    exit_process(code)
    Path(marker).write_text("returned")  # what the caller does next: report to its parent


@pytest.mark.parametrize("code", [0, 3])
def test_exit_process_leaves_a_multiprocessing_child_to_its_parent(tmp_path, code):
    """Under `torchrun --run-path` a rank is a multiprocessing child whose parent waits for the
    function's return: a success returns, a failure exits with its code."""
    import multiprocessing

    marker = tmp_path / "marker"
    proc = multiprocessing.get_context("fork").Process(target=_exit_with, args=(code, str(marker)))
    proc.start()
    proc.join(60)
    assert proc.exitcode == code
    assert marker.exists() == (code == 0)


def test_compile_mode_reaches_torch_compile_and_cuda_graph_steps_are_marked(monkeypatch):
    """engine.compile_mode goes to torch.compile as its mode; under reduce-overhead (CUDA
    graphs, which need a GPU to run) every micro-step starts a new graph step, so a loss read
    after the next replay is never one the graph has overwritten. torch.compile is stood in
    for (compiling on this CPU takes a minute and makes no CUDA graph); the step is real."""
    from distres.engine import build_engine

    modes, marks = [], []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: modes.append(kw["mode"]) or m)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    for mode, expected in (("default", 0), ("reduce-overhead", 2)):
        cfg = load_config(
            None, ["engine.compile=true", f"engine.compile_mode={mode}", "train.grad_accum=2"]
        )
        engine = build_engine(cfg, DistEnv(), torch.device("cpu"), plan_batch(cfg, 1), 10)
        x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        batch = Batch(x, torch.tensor([0, 1, 2, 3]))
        marks.clear()
        loss = engine.train_step([batch, batch])
        assert torch.isfinite(loss) and len(marks) == expected
    assert modes == ["default", "reduce-overhead"]


def test_batch_mixing_reaches_training_steps_only(tmp_path):
    """Mixup's soft targets reach every training step; evaluation sees the val loader's own
    batches, never mixed."""
    from distres.data.augment import BatchAugment, spec_from_config

    trainer = make_trainer(tmp_path, "train.mixup_alpha=0.4", checkpoints=False)
    trainer.augment = BatchAugment(spec_from_config(trainer.cfg), 0, 0, torch.device("cpu"))
    dims, step = [], trainer.engine.train_step

    def spy(micro_batches, grad_norm=False):
        dims.extend(y.dim() for _, y in micro_batches)
        return step(micro_batches, grad_norm)

    trainer.engine.train_step = spy
    evaluated = []
    trainer.engine.module.register_forward_pre_hook(
        lambda m, args: None if m.training else evaluated.append(args[0])
    )
    trainer.fit()
    assert dims and set(dims) == {2}
    raw = []
    for epoch in range(4):
        val = TinyLoader(2, seed=2)
        val.set_epoch(epoch)
        raw += [b.images for b in val]
    assert evaluated and all(any(torch.equal(x, r) for r in raw) for x in evaluated)


def test_every_minutes_checkpoints_on_the_wall_clock(tmp_path):
    """checkpoint.every_minutes with a fake clock (25 s a step): a checkpoint every third
    step, counted from the start and from each checkpoint (a checkpoint for another reason
    restarts the count too); the last step is the run's end, not a timed save."""
    trainer = make_trainer(tmp_path, "checkpoint.every_steps=0", "checkpoint.every_epochs=0",
                           "checkpoint.every_minutes=1")  # fmt: skip
    now = [1000.0]
    trainer.clock = lambda: now[0]
    trainer.step_hooks.append(lambda s: now.__setitem__(0, now[0] + 25))
    assert trainer.fit()["steps"] == 15
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name != "latest")
    assert saved == [f"step-{s:08d}" for s in (3, 6, 9, 12)], saved
    # off: no timed checkpoint at all
    quiet = make_trainer(tmp_path / "off", "checkpoint.every_steps=0", "checkpoint.every_epochs=0")
    quiet.clock = lambda: now[0]
    quiet.step_hooks.append(lambda s: now.__setitem__(0, now[0] + 1e6))
    quiet.fit()
    assert not [p for p in (tmp_path / "off" / "checkpoints").iterdir() if p.name != "latest"]
