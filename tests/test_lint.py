"""The repository passes its own linter and formatter settings (pyproject.toml [tool.ruff]): merged branches
had let long lines and unformatted files in unnoticed."""

import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO


def _ruff(*args: str) -> subprocess.CompletedProcess:
    command = [shutil.which("ruff")] if shutil.which("ruff") else [sys.executable, "-m", "ruff"]
    return subprocess.run([*command, *args], cwd=REPO, capture_output=True, text=True)


@pytest.mark.parametrize("args", [("check", "."), ("format", "--check", ".")], ids=["check", "format"])
def test_ruff_is_clean(args):
    result = _ruff(*args)
    assert result.returncode == 0, result.stdout + result.stderr
