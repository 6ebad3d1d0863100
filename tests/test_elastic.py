"""Elastic membership with real torchrun agents (through `python -m distres.launch`) and a
rendezvous store outside both: an agent SIGKILLed mid-epoch, a new agent that joins, the
store killed. Every wait has a deadline; every process tree is killed at the end."""

from __future__ import annotations

import contextlib
import json
import re
import time
from pathlib import Path

import pytest
from commands import REPO
from launcher import kill_tree, start_module
from multiproc import EXACT, SMALL, assert_same_weights, env_with, records, resumes, train

from distres.components.sample_log import read_steps

pytestmark = pytest.mark.slow

# 2 ranks x 32 = the global batch of 64 on every world size (grad_accum 2 on one rank):
# 22 steps an epoch, 66 in all, a checkpoint every 3 steps, digits at 32 px.
RUN = [
    *(o for o in EXACT if o not in SMALL and not o.startswith("train.epochs")),
    "train.epochs=3",
    "data.backend=torch",
    "train.batch_size=32",
    "train.global_batch=64",
    "tracking.sample_log=true",
    "tracking.wandb=offline",
]
# rendezvous timings for a test (docs/elastic.md gives a cluster's)
RDZV_CONF = "is_host=false,last_call_timeout=2,keep_alive_interval=2,keep_alive_max_attempt=3"


