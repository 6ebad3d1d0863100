"""The EMA of the weights (train.ema_decay): the update against a reference written out by hand,
the per-sample decay rule, the checkpoint part, and what a run reports and writes."""

from __future__ import annotations

import json
import re

import pytest
import torch
from commands import run_cli
from safetensors.torch import load_file

from distres.artifacts.consolidate import checkpoint_weights
from distres.components.ema import WeightEma
from distres.config import load_config, plan_batch
from distres.dist import DistEnv
from distres.engine import build_engine


def _engine(overrides: list[str]):
    cfg = load_config(None, ["run.device=cpu", "train.batch_size=8", *overrides])
    engine = build_engine(cfg, DistEnv(), torch.device("cpu"), plan_batch(cfg, 1), 10)
    return cfg, engine


def _step(engine, gen: torch.Generator) -> None:
    images = torch.randn(8, 3, 32, 32, generator=gen).contiguous(memory_format=torch.channels_last)
    engine.train_step([(images, torch.randint(0, 10, (8,), generator=gen))])


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_equals_a_reference_computed_by_hand(warmup):
    decay, every, ref_batch = 0.9, 2, 32
    cfg, engine = _engine(
        [
            f"train.ema_decay={decay}",
            f"train.ema_every={every}",
            f"train.ema_batch={ref_batch}",
            f"train.ema_warmup={warmup}",
        ]
    )
    ema = WeightEma(engine.module, cfg, DistEnv())
    reference = {k: v.detach().clone().double() for k, v in engine.module.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    engine.train()
    samples = 0
    for step in range(1, 8):
        _step(engine, gen)
        samples += 8
        ema.update(step, samples, 8)
        if step % every == 0:
            # the decay of `every` steps of 8 samples, stated per 32 samples
            per_batch = decay
            if warmup:
                per_batch = min(decay, 1 - (1 + samples / ref_batch) ** (-2 / 3))
            d = per_batch ** (every * 8 / ref_batch)
            for k, v in engine.module.state_dict().items():
                if v.is_floating_point():
                    reference[k] = d * reference[k] + (1 - d) * v.double()
                else:
                    reference[k] = v.clone().double()
    state = ema.state_dict()
    assert state.keys() == reference.keys()
    moved = 0
    for k, v in state.items():
        assert v.dtype == engine.module.state_dict()[k].dtype  # fp32 here, int64 counts
        torch.testing.assert_close(v.double(), reference[k], rtol=1e-5, atol=1e-6, msg=k)
        moved += not torch.equal(v, engine.module.state_dict()[k])
    assert moved > len(state) // 2  # the EMA lags the weights (not a copy of them)
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())


def test_the_horizon_in_samples_holds_on_any_global_batch():
    """The same ema_decay on a global batch 4x larger: a step decays as four smaller ones."""
    cfg = load_config(None, ["train.ema_decay=0.999", "train.ema_batch=256"])
    _, engine = _engine([])
    ema = WeightEma(engine.module, cfg, DistEnv())
    small = ema.decay(10_000, 256)
    assert small == pytest.approx(0.999)
    assert ema.decay(10_000, 1024) == pytest.approx(small**4, rel=1e-12)
    assert ema.decay(10_000, 64) ** 4 == pytest.approx(small, rel=1e-12)


def test_the_ema_leaves_the_runs_randomness_alone():
    """Building the EMA draws no random numbers: a run with it trains exactly as one without."""
    cfg, engine = _engine(["train.ema_decay=0.99"])
    torch.manual_seed(5)
    WeightEma(engine.module, cfg, DistEnv())
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(3), after)


