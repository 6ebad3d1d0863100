"""Multi-process behaviour on CPU with real gloo process groups, launched by real torchrun.

Every launch has a timeout: a hang fails the test instead of stalling CI.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from commands import REPO
from launcher import run_module
from multiproc import FORKED_RANKS, SMALL

from distres.config import ConfigError, load_config, plan_batch
from distres.dist import DistEnv, first_host, read_env

HELPER = str(REPO / "tests" / "dist_helper.py")
FAST = [*SMALL, "run.threads=1", "tracking.log_every=2"]


def torchrun(
    nproc: int,
    mode: str,
    out: Path,
    *overrides: str,
    timeout: float = 240,
    env: dict | None = None,
    wait: bool = True,
):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        HELPER,
        mode,
        str(out),
        *overrides,
    ]
    # PYTHONPATH: this checkout's distres, whatever another checkout installed.
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    if not wait:
        return start(cmd, full_env)
    # the agent forked with torch imported, the ranks forked from it (multiproc.FORKED_RANKS)
    args = [*cmd[3:5], *FORKED_RANKS, *cmd[5:]]  # torchrun's options, then the script's
    return run_module("torch.distributed.run", args, cwd=REPO, env=full_env, timeout=timeout)


def start(cmd: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    """Every process's output; all are killed on the way out, so a hang fails, not stalls."""
    try:
        return [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()


def rank_records(out: Path, n: int) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 3])
def test_ranks_complete_with_identical_weights(tmp_path, nproc):
    proc = torchrun(nproc, "train", tmp_path, *FAST, "train.epochs=2", f"run.dir={tmp_path}/run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = rank_records(tmp_path, nproc)
    assert len({r["hash"] for r in records}) == 1  # DDP kept every replica identical
    steps = {r["summary"]["steps"] for r in records}
    assert len(steps) == 1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stop_reason"] == "completed" and summary["world_size"] == nproc
    assert summary["global_batch"] == 64 * nproc
    # Equal steps by rule: floor(6 shards / nproc) smallest shards' samples // 64 per epoch.
    per_epoch = {2: (240 + 240 + 236) // 64, 3: (240 + 236) // 64}[nproc]
    assert summary["steps"] == 2 * per_epoch
    # Only rank 0 tracks: one metrics file, one progress stream.
    assert (tmp_path / "run" / "metrics.jsonl").exists()
    assert proc.stdout.count("params) on cpu, world size") == 1
    assert proc.stdout.count("eval  epoch 2/2") == 1


def test_grad_accum_matches_big_batch_on_one_rank():
    from distres.data.api import Batch
    from distres.engine import build_engine

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 3, 32, 32, generator=gen).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (32,), generator=gen)
    weights = {}
    for micro, accum in ((32, 1), (8, 4)):
        cfg = load_config(
            None,
            [f"train.batch_size={micro}", f"train.grad_accum={accum}", "optim.warmup_epochs=0"],
        )
        torch.manual_seed(0)
        engine = build_engine(cfg, DistEnv(), torch.device("cpu"), plan_batch(cfg, 1), 10)
        engine.module.eval()
        engine.train_step(
            [Batch(a, b) for a, b in zip(x.split(micro), y.split(micro), strict=True)]
        )
        weights[accum] = engine.module.state_dict()
    for k, v in weights[1].items():
        torch.testing.assert_close(weights[4][k], v, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.slow
def test_grad_accum_on_two_ranks_matches_big_batch(tmp_path):
    from distres.data.api import Batch
    from distres.engine import build_engine

    proc = torchrun(
        2, "accum", tmp_path, "train.batch_size=8", "train.grad_accum=2", "optim.warmup_epochs=0"
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    distributed = torch.load(tmp_path / "accum.pt", weights_only=True)

    cfg = load_config(None, ["train.batch_size=32", "optim.warmup_epochs=0"])
    torch.manual_seed(0)
    engine = build_engine(cfg, DistEnv(), torch.device("cpu"), plan_batch(cfg, 1), 10)
    engine.module.eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 3, 32, 32, generator=gen).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (32,), generator=gen)
    engine.train_step([Batch(x, y)])
    for k, v in engine.module.state_dict().items():
        torch.testing.assert_close(distributed[k], v, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.slow
def test_early_stop_is_agreed_by_all_ranks(tmp_path):
    # Ranks read different shards; min_delta=2 makes every evaluation after the first a miss.
    proc = torchrun(
        2,
        "train",
        tmp_path,
        *FAST,
        "train.epochs=8",
        "early_stop.patience=1",
        "early_stop.min_delta=2.0",
        "train.batch_size=32",
        f"run.dir={tmp_path}/run",
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    records = rank_records(tmp_path, 2)
    assert {r["summary"]["stop_reason"] for r in records} == {"early_stop"}
    assert len({r["summary"]["steps"] for r in records}) == 1
    assert records[0]["summary"]["epochs"] == 2


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


@pytest.mark.slow
def test_signal_to_one_rank_stops_all_at_the_same_step(tmp_path):
    run = tmp_path / "run"
    proc = torchrun(
        2,
        "train",
        tmp_path,
        *FAST,
        "train.epochs=50",
        "train.batch_size=16",
        f"run.dir={run}",
        wait=False,
    )
    try:
        _wait_for(
            lambda: (
                (run / "metrics.jsonl").exists()
                and (run / "metrics.jsonl").read_text().count("\n") >= 2
            ),
            120,
            "training did not start",
        )
        os.kill(int((tmp_path / "pid.1").read_text()), signal.SIGUSR1)  # rank 1 only
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    records = rank_records(tmp_path, 2)
    assert {r["summary"]["stop_reason"] for r in records} == {"preempted"}
    assert {r["exit"] for r in records} == {3}
    steps = {r["summary"]["steps"] for r in records}
    assert len(steps) == 1
    signalled_at = [
        json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
    ][1]
    assert steps.pop() <= signalled_at + 20  # within a few steps of the signal
    assert "stop requested by a signal" in out


@pytest.mark.slow
def test_non_finite_loss_on_one_rank_stops_all(tmp_path):
    proc = torchrun(
        2,
        "train",
        tmp_path,
        *FAST,
        "train.epochs=5",
        f"run.dir={tmp_path}/run",
        env={"FAULT": "nan:1:3"},
    )
    assert proc.returncode != 0
    records = rank_records(tmp_path, 2)
    assert {r["summary"]["stop_reason"] for r in records} == {"non_finite_loss"}
    assert {r["summary"]["steps"] for r in records} == {3}
    assert {r["exit"] for r in records} == {4}
    assert "non-finite training loss on at least one rank" in proc.stdout


@pytest.mark.slow
def test_exact_evaluation_on_three_ranks(tmp_path):
    from distres.models import build_model

    cfg = load_config()
    torch.manual_seed(0)
    model = build_model(cfg.model)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    for nproc in (1, 3):
        proc = torchrun(nproc, "eval", tmp_path)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        results = [json.loads((tmp_path / f"eval{r}.json").read_text()) for r in range(nproc)]
        if nproc == 1:
            single = results[0]
    assert sum(r["local_samples"] for r in results) == 361
    for r in results:
        assert r["val/samples"] == 361
        assert r["val/top1"] == single["val/top1"]
        assert r["val/top5"] == single["val/top5"]
        assert r["val/loss"] == pytest.approx(single["val/loss"], rel=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_srun_style_launch_from_slurm_variables(tmp_path):
    """One process per task with only Slurm's variables, as `srun --ntasks=2` starts them."""
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")
        }
        env.update(
            SLURM_NTASKS="2",
            SLURM_PROCID=str(rank),
            SLURM_LOCALID=str(rank),
            SLURM_JOB_NODELIST="localhost",
            SLURM_JOB_ID="4242",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
        )
        cmd = [
            sys.executable,
            HELPER,
            "train",
            str(tmp_path),
            *FAST,
            "train.max_steps=4",
            f"run.dir={tmp_path}/run",
        ]
        procs.append(start(cmd, env))
    outs = wait_all(procs, timeout=180)
    assert [p.returncode for p in procs] == [0, 0], outs
    records = rank_records(tmp_path, 2)
    assert {r["summary"]["world_size"] for r in records} == {2}
    assert len({r["hash"] for r in records}) == 1


def test_bf16_autocast_and_channels_last_are_in_effect():
    from distres.data.api import Batch
    from distres.engine import build_engine

    cfg = load_config(None, ["train.precision=bf16", "train.batch_size=4"])
    engine = build_engine(cfg, DistEnv(), torch.device("cpu"), plan_batch(cfg, 1), 10)
    seen = {}

    def hook(module, inputs, output):
        seen["dtype"], seen["channels_last"] = (
            output.dtype,
            output.is_contiguous(memory_format=torch.channels_last),
        )
        seen["weight_channels_last"] = module.weight.is_contiguous(
            memory_format=torch.channels_last
        )

    engine.module.layer2[0].conv1.register_forward_hook(hook)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    loss = engine.train_step([Batch(x, torch.randint(0, 10, (4,)))])
    assert seen == {"dtype": torch.bfloat16, "channels_last": True, "weight_channels_last": True}
    assert loss.dtype == torch.float32  # the loss is computed in fp32
    assert engine.module.fc.weight.dtype == torch.float32  # master weights stay fp32

    fp32 = build_engine(
        load_config(None, ["train.precision=fp32", "train.batch_size=4"]),
        DistEnv(),
        torch.device("cpu"),
        plan_batch(cfg, 1),
        10,
    )
    fp32.module.layer2[0].conv1.register_forward_hook(hook)
    fp32.train_step([Batch(x, torch.randint(0, 10, (4,)))])
    assert seen["dtype"] == torch.float32


def test_global_batch_derives_accumulation_or_says_what_divides():
    cfg = load_config(None, ["train.batch_size=32", "train.global_batch=256"])
    assert plan_batch(cfg, 4).grad_accum == 2
    assert plan_batch(cfg, 8).grad_accum == 1
    with pytest.raises(
        ConfigError,
        match=r"train.global_batch=256 .*=32 x 3 ranks = 96; "
        r"world sizes that keep it: 1, 2, 4, 8; or train.elastic_batch=nearest",
    ):
        plan_batch(cfg, 3)
    # a resumed checkpoint's global batch on another world size, by the same policy
    with pytest.raises(
        ConfigError, match=r"the checkpoint's global batch 384 .* 1, 2, 3, 4, 6, 12"
    ):
        plan_batch(load_config(None, ["train.batch_size=32"]), 5, target=384)


def test_elastic_batch_nearest_takes_the_nearest_and_says_what_the_lr_does(capsys):
    from distres.log import setup_logging

    setup_logging(True)  # rank 0's log: warnings on stderr
    cfg = load_config(None, ["train.batch_size=32", "train.global_batch=256",
                             "train.elastic_batch=nearest", "optim.lr_scaling=linear"])  # fmt: skip
    plan = plan_batch(cfg, 3)  # 96 a step: 3 x 96 = 288 is nearest to 256
    assert (plan.grad_accum, plan.global_batch) == (3, 288)
    assert "train.global_batch=256 on 3 rank(s) of 32 becomes 288 (grad_accum 3); the lr " \
        "follows it (x 1.125, optim.lr_scaling=linear)" in capsys.readouterr().err  # fmt: skip
    from distres.engine.base import scaled_lr

    assert scaled_lr(cfg, plan) == pytest.approx(cfg.optim.lr * 288 / 256)
    cfg.optim.lr_scaling = "none"
    assert plan_batch(cfg, 5, target=384).global_batch == 320  # 160 a step, 2.4 -> 2
    assert "the lr stays (optim.lr_scaling=none)" in capsys.readouterr().err


def test_linear_lr_scaling():
    from distres.engine.base import scaled_lr

    cfg = load_config(None, ["optim.lr_scaling=linear", "optim.lr=0.1", "train.batch_size=64"])
    assert scaled_lr(cfg, plan_batch(cfg, 8)) == pytest.approx(0.1 * 512 / 256)
    assert scaled_lr(load_config(), plan_batch(load_config(), 8)) == 0.1


def test_rank_reading_from_torchrun_and_slurm_variables():
    assert read_env({}) == DistEnv()
    assert read_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}) == DistEnv(3, 8, 3)
    slurm = read_env(
        {
            "SLURM_NTASKS": "16",
            "SLURM_PROCID": "9",
            "SLURM_LOCALID": "1",
            "SLURM_JOB_NODELIST": "gpu[007-008]",
            "SLURM_JOB_ID": "123",
        }
    )
    assert (slurm.rank, slurm.world_size, slurm.local_rank) == (9, 16, 1)
    assert (slurm.master_addr, slurm.master_port) == ("gpu007", 20123)
    # torchrun inside an sbatch job: torchrun's variables win.
    both = read_env({"RANK": "1", "WORLD_SIZE": "2", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"})
    assert both == DistEnv(1, 2, 0)
    assert first_host("node1,node2") == "node1" and first_host("a[10-12,15]") == "a10"


@pytest.mark.slow
def test_two_node_rendezvous_on_localhost(tmp_path):
    """Two torchrun agents, as on two nodes: --nnodes=2 with c10d rendezvous."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{port}",
        "--rdzv_id=twonode",
        HELPER,
        "train",
        str(tmp_path),
        *FAST,
        "train.max_steps=6",
        f"run.dir={tmp_path}/run",
    ]
    agents = [start(cmd, env) for _ in range(2)]
    outs = wait_all(agents, timeout=240)
    assert [a.returncode for a in agents] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    records = rank_records(tmp_path, 2)
    assert {r["summary"]["world_size"] for r in records} == {2}
    assert {r["summary"]["steps"] for r in records} == {6}
    assert len({r["hash"] for r in records}) == 1
