"""Runs as a user types them (issue 22, items 6 and 8): `launch.py --mode=train` ends with its evaluation
record, the same command on a finished run says so and writes nothing, re-evaluating replaces a record, a
resume says one line, a short run of a recipe with a warmup scales it, `p` shows only where a family has it,
a compressed generated .npz is extracted once with one line, output files follow the umask, NaN pixels get
their own message, the analysis counts seeds, figure 7 names the classes, `dir(certjax)` shows the API.

The runs are the tiny ones (configs/<family>.py:demo,tiny: 4 steps on 256 embedded real CIFAR-10 images) as
subprocesses of launch.py; the checks that need no run (disk space, figure layout) call the code directly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from certjax.analysis import records, tables
from certjax.data.sources import DataError, GeneratedNpzSource, make_real_source
from tests.conftest import REPO, launch_env, run_launch
from tests.test_analysis import _radii, _run

L2 = "configs/liresnet.py:demo,tiny"
# one warmup epoch, as the LiResNet demos have, in the tiny run's one epoch: scaled to half, not refused
SHORT_WARMUP = "--config.optimizer.warmup_epochs=1"
UMASK = 0o027  # not the usual 0o022: a file made with a fixed mode cannot match by chance
FILE_MODE = 0o640  # 0o666 & ~UMASK


def _under_umask(run, *args, **kwargs):
    old = os.umask(UMASK)
    try:
        return run(*args, **kwargs)
    finally:
        os.umask(old)


def _launch(config, workdir, *args, mode="train"):
    """launch.py --config=... --workdir=... under UMASK, as a user whose umask it is would run it."""
    return _under_umask(run_launch, config, workdir, *args, mode=mode)


def _launch_on(workdir, *args):
    """launch.py --workdir=... and exactly `args` (no --mode unless given: the default), under UMASK."""
    command = [sys.executable, str(REPO / "launch.py"), f"--workdir={workdir}", *args]
    return _under_umask(subprocess.run, command, env=launch_env(), cwd=REPO, capture_output=True, text=True)


def _records(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _events(workdir: Path) -> bytes:
    return b"".join(p.read_bytes() for p in (workdir / "tensorboard").glob("events.out.tfevents.*"))


def _epoch_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("epoch")]


@pytest.fixture(scope="module")
def l2_run(tmp_path_factory):
    """The LiResNet tiny run with a one-epoch warmup, trained by `launch.py` (mode train, the default)."""
    workdir = tmp_path_factory.mktemp("l2") / "run"
    result = _launch_on(workdir, f"--config={L2}", SHORT_WARMUP)  # no --mode: the default
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


@pytest.fixture(scope="module")
def linf_run(tmp_path_factory):
    """The l_inf-dist tiny run with half of every batch from a compressed generated .npz, extracted into
    --config.data.cache_dir."""
    root = tmp_path_factory.mktemp("linf")
    rng = np.random.default_rng(0)
    npz = root / "data" / "generated.npz"
    npz.parent.mkdir()
    np.savez_compressed(
        npz, image=rng.integers(0, 256, (200, 32, 32, 3), dtype=np.uint8), label=rng.integers(0, 10, 200)
    )
    cache = root / "cache"
    args = [
        f"--config.data.generated={npz}",
        "--config.data.real_fraction=0.5",
        f"--config.data.cache_dir={cache}",
    ]
    result = _launch("configs/linf_dist.py:demo,tiny", root / "run", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, npz, cache, result


# ------------------------------------------------------------------------------- train, then evaluate


def test_train_ends_with_its_evaluation_record(l2_run):
    workdir, result = l2_run
    (record,) = _records(workdir)  # mode train, the default, wrote the final record: one
    assert record["checkpoint"] == "best" and record["step"] == 4 and record["num_test"] == 1000
    assert Path(record["radii_path"]).is_file()
    assert "evaluate best checkpoint (step 4" in result.stdout


def test_rerunning_a_finished_run_says_so_and_writes_nothing(l2_run):
    workdir, _ = l2_run
    before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    again = _launch_on(workdir, f"--config={L2}", SHORT_WARMUP)  # the same command again
    assert again.returncode == 0, again.stderr[-3000:]
    (line,) = again.stdout.splitlines()
    assert f"{workdir} is finished" in line and "step 4" in line and "--mode=evaluate" in line
    assert "Traceback" not in again.stderr
    assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == before  # no duplicate record


def test_a_changed_config_is_not_taken_for_a_finished_run(l2_run, tmp_path):
    """The same workdir with another model is not 'finished': the run stops naming the mismatch."""
    workdir = tmp_path / "run"
    shutil.copytree(l2_run[0], workdir)
    result = _launch(L2, workdir, SHORT_WARMUP, "--config.model.width=16")
    assert result.returncode == 2 and "was trained with another model" in result.stderr
    assert len(_records(workdir)) == 1


def test_re_evaluating_a_checkpoint_replaces_its_record(l2_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(l2_run[0], workdir)
    (old,) = _records(workdir)
    result = _launch_on(workdir, "--mode=evaluate")
    assert result.returncode == 0, result.stderr[-3000:]
    (new,) = _records(workdir)  # replaced, not appended
    assert new["radii_path"] == str(workdir / "eval" / "radii_step4.npz") != old["radii_path"]
    assert {k: v for k, v in new.items() if k not in ("radii_path", "time")} == {
        k: v for k, v in old.items() if k not in ("radii_path", "time")
    }


def test_resume_says_one_line_and_orbax_warns_nothing(l2_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(l2_run[0], workdir)
    # the final evaluation of the last checkpoint (step 8) restores nothing at step 4
    result = _launch(L2, workdir, SHORT_WARMUP, "--config.train.epochs=2", "--checkpoint=last")
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = [line for line in result.stdout.splitlines() if "step 4" in line]
    assert resumed == [f"Resuming from {workdir / 'checkpoints'} at step 4."], result.stdout
    assert "_CHECKPOINT_METADATA" not in result.stderr and "Metadata file" not in result.stderr
    assert not re.findall(r"^[WE]\d{4} .*$", result.stderr, re.M), result.stderr[-3000:]  # no absl warning
    assert [(r["checkpoint"], r["step"]) for r in _records(workdir)] == [("best", 4), ("last", 8)]


# ------------------------------------------------------------------------------- warmup, p


def test_a_short_run_scales_its_warmup(l2_run):
    workdir, result = l2_run
    notes = [line for line in result.stdout.splitlines() if "warmup_epochs" in line]
    assert notes == [
        "optimizer.warmup_epochs=1 does not fit in train.epochs=1: warming up for 0.5 epochs (half the run) "
        "instead"
    ]
    saved = json.loads((workdir / "checkpoints" / "4" / "config" / "metadata").read_text())
    assert saved["optimizer"]["warmup_epochs"] == 0.5  # the saved config is the one that trained


def test_liresnet_pp_short_run_scales_its_warmup_and_shows_no_p(tmp_path):
    result = _launch("configs/liresnet_pp.py:demo,tiny", tmp_path / "run", SHORT_WARMUP)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warming up for 0.5 epochs" in result.stdout
    (line,) = _epoch_lines(result.stdout)
    assert " p " not in line and " lr " in line
    assert b"train/p" not in _events(tmp_path / "run") and b"train/lr" in _events(tmp_path / "run")


def test_p_is_printed_and_logged_only_where_the_family_has_it(l2_run, linf_run):
    l2_workdir, l2 = l2_run
    (l2_line,) = _epoch_lines(l2.stdout)
    assert " p " not in l2_line and " lr " in l2_line  # l_2 families: no p (it was "p inf", 1e6 logged)
    assert b"train/p" not in _events(l2_workdir) and b"train/loss" in _events(l2_workdir)
    root, _, _, linf = linf_run
    (linf_line,) = _epoch_lines(linf.stdout)
    assert re.search(r" p \d", linf_line)  # the l_p schedule's p: 8 at the start
    assert b"train/p" in _events(root / "run")


# ------------------------------------------------------------------------------- generated .npz


def test_a_compressed_npz_is_extracted_once_with_one_line(linf_run):
    root, npz, cache, result = linf_run
    from certjax.data.sources.npz import human_bytes

    with zipfile.ZipFile(npz) as zf:
        size = zf.getinfo("image.npy").file_size
    (extracted,) = cache.iterdir()
    lines = [line for line in result.stdout.splitlines() if "extracting" in line]
    assert lines == [
        f"{npz}: image.npy is compressed (np.savez_compressed); extracting it once ({human_bytes(size)}) "
        f"to {extracted}"
    ]
    assert extracted.name.endswith(".image.npy") and extracted.stat().st_size == size
    assert os.listdir(npz.parent) == ["generated.npz"]  # nothing beside the input with cache_dir set
    assert _mode(extracted) == FILE_MODE
    (record,) = _records(root / "run")
    assert record["aux_amount"] == 200


def _compressed(tmp_path, n=40):
    images, labels = make_real_source("demo", "test", "cifar10").read(np.arange(n))
    path = tmp_path / "data" / "gen.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, image=images, label=labels)
    return path, images


def test_not_enough_disk_to_extract_is_a_clear_error(tmp_path, monkeypatch):
    import certjax.data.sources.npz as npz_module

    path, _ = _compressed(tmp_path)
    with zipfile.ZipFile(path) as zf:
        size = npz_module.human_bytes(zf.getinfo("image.npy").file_size)
    cache = tmp_path / "cache"
    real = shutil.disk_usage
    monkeypatch.setattr(npz_module.shutil, "disk_usage", lambda p: real(p)._replace(free=500))
    with pytest.raises(DataError) as error:
        GeneratedNpzSource(path, 10, cache_dir=str(cache))
    message = str(error.value)
    assert (
        f"image.npy is compressed and must be extracted once ({size}), but {cache} has 500 B free" in message
    )
    assert "--config.data.cache_dir" in message
    assert os.listdir(cache) == [] and os.listdir(path.parent) == ["gen.npz"]  # nothing half-written


def test_an_unwritable_data_folder_extracts_into_the_user_cache(tmp_path, monkeypatch, capsys):
    path, images = _compressed(tmp_path)
    monkeypatch.delenv("CERTJAX_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != path.parent)  # a read-only data folder
    source = GeneratedNpzSource(path, 10)
    again = GeneratedNpzSource(path, 10)
    (extracted,) = (tmp_path / "xdg" / "certjax").iterdir()
    assert Path(source.file_images.filename) == extracted == Path(again.file_images.filename)
    assert np.array_equal(again.read(np.arange(40))[0], images)
    out = capsys.readouterr().out
    assert out.count("extracting it once") == 1 and str(extracted) in out  # once, saying where


# ------------------------------------------------------------------------------- umask, NaN


def test_every_output_file_follows_the_umask(l2_run, tmp_path):
    from certjax.outputs import append_record, atomic_write_bytes

    workdir, _ = l2_run
    (record,) = _records(workdir)
    assert _mode(workdir / "results.jsonl") == FILE_MODE and _mode(record["radii_path"]) == FILE_MODE
    images, labels = make_real_source("demo", "test", "cifar10").read(np.arange(6))
    np.savez(tmp_path / "mine.npz", image=images, label=labels)
    rows = tmp_path / "rows.csv"
    result = _launch_on(workdir, "--mode=certify", f"--images={tmp_path / 'mine.npz'}", f"--out={rows}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert _mode(rows) == FILE_MODE and len(rows.read_text().splitlines()) == 7
    # the writer of every other output (the audit's JSON, experiments' tables): under two umasks
    for umask, expected in ((0o022, 0o644), (0o077, 0o600)):
        old = os.umask(umask)
        try:
            atomic_write_bytes(str(tmp_path / f"audit{umask}.json"), b"{}")
            append_record(str(tmp_path / f"results{umask}.jsonl"), {"step": 1})
        finally:
            os.umask(old)
        assert _mode(tmp_path / f"audit{umask}.json") == expected
        assert _mode(tmp_path / f"results{umask}.jsonl") == expected


@pytest.mark.parametrize("bad, word", [(np.nan, "NaN"), (np.inf, "inf"), (-np.inf, "inf")])
def test_nan_and_inf_pixels_get_their_own_message(bad, word):
    from certjax.inference.images import as_images

    images = make_real_source("demo", "test", "cifar10").read(np.arange(3))[0] / np.float32(255)
    images[1, 3, 4, 0] = bad
    with pytest.raises(ValueError) as error:
        as_images(images)
    message = str(error.value)
    assert f"images hold {word} values" in message and "image 1" in message
    assert "pass them as uint8" not in message  # the out-of-range message, which NaN used to get
    images[1, 3, 4, 0] = 1.5
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        as_images(images)


def test_certify_of_nan_images_stops_with_one_line(l2_run, tmp_path):
    images = make_real_source("demo", "test", "cifar10").read(np.arange(4))[0] / np.float32(255)
    images[2, 0, 0, 1] = np.nan
    np.savez(tmp_path / "nan.npz", image=images)
    out = tmp_path / "rows.jsonl"
    result = _launch_on(l2_run[0], "--mode=certify", f"--images={tmp_path / 'nan.npz'}", f"--out={out}")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("certjax: data error:") and "images hold NaN values" in line
    assert not out.exists()


# ------------------------------------------------------------------------------- analysis, figures, API


def test_the_analysis_counts_seeds_not_records(tmp_path):
    _run(tmp_path, "a", family="linf_dist", clean=0.6, cert=0.4)
    shutil.copytree(tmp_path / "a", tmp_path / "a_copy")  # the same run (seed 0) found twice: one seed
    _run(tmp_path, "b", family="linf_dist", clean=0.5, cert=0.2, seed=1)
    loaded = records.load_records([tmp_path])
    assert len(loaded) == 3
    (table1, *_) = tables.paper_tables(loaded)
    assert table1.cell(["linf_dist", "-", "800"], "none", "cert.") == "30.00 (2)"  # not 33.33 (3)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "certjax.analysis", "--runs", str(tmp_path), "--out", str(out)]
    result = subprocess.run(command, env=launch_env(), cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| linf_dist | - | 800 | 55.00 (2) | 30.00 (2) |" in (out / "tables.md").read_text()


def test_figure_7_names_the_classes_and_its_legend_covers_no_bar():
    import matplotlib.pyplot as plt

    from certjax.analysis.figures import class_names, confusion_figure

    names = class_names("cifar10", 10)
    assert names == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert len(class_names("cifar100", 3)) == 100  # every class of the dataset, not only the labels seen
    fig = confusion_figure("Fig. 7", {"none": _radii(0), "1M": _radii(1)}, names)
    fig.tight_layout()  # as _save lays it out
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        assert [t.get_text() for t in ax.get_xticklabels()] == names
    legend = fig.axes[-1].get_legend().get_window_extent(renderer)
    bars = [patch.get_window_extent(renderer) for ax in fig.axes for patch in ax.patches]
    assert len(bars) == 2 * 3 * 10 and not any(legend.overlaps(bar) for bar in bars)
    plt.close(fig)


def test_dir_of_certjax_shows_the_public_api(tmp_path):
    code = (
        "import sys, certjax; names = dir(certjax); print(','.join(names)); print('flax' in sys.modules)\n"
        "from certjax import *\nprint(restore.__module__, load_exported.__module__)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=launch_env(), cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    names, flax_loaded, modules = result.stdout.splitlines()
    for name in ("restore", "CertifiedModel", "load_exported", "ExportedModel", "__version__"):
        assert name in names.split(",")
    assert flax_loaded == "False"  # dir() lists the API without importing it
    assert modules == "certjax.inference.restore certjax.inference.exported"