@pytest.mark.slow
def test_a_run_reports_both_and_writes_either_and_resumes_a_checkpoint_without_an_ema(tmp_path):
    """val/* and val_ema/* in every evaluation; final/ gets the EMA (final_weights=ema), which
    equals the EMA in the last checkpoint and `distres.export --ema`; early stopping and the
    best checkpoint can follow val_ema/top1; a checkpoint written with the EMA off resumes with
    an EMA that starts from its weights."""
    run = tmp_path / "run"
    common = ["train.max_steps=6", "train.epochs=2", "tracking.progress=off"]
    first = run_cli(*common, "train.max_steps=3", f"run.dir={run}")
    assert first.returncode == 0, first.stderr
    second = run_cli(
        *common,
        f"run.dir={run}",
        "train.ema_decay=0.9",
        "train.ema_every=2",
        "checkpoint.final_weights=ema",
        "early_stop.monitor=val_ema/top1",
    )
    assert second.returncode == 0, second.stderr
    assert "holds no EMA" in second.stderr and "EMA of the weights: decay 0.9" in second.stdout
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["event"] == "eval"]
    last = evals[-1]
    assert last["step"] == 6 and {"val/top1", "val_ema/top1", "val_ema/loss"} <= last.keys()
    assert last["val_ema/samples"] == last["val/samples"] == 361
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_val_ema_top1"] == last["val_ema/top1"]
    final = load_file(run / "final" / "model.safetensors")
    in_checkpoint, _, used = checkpoint_weights(run / "checkpoints", ema=True)
    weights, _, _ = checkpoint_weights(run / "checkpoints")
    assert used.name == "step-00000006"
    assert all(torch.equal(final[k], in_checkpoint[k]) for k in final)
    assert not all(torch.equal(final[k], weights[k]) for k in final)
    meta = json.loads((used / "meta.json").read_text())
    assert meta["metric"] == {"name": "val_ema/top1", "mode": "max", "value": last["val_ema/top1"]}
    assert meta["tensors"]["parts"] == ["ema"]
    out = tmp_path / "ema.safetensors"
    exported = run_cli(
        str(run / "checkpoints"), "--out", str(out), "--ema", module="distres.export"
    )
    assert exported.returncode == 0, exported.stderr
    assert "the EMA of resnet20" in exported.stdout
    assert all(torch.equal(load_file(out)[k], final[k]) for k in final)
    # the first run's checkpoint has no EMA: --ema says so in one line
    no_ema = run_cli(
        str(run / "checkpoints" / "step-00000003"),
        "--out",
        str(out),
        "--ema",
        module="distres.export",
    )
    assert no_ema.returncode == 5 and "holds no EMA" in no_ema.stderr
    assert len(no_ema.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_the_ema_is_one_on_every_rank_and_resumes_resharded_from_2_to_3_ranks(tmp_path):
    """2 ranks train with an EMA (batch norm statistics averaged over ranks before each
    evaluation and save): every rank ends with the same EMA. Resumed mid-epoch on 3 ranks,
    every rank loads exactly the checkpoint's EMA, and ends with one EMA again."""
    from test_distributed import FAST, rank_records, torchrun

    ema = ["train.ema_decay=0.9", "train.ema_every=2", "train.epochs=2", "tracking.progress=off"]
    run = f"run.dir={tmp_path / 'run'}"
    two = torchrun(2, "train", tmp_path, *FAST, *ema, "train.max_steps=5", run)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    records = rank_records(tmp_path, 2)
    assert records[0]["ema"] == records[1]["ema"] and records[0]["hash"] == records[1]["hash"]
    saved, _, used = checkpoint_weights(tmp_path / "run" / "checkpoints", ema=True)
    assert used.name == "step-00000005"
    # 128 (2 x 64) cannot be made by 3 ranks of 64: the nearest, 192, as the policy allows
    three = torchrun(3, "train", tmp_path, *FAST, *ema, "train.max_steps=8", run,
                     "train.elastic_batch=nearest")  # fmt: skip
    assert three.returncode == 0, three.stdout[-3000:] + three.stderr[-3000:]
    records = rank_records(tmp_path, 3)
    from dist_helper import weights_hash

    assert {r["ema_at_resume"] for r in records} == {weights_hash(saved)}
    assert len({r["ema"] for r in records}) == 1 and records[0]["summary"]["steps"] == 8


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["train.ema_decay=0.99", "engine.name=deepspeed", "engine.zero_stage=3"],
            "engine.zero_stage=3: ZeRO-3 partitions the parameters",
        ),
        (["early_stop.monitor=val_ema/top1"], "train.ema_decay=0: there is no EMA"),
        (["checkpoint.final_weights=ema"], "there is no EMA"),
        (["train.ema_every=4"], "train.ema_every=4 has no effect here"),
        (["train.ema_decay=1.0"], "must be in [0, 1)"),
        (["train.ema_decay=0.9", "train.ema_batch=0"], "train.ema_batch=0"),
    ],
)
def test_ema_settings_that_cannot_work_are_one_line_config_errors(overrides, message):
    from distres.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)
