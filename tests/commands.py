"""What the tests run the way users do: the repository, and a command (`python -m ...`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_cli(
    *args: str,
    cwd: Path | None = None,
    timeout: float = 300,
    module: str = "distres.train",
    fresh: bool = False,
):
    """Run `python -m <module> args...` as a user would; returns the CompletedProcess.

    The command runs in a process forked from one with torch already imported (see
    launcher.py); fresh=True starts a new interpreter instead."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}  # this checkout
    if not fresh:
        from launcher import run_module

        return run_module(module, list(args), cwd=cwd or REPO, env=env, timeout=timeout)
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
