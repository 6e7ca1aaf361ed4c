"""certjax/label_check.py and `certjax check-labels`: the labels of a generated .npz scored by a model trained
on real images (the session's tiny l_inf-dist run on the embedded CIFAR-10 sample).

Two generated files from the demo's 1,000 real test images: one with their true labels (its agreement must
equal the model's accuracy on them, computed here by `certify`), one labelled by a fixed derangement of the
model's own predictions (agreement 0; the best permutation must be the inverse of the derangement on every
label present). The scores are checked against brute force over all permutations; the training hook stops
a launch.py run on the permuted file before anything is written, and trains with the override.
"""

import itertools
import json
import shutil
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest

from tests.conftest import REPO, _tiny_config, launch_command, launch_env

DERANGEMENT = np.roll(np.arange(10), 3)  # class c -> label (c + 7) % 10: no class keeps its label
REPORT_FIELDS = {
    "version", "created", "file", "model", "images", "agreement", "reference_accuracy", "reference",
    "min_label_agreement", "required_agreement", "passed", "per_class", "confusion", "best_permutation",
}  # fmt: skip


@pytest.fixture(scope="module")
def checked(tiny_run, tmp_path_factory):
    """A copy of the tiny run (without the results.jsonl other tests may add), the two files, and the exit
    status and report of `certjax check-labels` for each."""
    import certjax
    from certjax import cli
    from certjax.data.sources import make_real_source

    root = tmp_path_factory.mktemp("label_check")
    workdir = root / "run"
    shutil.copytree(tiny_run("linf_dist"), workdir)
    (workdir / "results.jsonl").unlink(missing_ok=True)  # the scale then comes from the checkpoint
    source = make_real_source("demo", "test", "cifar10")
    images, labels = source.read(np.arange(len(source)))
    prediction = certjax.restore(str(workdir)).certify(images)["prediction"]
    np.savez(root / "real.npz", image=images, label=labels)
    np.savez(root / "permuted.npz", image=images, label=DERANGEMENT[prediction])
    runs = {}
    for name in ("real", "permuted"):
        command = ["certjax", "check-labels", f"--workdir={workdir}", f"--generated={root / name}.npz"]
        status = cli.main(command)
        report = json.loads((root / f"{name}.npz.labels.json").read_text())
        runs[name] = status, report
    return workdir, root, labels, prediction, runs


def test_a_file_with_the_true_labels_passes(checked):
    _, root, labels, prediction, runs = checked
    status, report = runs["real"]
    assert status == 0 and report["passed"]
    assert set(report) == REPORT_FIELDS
    assert report["agreement"] == pytest.approx(np.mean(prediction == labels), abs=1e-12)
    assert report["images"] == 1000 and report["file"]["images_in_file"] == 1000
    # the scale: the run's clean accuracy from its checkpoint's metrics (no results.jsonl in a tiny run)
    assert (
        report["reference"] == "clean_accuracy" and "checkpoint" in report["model"]["clean_accuracy_source"]
    )
    assert report["required_agreement"] == pytest.approx(0.5 * report["reference_accuracy"])
    best = report["best_permutation"]
    assert not best["looks_permuted"] and best["agreement"] - report["agreement"] < 0.2
    assert [c["images"] for c in report["per_class"]] == [100] * 10  # the demo: 100 per class
    assert np.asarray(report["confusion"]).sum() == 1000


def test_a_permuted_file_is_found_and_its_permutation_recovered(checked):
    _, root, _, prediction, runs = checked
    status, report = runs["permuted"]
    assert status == 1 and not report["passed"] and report["agreement"] == 0.0
    best = report["best_permutation"]
    assert best["looks_permuted"] and best["agreement"] == 1.0
    relabel = np.asarray(best["relabel"])
    assert sorted(relabel) == list(range(10))
    for predicted in np.unique(prediction):  # every label present goes back to the class it came from
        assert relabel[DERANGEMENT[predicted]] == predicted
    assert np.all(relabel[DERANGEMENT[prediction]] == prediction)


