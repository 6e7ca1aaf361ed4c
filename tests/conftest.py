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
# Found from the config files: every configs/<family>.py with a "tiny" variant gives one, its config
# get_config("demo,tiny") (a new family is one model file and one config file; tests/test_tiny_runs.py).
TINY_VARIANT = "demo,tiny"


def load_config_module(path: Path):
    """A config file as launch.py's --config reads it: the module at `path`, by path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def discover_tiny_runs(configs: Path = REPO / "configs") -> dict[str, tuple[str, str]]:
    """family (the config file's stem) -> (config path relative to the repo, variant), for every config file
    in `configs` whose VARIANTS name "tiny"; common.py holds no family."""
    runs = {}
    for path in sorted(configs.glob("*.py")):
        if path.stem in {"__init__", "common"}:
            continue
        if "tiny" in getattr(load_config_module(path), "VARIANTS", ()):
            relative = path.relative_to(REPO) if path.is_relative_to(REPO) else path
            runs[path.stem] = (str(relative), TINY_VARIANT)
    return runs


TINY_RUNS = discover_tiny_runs()


def _tiny_config(family: str):
    path, variant = TINY_RUNS[family]
    return load_config_module(REPO / path).get_config(variant)


_TRAINED: dict = {}


def _train_tiny(family: str, workdir: Path) -> None:
    from certjax import train

    train.train_and_evaluate(_tiny_config(family), str(workdir))


def trained_workdir(family: str, root, shared=None) -> Path:
    """A workdir in `root` with a checkpoint of a tiny `family` model, trained once per test session.

    With `shared` (a directory every pytest-xdist worker of the session sees), the first worker to ask
    trains it there while the others wait on a file lock, and each worker copies the result into its own
    `root`: on 2 cores both workers used to train the same tiny runs, and the copy keeps what one worker
    writes beside a checkpoint (an evaluation's radii) away from the other's."""
    if family not in _TRAINED:
        workdir = Path(root) / family
        if shared is None:
            _train_tiny(family, workdir)
        else:
            import fcntl
            import shutil

            trained, done = Path(shared) / family, Path(shared) / f"{family}.done"
            with open(Path(shared) / f"{family}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if training raises
                if not done.exists():
                    shutil.rmtree(trained, ignore_errors=True)  # a worker that failed half way
                    _train_tiny(family, trained)
                    done.touch()
            shutil.copytree(trained, workdir)
        _TRAINED[family] = workdir
    return _TRAINED[family]


def _session_fixture():
    import pytest

    @pytest.fixture(scope="session")
    def tiny_run(tmp_path_factory):
        """family -> workdir of a tiny trained model (trained on first use, once per test session, shared
        by the pytest-xdist workers)."""
        root = tmp_path_factory.mktemp("tiny_runs")
        shared = None
        if os.environ.get("PYTEST_XDIST_WORKER"):  # the workers' base temps share the session's parent
            shared = tmp_path_factory.getbasetemp().parent / "tiny_runs_shared"
            shared.mkdir(exist_ok=True)
        return lambda family: trained_workdir(family, root, shared)

    return tiny_run


tiny_run = _session_fixture()


# Test order for two pytest-xdist workers (README: `-n 2 --dist worksteal`): worksteal hands each worker one
# contiguous half of the collection and an idle worker steals from the end of the other's queue, so the run
# ends late when a long module sits at the end of a half. The modules that take most of the suite's time
# (seconds of a 2-core run, from `--durations`; only the order uses them) go first in each half, split
# between the halves by their time; every module stays contiguous (module-scoped fixtures are built once).
MODULE_SECONDS = {
    "test_api": 260, "test_golden": 250, "test_lot": 250, "test_train": 175, "test_parallel": 160,
    "test_liresnet": 130, "test_sortnet": 110, "test_audit": 90, "test_failures": 60, "test_liresnet_pp": 60,
    "test_gpu_check": 50, "test_families": 40, "test_spectral": 60, "test_lot_certify": 35,
    "test_new_family": 25, "test_bronet": 150, "test_solve": 20, "test_64": 240, "test_sortnet_hybrid": 90,
    "test_label_check": 45,
}  # fmt: skip


def balanced_module_order(items: list) -> list:
    """`items` with whole modules reordered: two halves of equal count, each starting with its share of the
    MODULE_SECONDS modules (longest first, each to the half with less time so far), then the rest."""
    modules: dict[str, list] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)
    heavy = sorted(
        (m for m in modules if Path(m).stem in MODULE_SECONDS), key=lambda m: -MODULE_SECONDS[Path(m).stem]
    )
    halves, seconds = ([], []), [0, 0]
    for module in heavy:
        side = 0 if seconds[0] <= seconds[1] else 1
        halves[side].append(module)
        seconds[side] += MODULE_SECONDS[Path(module).stem]
    counts = [sum(len(modules[m]) for m in half) for half in halves]
    for module in (m for m in modules if m not in heavy):  # the rest fills the half with fewer tests
        side = 0 if counts[0] <= counts[1] else 1
        halves[side].append(module)
        counts[side] += len(modules[module])
    return [item for half in halves for module in half for item in modules[module]]


def pytest_collection_modifyitems(session, config, items):
    items[:] = balanced_module_order(items)
