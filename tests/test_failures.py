"""Failure handling: each failure is provoked for real and must stop (or recover) with a message that names
the cause and the fix, and must leave every checkpoint and results line whole.

- invalid config values: rejected before any compute (nothing is written to the workdir);
- a non-finite loss or gradient: the run stops naming the first bad step; the last good checkpoint stays;
- a damaged checkpoint: moved aside with a warning, training resumes from the previous one;
- a checkpoint of another model: a clear error, nothing moved;
- an interrupted results append: the results file is unchanged.
"""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from certjax import evaluate
from certjax.config_checks import ConfigError, check_config
from tests.conftest import run_launch
from tests.test_parallel import restore_anywhere

CONFIG = "configs/linf_dist.py:demo"
TINY = [
    "--config.model.depth=3",
    "--config.model.width=32",
    "--config.train.batch_size=64",
    "--config.data.real_subset=256",  # 4 steps per epoch
    "--config.train.eval_batch_size=250",
    "--config.train.eval_subset=250",
    "--config.checkpoint.every_epochs=1",
]


def _launch(workdir, *extra, mode="train", devices=1):
    return run_launch(CONFIG, workdir, *TINY, *extra, mode=mode, devices=devices)


def _steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under a directory, by relative path: to show nothing was lost or rewritten."""
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    return {str(p.relative_to(directory)): p.read_bytes() for p in files}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Two epochs (checkpoints at steps 4 and 8) and one results line."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    result = _launch(workdir, "--config.train.epochs=2", mode="train_and_evaluate")
    assert result.returncode == 0, result.stderr[-3000:]
    assert _steps(workdir) == [4, 8]
    return workdir


def _copy(trained: Path, tmp_path: Path) -> Path:
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    return workdir


# ------------------------------------------------------------------------------------------------ config


def _demo_config():
    from configs.linf_dist import get_config

    return get_config("demo")


def test_every_family_default_config_is_valid():
    import importlib

    for family, variants in {
        "linf_dist": ["", "demo", "cifar100"],
        "sortnet": ["dropout", "nodropout", "demo"],
        "lot": ["S", "M,cosine", "L,lln", "S,demo"],
        "liresnet": ["XS", "L", "S,trades", "XS,demo"],
    }.items():
        module = importlib.import_module(f"configs.{family}")
        for variant in variants:
            check_config(module.get_config(variant), device_count=8, process_count=2)


def test_config_errors_name_every_key_and_its_fix_at_once():
    config = _demo_config()
    config.data.real_fraction = 1.5
    config.train.batch_size = 100
    config.certify.eps = -0.1
    config.train.epoch = 3  # a typo: the run would silently train the default number of epochs
    with pytest.raises(ConfigError) as error:
        check_config(config, device_count=8)
    message = str(error.value)
    assert message.startswith("4 invalid config value(s)")
    assert "data.real_fraction: 1.5" in message and "[0, 1]" in message
    assert "train.batch_size: 100 does not split evenly over the 8 devices" in message
    assert "--config.train.batch_size=104" in message
    assert "certify.eps: -0.1" in message
    assert "train.epoch: no such key" in message and "did you mean train.epochs" in message


def test_assumed_estimator_is_one_of_the_registry():
    from configs.liresnet import get_config

    config = get_config("XS,demo")
    config.model.assumed_estimator = "powr"
    config.model.eval_lanczos_steps = 0
    with pytest.raises(ConfigError) as error:
        check_config(config, device_count=1)
    message = str(error.value)
    assert "model.assumed_estimator: 'powr'; use one of ['lanczos', 'power']" in message
    assert "model.eval_lanczos_steps: 0; must be an integer >= 1" in message


def test_batch_must_split_over_processes_too():
    config = _demo_config()
    config.train.batch_size = 126
    with pytest.raises(ConfigError, match=r"over the 4 processes; use a multiple of 4"):
        check_config(config, device_count=2, process_count=4)


@pytest.mark.parametrize(
    "override, devices, expected",
    [
        ("--config.train.epoch=3", 1, "did you mean train.epochs"),
        ("--config.data.real_fraction=1.5", 1, "data.real_fraction: 1.5"),
        ("--config.certify.eps=-0.5", 1, "certify.eps: -0.5"),
        ("--config.train.batch_size=60", 8, "use a multiple of 8, e.g. --config.train.batch_size=64"),
    ],
)
def test_launch_rejects_a_bad_config_before_any_compute(tmp_path, override, devices, expected):
    workdir = tmp_path / "run"
    result = _launch(workdir, override, devices=devices)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "certjax: config error:" in result.stderr and expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not workdir.exists()  # nothing read, compiled or written


# --------------------------------------------------------------------------------------------- non-finite


def test_nonfinite_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    before = _snapshot(workdir / "checkpoints")
    results_before = (workdir / "results.jsonl").read_bytes()
    # lr 1e38: the first update overflows the parameters, the next loss is not finite
    diverge = ["--config.train.epochs=4", "--config.optimizer.lr=1e38"]
    # checked at the end of the epoch only (after 4 steps) and at every step: the same first step is named
    late = _launch(workdir, *diverge, "--config.train.log_every_steps=1000", mode="train_and_evaluate")
    early = _launch(_copy(trained, tmp_path / "b"), *diverge, "--config.train.log_every_steps=1")
    for result in (late, early):
        assert result.returncode == 3, result.stderr[-3000:]
        assert "certjax: training stopped: non-finite loss or gradient at step" in result.stderr
        assert "the last good checkpoint, step 8" in result.stderr and "optimizer.lr" in result.stderr
        assert "Traceback" not in result.stderr
    step = int(re.search(r"at step (\d+)", late.stderr).group(1))
    assert step == int(re.search(r"at step (\d+)", early.stderr).group(1))
    assert 8 < step <= 12
    # no checkpoint of the diverged state; the kept ones are byte-identical and restore to finite values
    assert _snapshot(workdir / "checkpoints") == before
    state = restore_anywhere(workdir / "checkpoints" / "8" / "state")
    import jax

    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state["params"]))
    assert (workdir / "results.jsonl").read_bytes() == results_before  # no evaluation of a broken run


# -------------------------------------------------------------------------------------------- checkpoints


def test_damaged_checkpoint_is_set_aside_and_training_resumes_from_the_previous(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    damaged = workdir / "checkpoints" / "8"
    data_files = list((damaged / "state").rglob("d/*"))
    assert data_files
    for path in data_files:  # a crash of the storage, not of orbax: truncated array data
        path.write_bytes(path.read_bytes()[:10])
    damaged_files = _snapshot(damaged)
    kept_files = _snapshot(workdir / "checkpoints" / "4")
    # and an unfinished save (a killed process's temporary directory) that must never be restored
    partial = workdir / "checkpoints" / "16.orbax-checkpoint-tmp-1700000000"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "half-written").write_bytes(b"\0" * 100)

    result = _launch(workdir, "--config.train.epochs=3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "certjax: warning: checkpoint step 8 cannot be restored" in result.stderr
    assert "falling back to step 4" in result.stderr
    assert f"Resuming from {workdir / 'checkpoints'} at step 4." in result.stdout
    # nothing deleted: the damaged checkpoint is kept whole outside the manager's directory
    (moved,) = (workdir / "checkpoints_unreadable").iterdir()
    assert moved.name.startswith("8-") and _snapshot(moved) == damaged_files
    assert _snapshot(workdir / "checkpoints" / "4") == kept_files or 4 not in _steps(workdir)
    assert _steps(workdir)[-1] == 12 and 16 not in _steps(workdir)


def test_checkpoint_of_another_model_stops_without_moving_anything(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    before = _snapshot(workdir / "checkpoints")
    result = _launch(workdir, "--config.train.epochs=3", "--config.model.width=48")
    assert result.returncode == 2
    assert "checkpoint step 8" in result.stderr and "was trained with another model" in result.stderr
    assert "checkpoint shape (32" in result.stderr and "use a new --workdir" in result.stderr
    assert _snapshot(workdir / "checkpoints") == before
    assert not (workdir / "checkpoints_unreadable").exists()


# ---------------------------------------------------------------------------------------------- results


def test_interrupted_results_append_leaves_the_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "results.jsonl"
    evaluate.append_record(str(path), {"certified_accuracy": 0.5})
    before = path.read_bytes()

    def crash(*_):
        raise OSError("No space left on device")

    monkeypatch.setattr(evaluate.os, "replace", crash)  # dies after writing the new file, before the rename
    with pytest.raises(OSError, match="No space left"):
        evaluate.append_record(str(path), {"certified_accuracy": 0.6})
    monkeypatch.undo()
    with pytest.raises(TypeError):  # a record that cannot be written at all
        evaluate.append_record(str(path), {"certified_accuracy": object()})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["results.jsonl"]  # no temporary file left behind
    evaluate.append_record(str(path), {"certified_accuracy": 0.7})
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [{"certified_accuracy": 0.5}, {"certified_accuracy": 0.7}]
