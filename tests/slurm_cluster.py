"""A real one-node Slurm cluster on this machine, for the Slurm tests.

Installs Debian's slurmctld, slurmd, slurm-client and munge when they are missing, writes a
slurm.conf naming this host (`hostname -s`) with its CPUs, starts munged as the munge user,
then slurmctld and slurmd, and waits until the node is idle. Needs root; the tests skip with
the reason when that or the install is not possible.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

CONF = Path("/etc/slurm/slurm.conf")
# Our own state: slurmctld refuses a StateSaveLocation that another cluster name wrote
# ("CLUSTER NAME MISMATCH"), as on a machine that ran Slurm before.
STATE = "/var/spool/distres-slurm"
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]


class Unavailable(RuntimeError):
    """Why there can be no cluster here (the tests skip with this reason)."""


def _run(cmd: list[str], timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=check)


def install() -> None:
    if all(shutil.which(x) for x in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if not shutil.which("apt-get"):
        raise Unavailable("Slurm is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *PACKAGES]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
        if proc.returncode != 0:
            raise Unavailable(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-300:]}")


def host() -> str:
    return socket.gethostname().split(".")[0]


def write_conf(cpus: int) -> None:
    name = host()
    CONF.parent.mkdir(parents=True, exist_ok=True)
    CONF.write_text(
        f"""# written by distres's tests: a one-node cluster on {name}
ClusterName=distres
SlurmctldHost={name}
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=60
StateSaveLocation={STATE}/ctld
SlurmdSpoolDir={STATE}/d
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName={name} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={name} Default=YES MaxTime=INFINITE State=UP
"""
    )
    for d in (f"{STATE}/ctld", f"{STATE}/d", "/var/log/slurm", "/run/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)


def running(name: str) -> bool:
    return subprocess.run(["pgrep", "-x", name], capture_output=True).returncode == 0


def start() -> None:
    if not Path("/etc/munge/munge.key").is_file():
        _run(["/usr/sbin/mungekey", "--create"], check=False)
    shutil.chown("/run/munge", "munge", "munge")
    if not running("munged"):
        _run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"])
    if not running("slurmctld"):
        _run(["slurmctld"])
    if not running("slurmd"):
        _run(["slurmd"])


def wait_idle(timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        proc = _run(["sinfo", "-h", "-o", "%T"], check=False, timeout=30)
        state = proc.stdout.strip()
        if state in ("idle", "mixed", "allocated"):
            return
        if state in ("down", "drained", "down*", "drain"):
            _run(["scontrol", "update", f"nodename={host()}", "state=resume"], check=False)
        time.sleep(1)
    raise Unavailable(f"the Slurm node never became idle (state {state!r})")


def ensure() -> None:
    """A running one-node cluster, or Unavailable saying why not."""
    if os.geteuid() != 0:
        raise Unavailable("starting Slurm needs root")
    install()
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    if "UP" not in ping.stdout or not running("slurmd"):
        write_conf(os.cpu_count() or 1)
        start()
    wait_idle()


def wait_job(job: str, timeout: float) -> str:
    """The job's final state (COMPLETED, FAILED, ...), polling sacct-less via scontrol."""
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        proc = _run(["scontrol", "show", "job", job, "-o"], check=False, timeout=30)
        fields = dict(x.split("=", 1) for x in proc.stdout.split() if "=" in x)
        state = fields.get("JobState", "")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(1)
    raise TimeoutError(f"job {job} still {state!r} after {timeout} s")


def job_field(job: str, key: str) -> str:
    proc = _run(["scontrol", "show", "job", job, "-o"], check=False, timeout=30)
    fields = dict(x.split("=", 1) for x in proc.stdout.split() if "=" in x)
    return fields.get(key, "")


def steps_alive(job: str) -> bool:
    """Whether any step daemon of the job (its batch script included) still runs here."""
    proc = subprocess.run(["pgrep", "-f", f"slurmstepd: \\[{job}\\."], capture_output=True)
    return proc.returncode == 0