class Job:
    """A store process and the agents of one elastic job, their output under `logs`."""

    def __init__(self, tmp_path: Path, run_dir: Path):
        self.logs, self.run_dir = tmp_path / "logs", run_dir
        self.logs.mkdir()
        self.procs: dict[str, object] = {}
        store = self.start("store", "distres.launch", ["store", "--host", "127.0.0.1",
                                                        "--port", "0"])  # fmt: skip
        self.port = int(self.wait_for("store", r"listening on 127\.0\.0\.1:(\d+)", 60)[1])
        assert store.is_alive()

    def start(self, name: str, module: str, args: list[str]):
        proc = start_module(module, args, cwd=REPO, env=env_with(WANDB_MODE="offline"),
                            out=str(self.logs / f"{name}.out"),
                            err=str(self.logs / f"{name}.err"))  # fmt: skip
        self.procs[name] = proc
        return proc

    def agent(self, name: str):
        return self.start(name, "distres.launch", [
            "--nnodes=1:2", "--nproc_per_node=1", "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{self.port}", "--rdzv_id=elastic-test",
            f"--rdzv-conf={RDZV_CONF}", "--max-restarts=3", "--monitor-interval=1",
            "--run-path", "--start-method=fork", str(REPO / "distres" / "train.py"),
            f"run.dir={self.run_dir}", *RUN,
        ])  # fmt: skip

    def output(self, name: str) -> str:
        paths = (self.logs / f"{name}.{kind}" for kind in ("out", "err"))
        return "".join(p.read_text(errors="replace") for p in paths if p.exists())

    def wait_for(self, name: str, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if m := re.search(pattern, self.output(name)):
                return m
            time.sleep(0.2)
        raise AssertionError(f"{name}: no {pattern!r} in {timeout} s:\n{self.tail()}")

    def wait_until(self, what, timeout: float, message: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if value := what():
                return value
            time.sleep(0.2)
        raise AssertionError(f"{message} within {timeout} s:\n{self.tail()}")

    def exit_code(self, name: str, timeout: float) -> int:
        proc = self.procs[name]
        proc.join(timeout)
        assert not proc.is_alive(), f"{name} still running after {timeout} s:\n{self.tail()}"
        return proc.exitcode

    def tail(self) -> str:
        return "\n".join(f"--- {n}:\n{self.output(n)[-2500:]}" for n in self.procs)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.is_alive():
                kill_tree(proc.pid)
            proc.join(10)


@pytest.fixture
def job(tmp_path):
    j = Job(tmp_path, tmp_path / "elastic")
    try:
        yield j
    finally:
        j.close()


def steps_logged(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line being written
            out.append(json.loads(line))
    return out


def test_an_agent_lost_and_one_joining_keep_the_run_exact(job, tmp_path):
    """Agents A and B (a rank each) train; B's whole tree is SIGKILLed mid-epoch; A restarts
    alone from the last checkpoint (the global batch kept: 2 micro-batches a step); agent C
    joins and A's rank stops at a step with a checkpoint, both restart on 2 ranks from it,
    and the run completes. It trains every epoch's samples once each, and ends bitwise
    equal to a run stopped and resumed by hand at the same steps on the same world sizes."""
    run = job.run_dir
    job.agent("A"), job.agent("B")
    job.wait_until(
        lambda: (run / "checkpoints" / "latest").exists()
        and max((r["step"] for r in steps_logged(run) if r["event"] == "train"), default=0) >= 5,
        240, "2 ranks past step 5 with a checkpoint",
    )  # fmt: skip
    kill_tree(job.procs["B"].pid)
    killed_at = time.monotonic()
    shrunk = job.wait_until(
        lambda: [r for r in resumes(run) if r["world_size"] == [2, 1]], 180,
        "A's rank resumed alone",
    )[0]  # fmt: skip
    lost_s = time.monotonic() - killed_at
    job.wait_until(
        lambda: any(r["event"] == "train" and r["step"] >= shrunk["step"] + 2
                    for r in steps_logged(run)),
        120, "A's rank training alone",
    )  # fmt: skip
    job.agent("C")
    joined_at = time.monotonic()
    grown = job.wait_until(
        lambda: [r for r in resumes(run) if r["world_size"] == [1, 2]], 180, "A and C on 2 ranks"
    )[0]
    join_s = time.monotonic() - joined_at
    assert job.exit_code("A", 400) == 0 and job.exit_code("C", 60) == 0, job.tail()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 66 and summary["global_batch"] == 64
    assert summary["samples_seen"] == 66 * 64
    print(f"lost an agent: A's rank resumed alone {lost_s:.1f} s after the kill; "
          f"a join took effect in {join_s:.1f} s")  # fmt: skip

    # every epoch's samples once each; every step the global batch of the config
    steps = read_steps(run)
    assert sorted(steps) == list(range(1, 67))
    assert {s: steps[s]["world"] for s in (shrunk["step"] + 1, grown["step"] + 1)} == {
        shrunk["step"] + 1: 1,
        grown["step"] + 1: 2,
    }
    for epoch in range(3):
        keys = [k for s in steps.values() if s["epoch"] == epoch for k in s["keys"]]
        assert len(keys) == len(set(keys)) == 22 * 64, epoch
    # the LR schedule of the config: the same per-step values as the run by hand below
    by_hand = tmp_path / "by-hand"
    for world, stop in ((2, shrunk["step"]), (1, grown["step"]), (2, None)):
        proc = train(world, by_hand, *RUN, timeout=400,
                     **({"DISTRES_FAILPOINT": f"stop@{stop}"} if stop else {}))  # fmt: skip
        if stop:  # torchrun says 1 for the rank's 3 (preempted): the checkpoint says where
            latest = (by_hand / "checkpoints" / "latest").read_text().strip()
            assert latest == f"step-{stop:08d}", proc.stderr[-3000:]
        else:
            assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_weights(by_hand, run)
    trained = [r for r in records(run) if r["event"] == "train"]
    assert trained == [r for r in records(by_hand) if r["event"] == "train"]
    hand = read_steps(by_hand)
    assert all(sorted(hand[s]["keys"]) == sorted(steps[s]["keys"]) for s in steps)
    # W&B: one run, continued by every attempt
    ids = {p.name.rsplit("-", 1)[1] for p in (run / "wandb").glob("offline-run-*")}
    assert len(ids) == 1, ids


def test_the_store_killed_ends_both_agents_promptly(job):
    run = job.run_dir
    job.agent("A"), job.agent("B")
    job.wait_until(
        lambda: max((r["step"] for r in steps_logged(run) if r["event"] == "train"),
                    default=0) >= 2,
        240, "2 ranks training",
    )  # fmt: skip
    kill_tree(job.procs["store"].pid)
    t0 = time.monotonic()
    codes = [job.exit_code(a, 90) for a in "AB"]
    took = time.monotonic() - t0
    assert all(c != 0 for c in codes), codes
    for a in "AB":
        assert "the rendezvous store 127.0.0.1" in job.output(a), job.tail()
        assert "Traceback" not in job.output(a), job.tail()
    print(f"both agents ended {took:.1f} s after the store was killed, codes {codes}")
    assert took < 60


def test_the_store_command_refuses_a_port_in_use(tmp_path):
    import socket

    from commands import run_cli

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = run_cli("store", "--host", "127.0.0.1", "--port", str(port),
                       module="distres.launch", timeout=60)  # fmt: skip
    assert proc.returncode == 2 and "cannot listen on 127.0.0.1" in proc.stderr
