"""Shared test set-up: the repo root on sys.path (configs/ is imported as a package), small helpers."""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def launch_env(devices: int = 1) -> dict:
    """Environment for a launch.py subprocess: CPU, `devices` host devices, the repo importable."""
    import os as _os

    env = dict(_os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def launch_command(config: str, workdir, *overrides: str, mode: str = "train") -> list[str]:
    return [sys.executable, str(REPO / "launch.py"), f"--config={config}", f"--workdir={workdir}",
            f"--mode={mode}", *overrides]  # fmt: skip


def run_launch(config: str, workdir, *overrides: str, mode: str = "train", devices: int = 1):
    """Run launch.py to completion; returns the CompletedProcess (text stdout / stderr)."""
    import subprocess

    command = launch_command(config, workdir, *overrides, mode=mode)
    return subprocess.run(command, env=launch_env(devices), cwd=REPO, capture_output=True, text=True)
