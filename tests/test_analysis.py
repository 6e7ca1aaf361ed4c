"""certjax.analysis: tables and figures from synthetic records written to temporary run directories; the
certified-accuracy-at-radii helper of certjax.evaluate; radii files and records written before issue 22's
renaming (a real one: the LOT golden case's) still read."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from certjax.analysis import records, tables
from certjax.analysis.__main__ import main, write_analysis
from certjax.evaluate import certified_accuracy_at

THREAT = {"linf_dist": "linf", "sortnet": "linf", "lot": "l2"}


def _run(root, name, *, family, variant="", epochs=800, aux=0, fraction=1.0, clean, cert, train=None,
         checkpoint="best", dataset="cifar10", radii=None, seed=0, epoch=None):  # fmt: skip
    workdir = root / name
    (workdir / "eval").mkdir(parents=True, exist_ok=True)
    radii_path = ""
    if radii is not None:
        radii_path = str(workdir / "eval" / f"radii_step{epochs}.npz")
        np.savez(radii_path, **radii)
    record = {
        "family": family,
        "variant": variant,
        "dataset": dataset,
        "aux_amount": aux,
        "real_fraction": fraction,
        "epochs": epochs,
        "seed": seed,
        "eps": 8 / 255,
        "checkpoint": checkpoint,
        "step": epochs,
        "epoch": epoch or epochs,
        "clean_accuracy": clean,
        "certified_accuracy": cert,
        "train_clean_accuracy": train if train is not None else clean,
        "threat_model": THREAT[family],
        "radii_path": radii_path,
    }
    with open(workdir / "results.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    return workdir


def _radii(seed, n=200, classes=10, old=False):
    """A radii file's arrays in today's names (certjax/radii_file.py), or with old=True in the names files had
    before issue 22 (`radius` the correct-class radius, `prediction_radius` the prediction's)."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, classes, n)
    correct = rng.random(n) < 0.6
    certified_radius = np.where(correct, rng.random(n) * 0.1, 0.0)
    radius = np.where(correct, certified_radius, rng.random(n) * 0.05)
    arrays = {
        "label": label,
        "prediction": np.where(correct, label, (label + 1) % classes),
        "correct": correct,
        "radius": radius,
        "certified_radius": certified_radius,
        "certified": correct & (certified_radius > 8 / 255),
    }
    if old:
        arrays["radius"], arrays["prediction_radius"] = arrays.pop("certified_radius"), radius
    return arrays


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    _run(root, "linf_none", family="linf_dist", clean=0.5734, cert=0.3425, train=0.70, radii=_radii(0))
    _run(root, "linf_none", family="linf_dist", clean=0.50, cert=0.30, checkpoint="last", epoch=790)
    _run(
        root,
        "linf_1m",
        family="linf_dist",
        aux=1_000_000,
        fraction=0.3,
        clean=0.60,
        cert=0.37,
        radii=_radii(1, old=True),  # a run evaluated before issue 22: its radii file in the old names
    )
    _run(root, "linf_5m_s0", family="linf_dist", aux=5_000_000, fraction=0.3, clean=0.62, cert=0.38)
    _run(root, "linf_5m_s1", family="linf_dist", aux=5_000_000, fraction=0.3, clean=0.64, cert=0.40, seed=1)
    _run(root, "linf_ratio", family="linf_dist", aux=45_000, fraction=0.7, clean=0.55, cert=0.33)
    _run(
        root, "sortnet", family="sortnet", variant="nodropout", epochs=3000, clean=0.55, cert=0.40, train=0.6
    )
    _run(root, "lot_ms", family="lot", variant="S", epochs=200, clean=0.70, cert=0.55)
    _run(root, "lot_cos", family="lot", variant="S,cosine", epochs=200, clean=0.71, cert=0.56)
    _run(
        root,
        "lot_c100",
        family="lot",
        variant="S,cifar100",
        epochs=200,
        clean=0.40,
        cert=0.27,
        dataset="cifar100",
    )
    return root


def test_aux_columns_and_sizes():
    assert records.aux_bucket(0) == "none" and records.aux_bucket(10_000_000) == "10M"
    assert records.aux_column({"aux_amount": 45_000, "real_fraction": 0.7}) == "45k r=0.7"
    assert records.aux_column({"aux_amount": 5_000_000, "real_fraction": 0.3}) == "5M"
    columns = ["10M", "none", "45k r=0.7", "1M", "5M", "45k"]
    assert sorted(columns, key=records.column_order) == ["none", "45k r=0.7", "45k", "1M", "5M", "10M"]
    assert records.size_label({"variant": "M,cosine,cifar100"}) == "M,cosine"
    assert records.model_label({"variant": "M,cosine,cifar100"}) == "M"
    assert records.scheduler_of({"variant": "M,cosine"}) == "cosine"


def test_table_cells(runs):
    loaded = records.load_records([runs])
    table1, table2, table3, table4 = tables.paper_tables(loaded)
    assert table1.groups == ["none", "45k r=0.7", "1M", "5M"]
    row = ["linf_dist", "-", "800"]
    assert table1.cell(row, "none", "clean") == "57.34"
    assert table1.cell(row, "none", "cert.") == "34.25"
    assert table1.cell(row, "1M", "cert.") == "37.00"
    assert table1.cell(row, "5M", "cert.") == "39.00 (2)"  # mean of two seeds, count shown
    assert table1.cell(row, "best gain (cert.)", None) == "+4.75 (5M)"
    # SortNet has no run with generated data: its aux cells and its gain are empty, never invented
    assert table1.cell(["sortnet", "nodropout", "3000"], "1M", "clean") == ""
    assert table1.cell(["sortnet", "nodropout", "3000"], "best gain (cert.)", None) == ""
    # Table 2 (l_2, CIFAR-10): no 10M column exists anywhere, and the LOT rows keep the schedulers apart
    assert table2.groups == ["none"]
    assert table2.cell(["lot", "S", "200"], "none", "cert.") == "55.00"
    assert table2.cell(["lot", "S,cosine", "200"], "none", "cert.") == "56.00"
    assert table3.cell(["lot", "S", "200"], "none", "clean") == "40.00"
    assert table4.cell(["cifar10", "S", "200", "none"], "multistep", "cert.") == "55.00"
    assert table4.cell(["cifar10", "S", "200", "none"], "cosine", "cert.") == "56.00"
    assert table4.cell(["cifar10", "S", "200", "none"], "cosine - multistep (cert.)", None) == "+1.00"
    assert table4.cell(["cifar100", "S", "200", "none"], "cosine", "clean") == ""
    markdown = tables.to_markdown(table1)
    assert "| linf_dist | - | 800 | 57.34 | 34.25 |" in markdown
    latex = tables.to_latex(table1)
    assert r"linf\_dist & - & 800 & 57.34 & 34.25" in latex and latex.count(r"\\") == 2 + 2


def test_last_checkpoint_table(runs):
    (table1, *_) = tables.paper_tables(records.load_records([runs]), checkpoint="last")
    assert table1.cell(["linf_dist", "-", "800"], "none", "cert.") == "30.00"
    assert table1.groups == ["none"]


def test_command_line_writes_tables_and_figures(runs, tmp_path):
    out = tmp_path / "out"
    assert main(["--runs", str(runs), "--out", str(out)]) == 0
    for name in ("tables.md", "table1.tex", "table2.tex", "table3.tex", "table4.tex"):
        assert (out / name).stat().st_size > 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    for expected in ("fig2_gain_size_epochs.png", "fig3_gap_vs_gain.png", "fig4_real_fraction.png",
                     "best_vs_last.png"):  # fmt: skip
        assert expected in pngs
    assert any(p.startswith("fig5_radius_cdf_cifar10_linf_dist") for p in pngs)
    assert any(p.startswith("fig7_confusion_cifar10_linf_dist") for p in pngs)
    assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert main(["--runs", str(tmp_path / "nope"), "--out", str(out)]) == 2


def test_runs_copied_elsewhere_find_their_radii(runs, tmp_path):
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(runs / "linf_none", moved / "linf_none")
    shutil.rmtree(runs / "linf_none" / "eval", ignore_errors=False)
    try:
        written = write_analysis([moved], tmp_path / "out2")
        assert any("fig7_confusion" in p for p in written["figures"])
    finally:
        shutil.copytree(moved / "linf_none" / "eval", runs / "linf_none" / "eval")


def test_confusion_counts():
    from certjax.analysis.figures import confusion_counts

    data = {
        "label": np.array([0, 0, 1, 1, 1]),
        "correct": np.array([True, True, True, False, True]),
        "certified": np.array([True, False, False, False, True]),
    }
    np.testing.assert_array_equal(confusion_counts(data, 3), [[1, 1, 0], [1, 1, 1], [0, 0, 0]])


def test_certified_accuracy_at_radii():
    correct = np.array([True, True, True, False])
    radius = np.array([0.5, 0.1, 0.0, 0.0])
    out = certified_accuracy_at(correct, radius, [0.0, 0.1, 0.3])
    assert out == {"0": 0.75, "0.1": 0.25, "0.3": 0.25}  # strict '>': radius 0.1 is not certified at 0.1
    assert os.path.basename(__file__) == "test_analysis.py"


def test_old_and_new_radii_files_read_in_the_same_names(tmp_path):
    """A radii file written before issue 22 (old names) and one written today, of the same arrays, read the
    same; today's names are what certjax.evaluate writes (radii_file.radii_arrays of the certifier's)."""
    from certjax.radii_file import radii_arrays, read_radii

    np.savez(tmp_path / "old.npz", **_radii(3, old=True))
    np.savez(tmp_path / "new.npz", **_radii(3))
    old, new = read_radii(str(tmp_path / "old.npz")), read_radii(str(tmp_path / "new.npz"))
    assert sorted(old) == sorted(new) == sorted(_radii(3))
    for key in new:
        np.testing.assert_array_equal(old[key], new[key], err_msg=key)
    wrong = ~new["correct"]
    assert np.all(new["certified_radius"][wrong] == 0) and np.any(new["radius"][wrong] > 0)
    # the certifier's names (those of the old files) -> the file's
    assert sorted(radii_arrays(_radii(3, old=True))) == sorted(new)


def test_a_run_evaluated_before_the_renaming_still_reads(tmp_path):
    """A run as the code of 8811d5e left it: its results record and radii file are the ones recorded for the
    LOT golden case (tests/golden/lot: what that code computed and wrote, old names included). Today's
    analysis reads them in today's names and draws the radius and confusion figures from them."""
    from certjax.radii_file import read_radii

    golden = Path(__file__).resolve().parent / "golden" / "lot"
    with np.load(golden / "golden.npz") as data:
        old = {key[len("radii/") :]: data[key] for key in data.files if key.startswith("radii/")}
    assert "prediction_radius" in old and "certified_radius" not in old  # the old names
    record = json.loads((golden / "golden.json").read_text())["record"]
    workdir = tmp_path / "runs" / "lot_before"
    (workdir / "eval").mkdir(parents=True)
    path = workdir / "eval" / f"radii_step{record['step']}.npz"
    np.savez(path, **old)
    (workdir / "results.jsonl").write_text(json.dumps({**record, "radii_path": str(path)}) + "\n")

    arrays = read_radii(str(path))
    np.testing.assert_array_equal(arrays["radius"], old["prediction_radius"])
    np.testing.assert_array_equal(arrays["certified_radius"], old["radius"])
    np.testing.assert_array_equal(arrays["certified_radius_assumed"], old["radius_assumed"])
    np.testing.assert_array_equal(arrays["certified"], old["certified"])
    assert "prediction_radius" not in arrays and "radius_assumed" not in arrays
    (loaded,) = records.load_records([tmp_path / "runs"])
    assert loaded["certified_accuracy"] == record["certified_accuracy"]
    assert record["certified_accuracy"] == pytest.approx(old["certified"].mean())
    written = write_analysis([tmp_path / "runs"], str(tmp_path / "out"))["figures"]
    assert any("fig5_radius_cdf" in p for p in written) and any("fig7_confusion" in p for p in written)
