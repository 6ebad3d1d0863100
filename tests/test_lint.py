import shutil
import subprocess

import pytest
from commands import REPO


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff not installed (pip install .[dev])")
def test_ruff_clean():
    # --no-cache: ruff's cache does not notice a new top-level directory that changes which
    # imports are first-party, so a cached "clean" can hide what a fresh clone reports.
    for cmd in (
        ["ruff", "check", "--no-cache", "."],
        ["ruff", "format", "--no-cache", "--check", "."],
    ):
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
