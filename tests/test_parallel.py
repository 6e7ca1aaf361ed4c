"""Data parallelism: 8 host devices and two cooperating processes train the same model as one device.

Each run is a real `launch.py` subprocess (XLA_FLAGS / jax.distributed must be set before JAX starts) on the
embedded CIFAR-10 sample; the parameters and model state (mean-shift running means) of the final orbax
checkpoints are compared leaf by leaf.

Tolerance. Sharding changes only the order of float32 sums over the batch (per-device partial sums, then an
all-reduce, instead of one sum), so the runs agree to float32 rounding, not bitwise. With SGD (lr 1, 8 steps)
we measured at most 2.3e-7 (l_inf-dist Net) and 2.6e-7 (SortNet with dropout) of each leaf's largest
magnitude on 8 devices, and 1.1e-7 with two processes: a few ulps. We assert 1e-5 of each leaf's largest
magnitude: ~40x the measured rounding, and far below how much training moves the model in the last 4 steps
alone (measured 0.36-0.40 of the largest leaf; asserted > 100x the tolerance, so the comparison has teeth).
An error in the data-parallel semantics (statistics over a per-device batch of 8 instead of the global 64,
dropout masks drawn per device) would change the updates at O(1). Adam is not used here: it divides by
sqrt(v), so a coordinate whose gradient is itself at rounding level moves by up to lr either way (measured:
7.6e-4 of the leaf's magnitude after 8 steps), a tolerance too loose to catch anything.
"""

import json
import socket
import subprocess
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.conftest import REPO, launch_command, launch_env

RTOL = 1e-5
CONFIGS = {"linf_dist": "configs/linf_dist.py:demo", "sortnet": "configs/sortnet.py:demo"}
COMMON = [
    "--config.model.depth=3",
    "--config.model.width=32",
    "--config.train.batch_size=64",
    "--config.data.real_subset=256",  # 4 steps per epoch
    "--config.train.epochs=2",
    "--config.checkpoint.every_epochs=1",
    "--config.train.eval_batch_size=250",
    "--config.train.eval_subset=500",
    "--config.optimizer.name=sgd",
    "--config.optimizer.weight_decay=0.0",
    "--config.optimizer.lr=1.0",
]


def _command(family: str, workdir, *extra, mode="train") -> list[str]:
    return launch_command(CONFIGS[family], workdir, *COMMON, *extra, mode=mode)


def _run(command, devices: int) -> subprocess.CompletedProcess:
    result = subprocess.run(command, env=launch_env(devices), cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def restore_anywhere(state_dir: Path):
    """A checkpoint's arrays on this process's first device, whatever mesh saved them."""
    checkpointer = ocp.StandardCheckpointer()
    metadata = checkpointer.metadata(state_dir).item_metadata.tree
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
    return checkpointer.restore(state_dir, target)


def _saved_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _model(workdir: Path, step: int | None = None):
    """(step, {"params", "model_state"}) of the last (or the given) checkpoint."""
    step = _saved_steps(workdir)[-1] if step is None else step
    state = restore_anywhere(workdir / "checkpoints" / str(step) / "state")
    return step, {"params": state["params"], "model_state": state["model_state"]}


def _largest_relative_change(a, b) -> float:
    return max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        / max(float(np.max(np.abs(np.asarray(x)))), 1e-12)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
        if np.size(x)
    )


def assert_states_close(a, b, rtol=RTOL) -> float:
    """Every leaf equal within rtol of the leaf's largest magnitude; returns the worst relative difference."""
    leaves_a = jax.tree_util.tree_leaves_with_path(a)
    leaves_b = jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b]
    worst = 0.0
    for (path, x), (_, y) in zip(leaves_a, leaves_b):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if not x.size:
            continue
        scale = max(np.max(np.abs(x)), 1e-12)
        diff = float(np.max(np.abs(x - y)) / scale)
        worst = max(worst, diff)
        assert diff <= rtol, f"{jax.tree_util.keystr(path)}: relative difference {diff:.3g} > {rtol}"
    return worst


@pytest.fixture(scope="module")
def single_device_runs(tmp_path_factory):
    """One process, one device: the reference for every family."""
    out = {}
    for family in CONFIGS:
        workdir = tmp_path_factory.mktemp(f"one_{family}")
        _run(_command(family, workdir), devices=1)
        out[family] = workdir
    return out


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_eight_host_devices_train_like_one(tmp_path, single_device_runs, family):
    result = _run(_command(family, tmp_path / "eight"), devices=8)
    assert "steps/epoch=4 (real_set) batch=64" in result.stdout
    step_1, state_1 = _model(single_device_runs[family])
    step_8, state_8 = _model(tmp_path / "eight")
    assert step_1 == step_8 == 8
    assert_states_close(state_1, state_8)
    # the comparison has teeth: training moved the model far more than the tolerance in the last 4 steps
    _, state_1_at_4 = _model(single_device_runs[family], 4)
    assert _largest_relative_change(state_1, state_1_at_4) > 100 * RTOL
    # a checkpoint written on 8 devices resumes on 1 (the restore target names the current mesh)
    _run(_command(family, tmp_path / "eight", "--config.train.epochs=3"), devices=1)
    assert _saved_steps(tmp_path / "eight")[-1] == 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_processes(workdir: Path, *extra, mode="train") -> list[str]:
    """The same command in two local processes (one CPU device each) joined through a coordinator on
    127.0.0.1; returns their stdouts."""
    address = f"127.0.0.1:{_free_port()}"
    procs = [
        subprocess.Popen(
            _command(
                "linf_dist",
                workdir,
                f"--coordinator_address={address}",
                "--num_processes=2",
                f"--process_id={i}",
                *extra,
                mode=mode,
            ),  # fmt: skip
            env=launch_env(1),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=540) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    return [out for out, _ in outputs]


def test_two_processes_train_like_one(tmp_path, single_device_runs):
    """Two processes, each reading only its half of every batch, train, checkpoint (orbax, from both) and
    evaluate together; the result equals one process's. A second pair resumes from their checkpoint."""
    workdir = tmp_path / "two"
    first, second = _run_two_processes(workdir, mode="train_and_evaluate")
    assert "devices=2 processes=2" in first
    # process 1 prints nothing of its own (console output is process 0's); gloo announces its connections
    assert [line for line in second.splitlines() if not line.startswith("[Gloo]")] == []
    step_2, state_2 = _model(workdir)
    step_1, state_1 = _model(single_device_runs["linf_dist"])
    assert step_1 == step_2 == 8
    assert_states_close(state_1, state_2)
    records = [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]
    assert len(records) == 1  # written once, by process 0
    assert records[0]["num_test"] == 1000 and records[0]["last_epoch"] == 2

    first, _ = _run_two_processes(workdir, "--config.train.epochs=3")
    assert f"Resuming from {workdir / 'checkpoints'} at step 8." in first
    step, state = _model(workdir)
    assert step == 12
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state))
