"""Progress on long work (certjax/progress.py, issue 22 point 7): lines every CERTJAX_PROGRESS_SECONDS when
output is no terminal, nothing for short work, and the reports of evaluation and training as launch.py
prints them (subprocesses on the tiny l_inf-dist run, progress every 0 s so that every batch reports)."""

import io
import json

from certjax.progress import Progress, tracked
from tests.conftest import launch_command, launch_env


def test_lines_every_interval_and_none_for_short_work(monkeypatch):
    monkeypatch.setenv("CERTJAX_PROGRESS_SECONDS", "0")
    stream = io.StringIO()
    with Progress("evaluate", 4, "batches", stream=stream) as progress:
        for _ in range(4):
            progress.update()
    lines = stream.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == [
        f"certjax: evaluate: {k}/4 batches ({25 * k} %)" for k in (1, 2, 3)
    ]  # the last batch ends the work: no line for it
    assert all("s left" in line for line in lines)
    monkeypatch.setenv("CERTJAX_PROGRESS_SECONDS", "30")
    quiet = io.StringIO()
    with Progress("evaluate", 4, stream=quiet) as progress:
        progress.update(4)
    assert quiet.getvalue() == ""
    assert list(tracked(range(3), None)) == [0, 1, 2]  # no report asked: the items, unchanged


def test_launch_reports_training_and_evaluation(tiny_run, tmp_path):
    import shutil
    import subprocess

    workdir = tmp_path / "run"
    shutil.copytree(tiny_run("linf_dist"), workdir)
    env = dict(launch_env(), CERTJAX_PROGRESS_SECONDS="0")

    evaluate = subprocess.run(
        launch_command("configs/linf_dist.py:demo,tiny", workdir, mode="evaluate"),
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert evaluate.returncode == 0, evaluate.stderr[-2000:]
    record = json.loads((workdir / "results.jsonl").read_text().splitlines()[-1])
    batches = -(-record["num_test"] // 250)  # the tiny run's eval_batch_size
    reported = [line for line in evaluate.stderr.splitlines() if line.startswith("certjax: evaluate: ")]
    assert [line.split(" (")[0] for line in reported] == [
        f"certjax: evaluate: {k}/{batches} batches" for k in range(1, batches)
    ]
    train = subprocess.run(
        launch_command("configs/linf_dist.py:demo,tiny", tmp_path / "fresh", "--config.train.epochs=2"),
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-2000:]
    assert "processes=1; compiling the train step ..." in train.stdout  # the compilation is announced
    steps = [line.split(" (")[0] for line in train.stderr.splitlines() if line.startswith("certjax: epoch")]
    assert steps == [f"certjax: epoch {e}: {k}/4 steps" for e in (1, 2) for k in (1, 2, 3)]