def test_the_printout_says_fail_warning_and_where_the_report_is(checked, capsys):
    workdir, root, *_ = checked
    from certjax import cli

    out = root / "elsewhere.json"
    args = [f"--workdir={workdir}", f"--generated={root / 'permuted.npz'}", f"--out={out}", "--limit=300"]
    assert cli.main(["certjax", "check-labels", *args, "--batch_size=100"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"labels of {root / 'permuted.npz'} (a random 300 of 1,000 images)")
    assert any(line.startswith("FAIL: agreement 0.000 <") for line in lines)
    assert any(line.startswith("WARNING: the labels look permuted") for line in lines)
    assert lines[-1] == f"report: {out}" and json.loads(out.read_text())["images"] == 300


def test_bad_input_is_one_line_exit_2(checked, capsys, tmp_path):
    workdir, root, *_ = checked
    from certjax import cli

    np.savez(tmp_path / "big.npz", image=np.zeros((2, 64, 64, 3), np.uint8), label=np.zeros(2, int))
    np.savez(tmp_path / "many.npz", image=np.zeros((2, 32, 32, 3), np.uint8), label=np.array([3, 10]))
    model = "(the checking model, "  # a file the model cannot read names what the model takes
    cases = {
        (f"--workdir={workdir}",): ["usage error: certjax check-labels needs --workdir and --generated"],
        (f"--workdir={workdir}", f"--generated={tmp_path / 'no.npz'}"): ["data error: --generated="],
        (f"--workdir={tmp_path}", f"--generated={root / 'real.npz'}"): ["checkpoint error: no checkpoints"],
        (f"--workdir={workdir}", f"--generated={tmp_path / 'big.npz'}"): ["shape (2, 64, 64, 3)", model],
        (f"--workdir={workdir}", f"--generated={tmp_path / 'many.npz'}"): ["must lie in [0, 10)", model],
        (f"--workdir={workdir}", "--generatd=x.npz"): ["did you mean --generated?"],
        (f"--workdir={workdir}", f"--generated={root / 'real.npz'}", "--limit=-1"): ["must be >= 0"],
    }
    for args, expected in cases.items():
        assert cli.main(["certjax", "check-labels", *args]) == 2, args
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("certjax: "), (args, lines)
        assert all(text in lines[0] for text in expected), (args, lines)
    assert not list(tmp_path.glob("*.labels.json"))


def test_the_scale_is_the_runs_evaluation_record_of_the_same_step(checked, tmp_path):
    from certjax.label_check import reference_accuracy

    workdir = tmp_path / "run"
    shutil.copytree(checked[0], workdir)
    model = SimpleNamespace(info={"workdir": str(workdir), "step": 4}, config=_tiny_config("linf_dist"))
    accuracy, source = reference_accuracy(model)  # no record: the checkpoint's metrics (250 test images)
    assert 0 <= accuracy <= 1 and source == "metrics of checkpoint step 4, 250 test images"
    records = [{"step": 2, "clean_accuracy": 0.5}, {"step": 4, "clean_accuracy": 0.25, "num_test": 1000}]
    (workdir / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert reference_accuracy(model) == (0.25, f"{workdir / 'results.jsonl'}, step 4, 1000 test images")


def test_scores_match_brute_force_over_all_permutations():
    from certjax.label_check import looks_permuted, score_labels

    rng = np.random.default_rng(0)
    for trial in range(20):
        labels = rng.integers(0, 5, 60)
        predictions = np.where(rng.random(60) < 0.5, rng.permutation(5)[labels], rng.integers(0, 5, 60))
        scores = score_labels(labels, predictions, 5)
        brute = max(np.mean(np.asarray(p)[labels] == predictions) for p in itertools.permutations(range(5)))
        assert scores["agreement"] == pytest.approx(np.mean(labels == predictions))
        assert scores["best_permutation"]["agreement"] == pytest.approx(brute), trial
        relabel = np.asarray(scores["best_permutation"]["relabel"])
        assert np.mean(relabel[labels] == predictions) == pytest.approx(brute)
    assert looks_permuted(0.1, 0.5) and not looks_permuted(0.3, 0.5) and not looks_permuted(0.05, 0.2)
    # a good model and two classes swapped in the file: not permuted as a whole, the two named as moved
    predictions = np.repeat(np.arange(5), 20)
    labels = np.array([3, 1, 2, 0, 4])[predictions]
    best = score_labels(labels, predictions, 5)["best_permutation"]
    assert not best["looks_permuted"] and best["relabel"] == [3, 1, 2, 0, 4]
    assert [(m["label"], m["to"]) for m in best["moved"]] == [(0, 3), (3, 0)]


def test_the_fingerprint_follows_the_content(tmp_path):
    from certjax.label_check import file_fingerprint

    images, labels = np.arange(2 * 32 * 32 * 3, dtype=np.uint8).reshape(2, 32, 32, 3), np.array([1, 2])
    np.savez(tmp_path / "a.npz", image=images, label=labels)
    np.savez_compressed(tmp_path / "b.npz", image=images, label=labels)  # same arrays, stored otherwise
    np.savez(tmp_path / "c.npz", image=images, label=labels[::-1])  # relabelled
    a, b, c = (file_fingerprint(tmp_path / f"{name}.npz") for name in "abc")
    assert a == b and a != c and a.startswith("sha256:")


# ------------------------------------------------------------------------------------------ before a run


def _config(generated, **data):
    config = _tiny_config("linf_dist")
    config.data.generated = str(generated)
    for key, value in data.items():
        config.data[key] = value
    return config


def test_training_reads_the_report_of_the_same_file_only(checked, capsys, tmp_path):
    _, root, *_ = checked
    from certjax.data.sources import DataError
    from certjax.label_check import check_training_labels

    check_training_labels(_config(root / "real.npz"), 10)
    assert "real.npz: labels checked: agreement" in capsys.readouterr().out
    lone = tmp_path / "lone.npz"
    lone.write_bytes((root / "permuted.npz").read_bytes())  # a copy: same content, no report beside it
    check_training_labels(_config(lone), 10)
    assert "no label report; check that its labels" in capsys.readouterr().err
    report = root / "permuted.npz.labels.json"
    with pytest.raises(DataError, match="failed the label check"):
        check_training_labels(_config(lone, label_report=str(report)), 10)  # its report, named: same content
    with pytest.raises(DataError, match="is of another file"):
        check_training_labels(_config(root / "real.npz", label_report=str(report)), 10)
    with pytest.raises(DataError, match="no such file"):
        check_training_labels(_config(lone, label_report=str(tmp_path / "none.json")), 10)
    check_training_labels(_config(lone, label_report=str(report), min_label_agreement=0.0), 10)
    assert "training anyway" in capsys.readouterr().err


def test_config_checks_name_the_new_fields():
    from certjax.config_checks import ConfigError, check_config

    check_config(_tiny_config("linf_dist"))
    for data, expected in (
        ({"min_label_agreement": 1.5}, "data.min_label_agreement: 1.5; a fraction in [0, 1]"),
        ({"label_report": "r.json"}, "data.label_report: 'r.json' without data.generated"),
    ):
        config = _tiny_config("linf_dist")
        for key, value in data.items():
            config.data[key] = value
        with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace(".", r"\.")):
            check_config(config)


def test_a_run_on_the_permuted_file_stops_before_writing_and_trains_when_overridden(checked, tmp_path):
    _, root, *_ = checked
    workdir = tmp_path / "run"
    generated = f"--config.data.generated={root / 'permuted.npz'}"
    run = dict(env=launch_env(), cwd=REPO, capture_output=True, text=True)
    stopped = subprocess.run(launch_command("configs/linf_dist.py:demo,tiny", workdir, generated), **run)
    (line,) = stopped.stderr.strip().splitlines()
    assert stopped.returncode == 2 and line.startswith("certjax: data error: ") and not workdir.exists()
    for said in ("agreement 0.000", f"report {root / 'permuted.npz.labels.json'}", "best_permutation.relabel",
                 "--config.data.min_label_agreement=0"):  # fmt: skip
        assert said in line, (said, line)
    override = "--config.data.min_label_agreement=0"
    trained = subprocess.run(
        launch_command("configs/linf_dist.py:demo,tiny", workdir, generated, override), **run
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "training anyway" in trained.stderr and (workdir / "checkpoints" / "4").is_dir()
