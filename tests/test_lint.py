import shutil
import subprocess

import pytest
from conftest import REPO


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff not installed (pip install .[dev])")
def test_ruff_clean():
    for cmd in (["ruff", "check", "."], ["ruff", "format", "--check", "."]):
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
