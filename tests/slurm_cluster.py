"""A private one-node Slurm cluster, for the Slurm tests: its own munged, slurmctld and slurmd,
configured through `SLURM_CONF`, with every path (config, key, socket, state, spool, logs, PID
files) in one directory of its own and its own ports on 127.0.0.1.

It touches nothing outside that directory: no write to /etc/slurm or /etc/munge, no system
munge socket, no daemon of an existing Slurm reused or signalled (a real cluster on the same
machine keeps running beside it, on its own ports). Its daemons run in the foreground as
children of the test process with a parent-death signal, so they end with it even if it is
killed; `stop()` (also called by `with Cluster(...)` and the tests' fixture on failure or
Ctrl-C) ends every process carrying the cluster's mark in its environment: the daemons, the
step daemons and whatever the jobs started.

Installs Debian's slurmctld, slurmd, slurm-client and munge when they are missing (with
invoke-rc.d told not to start their system services). Needs root; the tests skip with the
reason when that or the install is not possible.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
MARK = "DISTRES_TEST_SLURM"  # in the environment of every process the cluster starts
POLICY_RC = Path("/usr/sbin/policy-rc.d")
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


class Unavailable(RuntimeError):
    """Why there can be no cluster here (the tests skip with this reason)."""


def install() -> None:
    if all(shutil.which(x) for x in ("slurmctld", "slurmd", "sbatch", "munged", "mungekey")):
        return
    if os.geteuid() != 0:
        raise Unavailable("Slurm is not installed and installing it needs root")
    if not shutil.which("apt-get"):
        raise Unavailable("Slurm is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # The packages' scripts would start munge (and try slurmctld/slurmd) as system services:
    # daemons nobody stops. invoke-rc.d asks policy-rc.d first; 101 means "not allowed".
    own_policy = not POLICY_RC.exists()
    if own_policy:
        POLICY_RC.write_text("#!/bin/sh\n# written by distres's tests during apt-get\nexit 101\n")
        POLICY_RC.chmod(0o755)
    try:
        for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *PACKAGES]):
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
            if proc.returncode != 0:
                raise Unavailable(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-300:]}")
    finally:
        if own_policy:
            POLICY_RC.unlink(missing_ok=True)


def host() -> str:
    return socket.gethostname().split(".")[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child, after any change of user: SIGTERM when the test process dies."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def marked(mark: str) -> list[int]:
    """PIDs of the processes whose environment carries MARK=mark."""
    needle = f"{MARK}={mark}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:  # gone, or a kernel thread
            continue
    return pids


def tree_digest(path: Path) -> str | None:
    """What a directory holds (names, modes, contents), or None when it does not exist: to
    show that a run left it as it was."""
    if not path.exists():
        return None
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(f"{p.relative_to(path)}:{p.lstat().st_mode}".encode())
        if p.is_file() and not p.is_symlink():
            h.update(p.read_bytes())
    return h.hexdigest()


class Cluster:
    """One node (this host at 127.0.0.1), one partition `debug`, root as SlurmUser."""

    def __init__(self, root: Path | None = None, cpus: int | None = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="distres-slurm-"))
        self.cpus = cpus or os.cpu_count() or 1
        self.conf = self.root / "slurm.conf"
        self.mark = str(self.root)
        self.env = {**os.environ, "SLURM_CONF": str(self.conf), MARK: self.mark}
        self.procs: dict[str, subprocess.Popen] = {}

    # -- start --------------------------------------------------------------------------
    def start(self) -> Cluster:
        if os.geteuid() != 0:
            raise Unavailable("the private Slurm cluster runs its daemons as root")
        install()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        munge = self.root / "munge"
        for d in ("ctld", "spool", "log", "tmp"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        munge.mkdir(exist_ok=True)
        self.root.chmod(0o755)  # munged, as the munge user, must reach its own directory
        try:
            user = pwd.getpwnam("munge")
        except KeyError:
            raise Unavailable("the munge package created no munge user") from None
        os.chown(munge, user.pw_uid, user.pw_gid)
        munge.chmod(0o755)  # munged wants its socket directory reachable by all
        key = munge / "munge.key"
        self._run(["mungekey", "--create", f"--keyfile={key}"], user="munge")
        sock = munge / "munge.socket"
        self._daemon(
            "munged",
            ["munged", "--foreground", f"--socket={sock}", f"--key-file={key}",
             f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log",
             f"--seed-file={munge}/munged.seed"],
            user="munge",
        )  # fmt: skip
        self._wait(lambda: sock.exists(), 30, f"munged made no socket ({munge}/munged.log)")
        self.conf.write_text(self._conf_text(sock))
        (self.root / "plugstack.conf").write_text("")
        self._daemon("slurmctld", ["slurmctld", "-D", "-i"])
        self._daemon("slurmd", ["slurmd", "-D"])
        self.wait_idle()

    def _conf_text(self, sock: Path) -> str:
        r, name = self.root, host()
        # FirstJobId far from a system cluster's ids: sbatch scripts derive ports from them
        return f"""# written by distres's tests: a private one-node cluster in {r}
