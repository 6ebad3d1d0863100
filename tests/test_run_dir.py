"""A run directory has one writer at a time (distres/artifacts/lock.py), and a write that fails
is one line with its own exit code, leaving the last committed checkpoint intact and nothing
half-written that blocks the next start (distres/io.py, distres/checkpoint/store.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from commands import REPO, run_cli

from distres import errors
from distres.artifacts.lock import RunDirLock
from distres.dist import DistEnv

TINY = ["data.image_size=16", "data.val_resize=16", "tracking.progress=log",
        "tracking.plots=false", "run.threads=1"]  # fmt: skip


def holder(run_dir: Path) -> subprocess.Popen:
    """Another process holding run_dir's lock until it is killed."""
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from distres.artifacts.lock import RunDirLock\n"
        "from distres.dist import DistEnv\n"
        f"lock = RunDirLock(Path({str(run_dir)!r}), DistEnv()).__enter__()\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_run_dir_is_refused_naming_its_holder_and_a_dead_holders_is_taken(tmp_path):
    other = holder(tmp_path)
    try:
        with (
            pytest.raises(errors.RunDirLocked, match=f"pid {other.pid} on "),
            RunDirLock(tmp_path, DistEnv()),
        ):
            pass
    finally:
        other.kill()
        other.wait(30)
    with RunDirLock(tmp_path, DistEnv()):  # SIGKILLed: its lock went with it
        info = json.loads((tmp_path / ".lock").read_text())
        assert info["pid"] == os.getpid()
    # and a fork of the holder (a DataLoader worker) holds nothing once the holder is gone
    with RunDirLock(tmp_path, DistEnv()):
        pid = os.fork()
        if pid == 0:  # the child outlives the lock's holder for a moment
            time.sleep(3)
            os._exit(0)
    try:
        with RunDirLock(tmp_path, DistEnv()):
            pass
    finally:
        os.waitpid(pid, 0)


def test_sweeping_at_the_start_removes_what_crashed_writes_left(tmp_path):
    (tmp_path / "final").mkdir()
    stale = [tmp_path / ".summary.json.abc123.tmp", tmp_path / "final" / ".model.yaml.x.tmp"]
    for p in stale:
        p.write_text("half")
    with RunDirLock(tmp_path, DistEnv()):
        assert not any(p.exists() for p in stale)


