"""slurm/train.sbatch on a real one-node Slurm cluster (munged + slurmctld + slurmd, private to
these tests: tests/slurm_cluster.py): a full run, preemption with requeue and resume, scancel;
and that the cluster leaves the machine as it found it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import slurm_cluster
from commands import REPO
from multiproc import SMALL, resumes

# a real Slurm cluster
pytestmark = pytest.mark.slow

SBATCH = REPO / "slurm" / "train.sbatch"
ETC = Path("/etc/slurm")
TINY = [*SMALL, "run.threads=1", "tracking.log_every=1"]


def start(cluster: slurm_cluster.Cluster) -> slurm_cluster.Cluster:
    try:
        return cluster.start()
    except slurm_cluster.Unavailable as e:
        pytest.skip(f"no Slurm cluster here: {e}")


@pytest.fixture(scope="module")
def cluster():
    etc = slurm_cluster.tree_digest(ETC)  # after the packages' install, which owns it
    c = start(slurm_cluster.Cluster())
    try:
        yield c
    finally:  # also on a failure or Ctrl-C (pytest tears fixtures down then too)
        c.stop()
    assert not slurm_cluster.marked(c.mark), "a process of the test cluster outlived it"
    assert slurm_cluster.tree_digest(ETC) == etc, f"{ETC} changed"


def sbatch(cluster: slurm_cluster.Cluster, tmp: Path, *overrides: str) -> str:
    """Submit the real sbatch script, sized for this 2-CPU node (2 tasks, no GPU)."""
    env = {
        **cluster.env,
        "DISTRES_RUN_DIR": str(tmp / "run"),
        "DISTRES_PYTHON": sys.executable,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "NETRC": "/dev/null",
        "WANDB_MODE": "",  # W&B on (offline): the requeued job must continue the same run
    }
    env.pop("WANDB_API_KEY", None)
    cmd = ["sbatch", "--parsable", "--partition=debug", "--ntasks-per-node=2"]
    cmd += ["--cpus-per-task=1", "--gpus-per-node=0", "--time=15"]
    cmd += [f"--output={tmp}/slurm-%j.out", str(SBATCH), *TINY, *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def log(tmp: Path, job: str) -> str:
    return (tmp / f"slurm-{job}.out").read_text()


def wait_for_steps(cluster, job: str, tmp: Path, steps: int, timeout: float = 300) -> None:
    """Wait until the job has logged `steps` records. A job that ends first fails at once, and
    a timeout says where the job stood (pending on what, or running) with its output."""
    metrics, deadline = tmp / "run" / "metrics.jsonl", time.monotonic() + timeout
    fields: dict[str, str] = {}
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return
        fields = cluster.job_fields(job)
        if fields.get("JobState") in slurm_cluster.TERMINAL:
            break
        time.sleep(0.5)
    out = tmp / f"slurm-{job}.out"
    where = {k: fields.get(k) for k in ("JobState", "Reason", "StartTime", "RunTime")}
    raise AssertionError(
        f"job {job}: fewer than {steps} records in {metrics} ({where}); its output:\n"
        + (out.read_text()[-4000:] if out.exists() else "(none yet)")
        + "\nslurmctld log:\n"
        + cluster.log_tail("slurmctld")
        + "\nslurmd log:\n"
        + cluster.log_tail("slurmd")
    )


def test_a_full_run_through_sbatch(cluster, tmp_path):
    job = sbatch(cluster, tmp_path, "train.epochs=1")
    assert cluster.wait_job(job, timeout=300) == "COMPLETED", log(tmp_path, job)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stop_reason"] == "completed" and summary["world_size"] == 2
    assert summary["steps"] == 11
    out = log(tmp_path, job)
    assert "final val top-1" in out and "requeue" not in out
    assert cluster.job_field(job, "Restarts") == "0"  # a finished job stays finished


def test_preemption_checkpoints_requeues_and_resumes(cluster, tmp_path):
    job = sbatch(cluster, tmp_path, "train.epochs=3")
    wait_for_steps(cluster, job, tmp_path, 6)
    # The warning Slurm sends before a time limit or preemption, to the batch shell and steps.
    assert cluster.client(["scancel", "--signal=USR1", "--full", job]).returncode == 0
    deadline = time.monotonic() + 120
    while cluster.job_field(job, "Restarts") != "1":
        assert time.monotonic() < deadline, log(tmp_path, job)
        time.sleep(0.5)
    # Slurm holds a requeued job ~2 min before it is eligible again, long enough for the first
    # attempt to be cleaned up. Skip the wait, but only once that attempt is gone: no step
    # daemon of the job left and the job pending on its begin time (starting it earlier
    # races the cleanup and the new attempt fails at launch).
    while cluster.steps_alive(job) or cluster.job_field(job, "Reason") != "BeginTime":
        assert time.monotonic() < deadline + 120, log(tmp_path, job)
        time.sleep(1)
    time.sleep(2)
    cluster.client(["scontrol", "update", f"jobid={job}", "StartTime=now"])
    assert cluster.wait_job(job, timeout=300) == "COMPLETED", log(tmp_path, job)
    out = log(tmp_path, job)
    assert "asking every rank to checkpoint and stop" in out
    assert "stop requested by a signal; all ranks stopped at step" in out
    assert "requeueing job" in out and "(restart 1)" in out
    (resumed,) = resumes(tmp_path / "run")  # the second attempt continued the first
    assert resumed["step"] > 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stop_reason"] == "completed"
    assert summary["steps"] == 33  # the uninterrupted count: 11 steps x 3 epochs
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[1] for r in runs}) == 1


def test_scancel_sigterm_checkpoints_and_stops(cluster, tmp_path):
    job = sbatch(cluster, tmp_path, "train.epochs=3")
    wait_for_steps(cluster, job, tmp_path, 6)
    assert cluster.client(["scancel", job]).returncode == 0
    cluster.wait_job(job, timeout=180)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stop_reason"] == "preempted" and summary["steps"] < 33
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step-{summary['steps']:08d}"  # a checkpoint at the stop step


def test_srun_gives_each_rank_the_cpus_per_task(cluster, tmp_path):
    """Since Slurm 22.05 srun ignores SLURM_CPUS_PER_TASK: without SRUN_CPUS_PER_TASK each
    rank's step would get one CPU (TresPerStep=cpu:1, no TresPerTask) while OMP is told 2."""
    probe = tmp_path / "probe.sh"
    probe.write_text(
        "#!/bin/bash\n"
        'scontrol show step "${SLURM_JOB_ID}.${SLURM_STEP_ID}" -o > '
        f'"{tmp_path}/step-${{SLURM_PROCID}}.txt"\n'
        f'echo "$OMP_NUM_THREADS" > "{tmp_path}/omp.txt"\n'
    )
    probe.chmod(0o755)
    env = {**cluster.env, "DISTRES_PYTHON": str(probe), "DISTRES_RUN_DIR": str(tmp_path / "run")}
    env.pop("OMP_NUM_THREADS", None)
    cmd = [
        "sbatch",
        "--parsable",
        "--partition=debug",
        "--ntasks-per-node=1",
        "--cpus-per-task=2",
        "--gpus-per-node=0",
        "--time=5",
        f"--output={tmp_path}/slurm-%j.out",
        str(SBATCH),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    assert cluster.wait_job(job, timeout=120) == "COMPLETED", log(tmp_path, job)
    step = (tmp_path / "step-0.txt").read_text().split()
    assert "TresPerTask=cpu:2" in step and "TresPerStep=cpu:2" in step, step
    assert (tmp_path / "omp.txt").read_text().strip() == "2"


def test_the_cluster_touches_nothing_outside_its_directory(tmp_path):
    """Beside a Slurm already running here (a first private cluster stands in for it), a
    second starts, runs a job and stops: its daemons and jobs are gone, the first still
    serves, and /etc/slurm and /etc/munge are as they were."""
    etc = {p: slurm_cluster.tree_digest(p) for p in (ETC, Path("/etc/munge"))}
    with start(slurm_cluster.Cluster()) as existing:
        etc = {p: slurm_cluster.tree_digest(p) for p in etc}  # after the packages' install
        ours = start(slurm_cluster.Cluster())
        try:
            out = tmp_path / "job.out"
            cmd = ["sbatch", "--parsable", "--wrap", "srun hostname", f"--output={out}"]
            job = ours.client(cmd).stdout.strip()
            assert ours.wait_job(job, timeout=60) == "COMPLETED", out.read_text()
            assert out.read_text().strip() == slurm_cluster.host()
            daemons = [p.pid for p in ours.procs.values()]
            assert daemons and all(psutil.pid_exists(pid) for pid in daemons)
            assert ours.client(["scontrol", "show", "job", job]).returncode == 0
            # the other cluster never saw the job: its controller is another
            assert existing.client(["scontrol", "show", "job", job]).returncode != 0
        finally:
            ours.stop()
        assert not any(_alive(pid) for pid in daemons)
        assert not slurm_cluster.marked(ours.mark) and not ours.root.exists()
        assert existing.client(["sinfo", "-h", "-o", "%T"]).stdout.strip() == "idle"
        assert all(p.poll() is None for p in existing.procs.values())  # undisturbed
    assert not slurm_cluster.marked(existing.mark)
    assert {p: slurm_cluster.tree_digest(p) for p in etc} == etc


def _alive(pid: int) -> bool:
    """Running (a zombie left for init to reap has stopped running)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