ClusterName=distrestest
SlurmctldHost={name}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={sock}
CredType=cred/munge
PlugStackConfig={r}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
KillWait=60
FirstJobId={random.randrange(10_000, 60_000)}
StateSaveLocation={r}/ctld
SlurmdSpoolDir={r}/spool
TmpFS={r}/tmp
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
NodeName={name} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes={name} Default=YES MaxTime=INFINITE State=UP
"""

    def _run(self, cmd: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=self.env, **kw
        )
        if proc.returncode != 0:
            raise Unavailable(f"{' '.join(cmd)} failed: {(proc.stderr or proc.stdout)[-300:]}")
        return proc

    def _daemon(self, name: str, cmd: list[str], user: str | None = None) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")  # noqa: SIM115 (the daemon's)
        self.procs[name] = subprocess.Popen(
            cmd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            user=user,
            preexec_fn=_die_with_parent,  # after the change of user, which would clear it
            cwd=self.root,
        )
        log.close()

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise Unavailable(f"{name} exited with {p.returncode} ({self.root}/log)")
            if time.monotonic() > deadline:
                raise Unavailable(what)
            time.sleep(0.2)

    def wait_idle(self, timeout: float = 60) -> None:
        state = ""

        def idle() -> bool:
            nonlocal state
            proc = self.client(["sinfo", "-h", "-o", "%T"])
            state = proc.stdout.strip()
            if state in ("down", "drained", "down*", "drain"):
                self.client(["scontrol", "update", f"nodename={host()}", "state=resume"])
            return state in ("idle", "mixed", "allocated")

        self._wait(idle, timeout, f"the Slurm node never became idle (state {state!r})")

    # -- use ----------------------------------------------------------------------------
    def client(self, cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
        """A client command against this cluster (its SLURM_CONF); never raises."""
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=self.env)

    def job_fields(self, job: str) -> dict[str, str]:
        out = self.client(["scontrol", "show", "job", job, "-o"]).stdout
        return dict(x.split("=", 1) for x in out.split() if "=" in x)

    def job_field(self, job: str, key: str) -> str:
        return self.job_fields(job).get(key, "")

    def wait_job(self, job: str, timeout: float) -> str:
        """The job's final state (COMPLETED, FAILED, ...)."""
        deadline, state = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            state = self.job_field(job, "JobState")
            if state in TERMINAL:
                return state
            time.sleep(1)
        raise TimeoutError(f"job {job} still {state!r} after {timeout} s")

    def log_tail(self, name: str, chars: int = 3000) -> str:
        """The end of a daemon's log (slurmd, slurmctld), for a failing test's message."""
        try:
            return (self.root / "log" / f"{name}.log").read_text(errors="replace")[-chars:]
        except OSError as e:
            return f"({e})"

    def steps_alive(self, job: str) -> bool:
        """Whether any step daemon of the job (its batch script included) still runs."""
        for pid in marked(self.mark):
            try:
                if f"slurmstepd: [{job}.".encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return True
            except OSError:
                continue
        return False

    # -- stop ---------------------------------------------------------------------------
    def stop(self, timeout: float = 30) -> None:
        """Cancel every job, end the daemons, then anything else left with the mark; remove
        the cluster's directory (the jobs' own output lies where they were told to write)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.client(["scancel", "--full", "--partition=debug", "--state=RUNNING"])
            self.client(["scancel", "--partition=debug"])
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.get(name)
            if p is not None and p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + timeout
        for p in self.procs.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        # step daemons and job processes outlive slurmd: everything still carrying the mark
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in marked(self.mark):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            end = time.monotonic() + 10
            while marked(self.mark) and time.monotonic() < end:
                time.sleep(0.1)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self if self.procs else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