@pytest.mark.slow
def test_a_second_start_on_a_running_run_dir_stops_in_one_line(tmp_path):
    """The same command twice (a double submit): the second exits 8 at once, naming the first;
    torchrun's ranks all stop too (distres.launch passes the code on). After the first is
    SIGKILLed, the next start takes the directory over and resumes it."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(
        [sys.executable, "-m", "distres.train", *TINY, "train.epochs=200",
         "checkpoint.every_steps=5", f"run.dir={run_dir}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoints" / "latest").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()
            time.sleep(0.2)
        second = run_cli(*TINY, f"run.dir={run_dir}", timeout=120)
        assert second.returncode == errors.LOCKED, second.stderr[-2000:]
        line = second.stderr.strip().splitlines()[-1]
        assert line.startswith("distres: run directory in use: ") and f"pid {first.pid}" in line
        launched = run_cli("--nproc_per_node=2", "--", *TINY, f"run.dir={run_dir}",
                           module="distres.launch", timeout=180)  # fmt: skip
        assert launched.returncode == errors.LOCKED, launched.stderr[-2000:]
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the whole tree: workers too
        first.wait(30)
    third = run_cli(*TINY, "train.max_steps=12", f"run.dir={run_dir}", timeout=300)
    assert third.returncode == 0, third.stderr[-2000:]
    assert "resumed from" in third.stderr + third.stdout


def _mount(where: Path, size: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        pytest.skip(f"no small filesystem to fill here (mount: {proc.stderr.strip()[:200]})")


def _remount(where: Path, size: str) -> None:
    opts = f"remount,size={size}"
    subprocess.run(["mount", "-o", opts, str(where)], check=True, timeout=30)


@pytest.fixture
def small_fs(tmp_path):
    """A tmpfs of its own (root may mount one), unmounted at the end."""
    where = tmp_path / "fs"
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    yield where, lambda size: (_mount(where, size) if not os.path.ismount(where)
                               else _remount(where, size))  # fmt: skip
    if os.path.ismount(where):
        subprocess.run(["umount", "-l", str(where)], timeout=30)


@pytest.mark.slow
def test_a_full_disk_is_one_line_exit_7_latest_intact_and_a_resume_once_freed(small_fs, tmp_path):
    where, size = small_fs
    common = [*TINY, "checkpoint.every_steps=4", "checkpoint.keep_last=2", "train.max_steps=12"]
    # how large a checkpoint of this run is, written where space is plenty
    probe = run_cli(*common, "train.max_steps=4", f"run.dir={tmp_path / 'probe'}")
    assert probe.returncode == 0, probe.stderr[-2000:]
    one = sum(f.stat().st_size for f in (tmp_path / "probe" / "checkpoints").rglob("*")
              if f.is_file() and "step-" in str(f))  # fmt: skip
    # room for the first checkpoint and the run's other files, not for a second one
    size(f"{int(one * 1.6) // 1024 + 64}k")
    run_dir = where / "run"
    full = run_cli(*common, f"run.dir={run_dir}", timeout=300)
    assert full.returncode == errors.WRITE, full.stderr[-2000:]
    line = full.stderr.strip().splitlines()[-1]
    assert line.startswith("distres: write error: checkpoint step 8: not written (")
    assert "no space left on the device" in line and "latest is still step-00000004" in line
    assert "Traceback" not in full.stderr
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-00000004"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-00000004"]
    # a crash's leftovers (a checkpoint half-written, a temporary file) go at the next start
    (ckpts / ".tmp-step-00000099").mkdir()
    (run_dir / ".summary.json.x.tmp").write_text("half")
    size("64m")  # space freed
    resumed = run_cli(*common, f"run.dir={run_dir}", timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr + resumed.stdout
    assert not (ckpts / ".tmp-step-00000099").exists()
    assert not (run_dir / ".summary.json.x.tmp").exists()
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 12


@pytest.mark.slow
def test_retention_makes_room_before_a_save_that_would_not_fit(small_fs, tmp_path):
    """keep_last=2 on a disk with room for two and a half checkpoints: the third save first
    removes the one retention would remove after it (never the one latest names)."""
    where, size = small_fs
    common = [*TINY, "checkpoint.every_steps=4", "checkpoint.keep_last=2",
              "checkpoint.keep_best=false", "checkpoint.save_final=false",
              "train.max_steps=12"]  # fmt: skip
    probe = run_cli(*common, "train.max_steps=4", f"run.dir={tmp_path / 'probe'}")
    assert probe.returncode == 0, probe.stderr[-2000:]
    one = sum(f.stat().st_size for f in (tmp_path / "probe" / "checkpoints").rglob("*")
              if f.is_file() and "step-" in str(f))  # fmt: skip
    size(f"{int(one * 2.6) // 1024 + 64}k")
    proc = run_cli(*common, f"run.dir={where / 'run'}", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "making room for the next checkpoint: removing" in proc.stderr
    assert "step-00000004 early" in proc.stderr
    ckpts = where / "run" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-00000012"
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-00000008", "step-00000012"]


def test_a_run_in_this_process_already_holds_it(tmp_path):
    with RunDirLock(tmp_path, DistEnv()), pytest.raises(errors.RunDirLocked, match="this process"):
        RunDirLock(tmp_path, DistEnv()).__enter__()


def test_a_filesystem_without_locks_runs_with_a_warning(tmp_path, monkeypatch, capfd):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    with RunDirLock(tmp_path, DistEnv()):
        pass
    assert "this filesystem takes no locks" in capfd.readouterr().err


def test_making_room_never_removes_the_checkpoint_latest_names(tmp_path, monkeypatch):
    import shutil

    from distres.checkpoint import CheckpointStore

    root = tmp_path / "checkpoints"
    for step in (4, 8):
        (root / f"step-{step:08d}").mkdir(parents=True)
        (root / f"step-{step:08d}" / "data").write_bytes(b"x" * 1000)
    (root / "latest").write_text("step-00000008\n")
    full = type("Usage", (), {"free": 10})()
    monkeypatch.setattr(shutil, "disk_usage", lambda path: full)
    for keep_last in (1, 2):
        store = CheckpointStore(root, rank=0, world_size=1, keep_last=keep_last,
                                keep_best=False, mode="max", async_save=False)  # fmt: skip
        store._make_room()
        assert (root / "step-00000008").is_dir()
    assert not (root / "step-00000004").exists()  # keep_last=2: the one retention would drop
