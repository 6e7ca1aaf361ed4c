"""certjax.analysis: tables and figures from synthetic records written to temporary run directories; the
certified-accuracy-at-radii helper of certjax.evaluate."""

import json
import os

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


def _radii(seed, n=200, classes=10):
    rng = np.random.default_rng(seed)
    label = rng.integers(0, classes, n)
    correct = rng.random(n) < 0.6
    radius = np.where(correct, rng.random(n) * 0.1, 0.0)
    return {
        "label": label,
        "prediction": np.where(correct, label, (label + 1) % classes),
        "correct": correct,
        "radius": radius,
        "prediction_radius": np.where(correct, radius, rng.random(n) * 0.05),
        "certified": correct & (radius > 8 / 255),
    }


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
        radii=_radii(1),
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
