"""Shared test set-up: the repo root on sys.path (configs/ is imported as a package), small helpers."""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _share_compilations() -> None:
    """One persistent XLA compilation cache for this test session, in this process and every launch.py
    subprocess it starts (they inherit the environment): the end-to-end tests train, kill, resume and
    evaluate the same tiny configs many times, and on 2 cores recompiling the same train step in every
    process was a large share of the suite's time. Entries are keyed by the program's HLO, jax/jaxlib
    versions and flags, so a hit is the same executable. A fresh directory per session (set
    CERTJAX_TEST_JAX_CACHE to keep one across sessions); pytest-xdist workers inherit the controller's."""
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    import atexit
    import shutil
    import tempfile

    directory = os.environ.get("CERTJAX_TEST_JAX_CACHE") or tempfile.mkdtemp(prefix="certjax-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = directory
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    if "CERTJAX_TEST_JAX_CACHE" not in os.environ:
        atexit.register(shutil.rmtree, directory, ignore_errors=True)


_share_compilations()


def _pin_cpu_isa() -> None:
    """XLA:CPU compiles for the host's instruction set, and the vector width changes the order of float
    reductions: the golden outputs (tests/golden, recorded on an AVX2 machine) differ in their last bits on an
    AVX-512 machine even at the code that recorded them. Capping the ISA at AVX2 for the whole session (and
    every subprocess, which inherits the environment) makes the suite's numbers the same on every x86 machine
    we run on; without the cap, 3bc3da5's own test_golden fails on an AVX-512 host."""
    import platform

    flag = "--xla_cpu_max_isa=AVX2"
    flags = os.environ.get("XLA_FLAGS", "")
    if platform.machine().lower() in ("x86_64", "amd64") and "xla_cpu_max_isa" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()


_pin_cpu_isa()


def launch_env(devices: int = 1) -> dict:
    """Environment for a launch.py subprocess: CPU, `devices` host devices, the repo importable."""
    import os as _os

    env = dict(_os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    isa = " --xla_cpu_max_isa=AVX2" if "--xla_cpu_max_isa=AVX2" in _os.environ.get("XLA_FLAGS", "") else ""
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}{isa}"
    return env


def launch_command(config: str, workdir, *overrides: str, mode: str = "train") -> list[str]:
    return [sys.executable, str(REPO / "launch.py"), f"--config={config}", f"--workdir={workdir}",
            f"--mode={mode}", *overrides]  # fmt: skip


def run_launch(config: str, workdir, *overrides: str, mode: str = "train", devices: int = 1):
    """Run launch.py to completion; returns the CompletedProcess (text stdout / stderr)."""
    import subprocess

    command = launch_command(config, workdir, *overrides, mode=mode)
    return subprocess.run(command, env=launch_env(devices), cwd=REPO, capture_output=True, text=True)


# Tiny models of every family, trained for a few steps on the embedded real CIFAR-10 sample, with their
# orbax checkpoints in a workdir as launch.py leaves them: for the API, --mode=certify and export tests.
_LINF_TINY = {"model.depth": 3, "model.width": 32, "certify.eps": 2 / 255}
TINY_RUNS = {
    "linf_dist": ("configs/linf_dist.py", "demo", _LINF_TINY),
    "sortnet": ("configs/sortnet.py", "demo,nodropout", _LINF_TINY),
    "lot": ("configs/lot.py", "S,demo,cosine",
            {"model.init_channels": 4, "optimizer.lr": 0.05, "certify.eps": 0.02}),
    "liresnet": ("configs/liresnet.py", "XS,demo",
                 {"model.width": 8, "model.neck_features": 32, "model.eval_power_iterations": 50,
                  "optimizer.warmup_epochs": 0, "certify.eps": 0.02}),
    "liresnet_pp": ("configs/liresnet_pp.py", "demo",
                    {"model.width": 8, "model.neck_features": 32, "model.eval_power_iterations": 50,
                     "optimizer.warmup_epochs": 0, "certify.eps": 0.02}),
}  # fmt: skip


def _tiny_config(family: str):
    import importlib.util

    path, variant, overrides = TINY_RUNS[family]
    spec = importlib.util.spec_from_file_location(f"_tiny_{family}", REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(variant)
    settings = {
        "train.epochs": 1, "train.batch_size": 64, "data.real_subset": 256, "train.eval_batch_size": 250,
        "train.eval_subset": 250, "checkpoint.every_epochs": 1, **overrides,
    }  # fmt: skip
    for key, value in settings.items():
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


_TRAINED: dict = {}


def trained_workdir(family: str, root) -> Path:
    """A workdir with a checkpoint of a tiny `family` model (trained once per test session)."""
    if family not in _TRAINED:
        from certjax import train

        workdir = Path(root) / family
        train.train_and_evaluate(_tiny_config(family), str(workdir))
        _TRAINED[family] = workdir
    return _TRAINED[family]


def _session_fixture():
    import pytest

    @pytest.fixture(scope="session")
    def tiny_run(tmp_path_factory):
        """family -> workdir of a tiny trained model (trained on first use, once per test session)."""
        root = tmp_path_factory.mktemp("tiny_runs")
        return lambda family: trained_workdir(family, root)

    return tiny_run


tiny_run = _session_fixture()
