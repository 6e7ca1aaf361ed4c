"""certjax.restore / certify (the Python API) and launch.py --mode=certify on every family: the API gives
exactly evaluation's numbers, the certify mode writes the expected rows, bad input stops with one line."""

import csv
import io
import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import certjax
from certjax import evaluate
from certjax.data.sources import make_real_source
from tests.conftest import REPO, TINY_RUNS, launch_env

FAMILIES = sorted(TINY_RUNS)  # every family, as its tiny run
# the real CIFAR-10 test JPEGs embedded in the package (test/<class>/<file>): on a user's clone too
REAL_TEST_ZIP = REPO / "certjax" / "data" / "demo" / "cifar10-demo-test.zip"


@pytest.fixture(scope="module")
def image_zip(tmp_path_factory):
    """A zip of real CIFAR-10 JPEGs in class folders (3 images of each of 4 classes), as a user has them."""
    path = tmp_path_factory.mktemp("zip") / "real.zip"
    picked = {}
    with zipfile.ZipFile(REAL_TEST_ZIP) as source, zipfile.ZipFile(path, "w") as target:
        for name in sorted(source.namelist()):
            parts = name.split("/")
            if len(parts) < 2 or not name.endswith((".jpg", ".png", ".jpeg")):
                continue
            cls = parts[-2]
            if cls in ("airplane", "cat", "ship", "truck") and len(picked.setdefault(cls, [])) < 3:
                picked[cls].append(name)
                target.writestr(f"{cls}/{parts[-1]}", source.read(name))
    assert sum(len(v) for v in picked.values()) == 12
    return path


@pytest.mark.parametrize("family", FAMILIES)
def test_api_equals_evaluate_bit_for_bit(tiny_run, family):
    workdir = tiny_run(family)
    record = evaluate.evaluate_checkpoint(str(workdir), "best", train_subset=64)
    saved = np.load(record["radii_path"])
    images, labels = make_real_source("demo", "test", "cifar10").read(np.arange(1000))
    model = certjax.restore(str(workdir), checkpoint="best")
    assert model.info["family"] == family and model.info["step"] == record["step"]
    assert model.info["threat_model"] == (
        "linf" if family in ("linf_dist", "sortnet", "sortnet_hybrid") else "l2"
    )
    out = model.certify(images, labels=labels)
    np.testing.assert_array_equal(out["prediction"], saved["prediction"])
    np.testing.assert_array_equal(out["radius"], saved["radius"])  # bit for bit
    np.testing.assert_array_equal(np.where(out["correct"], out["radius"], 0.0), saved["certified_radius"])
    np.testing.assert_array_equal(out["certified_radius"], saved["certified_radius"])
    np.testing.assert_array_equal(out["correct"] & out["robust"], saved["certified"])
    np.testing.assert_array_equal(out["certified"], saved["certified"])  # one meaning: correct and robust
    # without labels: the same predictions and radii; another eps only moves the threshold
    plain = model.certify(images[:300], eps=2 * model.info["eps"])
    np.testing.assert_array_equal(plain["radius"], out["radius"][:300])
    margin = plain.get("robust_margin", plain["robust"])  # l_inf families: IBP certifies as well
    np.testing.assert_array_equal(margin, out["radius"][:300] > np.float32(2 * model.info["eps"]))
    if "robust_ibp" in plain:
        np.testing.assert_array_equal(plain["robust"], margin | plain["robust_ibp"])
    assert "certified" not in plain and "correct" not in plain  # no label, no claim about correctness
    # float pixels in [0, 1], a jax array, an odd count: same predictions, radii within float32 rounding
    floats = model.certify(images[:7] / 255.0)
    np.testing.assert_array_equal(floats["prediction"], out["prediction"][:7])
    np.testing.assert_allclose(floats["radius"], out["radius"][:7], atol=1e-5)
    logits = model.logits(images[:7])
    assert logits.shape == (7, 10) and np.array_equal(logits.argmax(1), out["prediction"][:7])


def test_api_rejects_bad_images_with_the_fix(tiny_run):
    model = certjax.restore(str(tiny_run("linf_dist")))
    with pytest.raises(ValueError, match="channels first"):
        model.certify(np.zeros((2, 3, 32, 32), np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.certify(np.full((2, 32, 32, 3), 255.0))
    with pytest.raises(ValueError, match="eps"):
        model.certify(np.zeros((2, 32, 32, 3), np.uint8), eps=-0.1)
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        certjax.restore(str(tiny_run("linf_dist").parent / "nowhere"))


def _rows(path):
    text = path.read_text()
    if path.suffix == ".csv":
        return list(csv.DictReader(io.StringIO(text)))
    return [json.loads(line) for line in text.splitlines()]


@pytest.mark.parametrize("family", FAMILIES)
def test_certify_files_on_a_zip_of_real_images_writes_the_rows(tiny_run, image_zip, tmp_path, family):
    from certjax.data.user_images import read_user_images
    from certjax.inference.certify_files import certify_files

    workdir = tiny_run(family)
    out = tmp_path / "rows.jsonl"
    summary = certify_files(str(workdir), str(image_zip), out=str(out))
    rows = _rows(out)
    assert len(rows) == summary["images"] == 12
    data = read_user_images(image_zip)
    expected = certjax.restore(str(workdir)).certify(data.images, labels=data.labels)
    cifar = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    for i, row in enumerate(rows):
        assert row["file"] == data.names[i]
        assert row["label"] == cifar.index(row["file"].split("/")[0])  # class folder -> CIFAR-10 label
        assert row["prediction"] == int(expected["prediction"][i])
        assert row["radius"] == float(expected["radius"][i])
        assert row["robust"] == bool(expected["robust"][i])
        assert row["correct"] == (row["prediction"] == row["label"])
        assert row["certified"] == (row["correct"] and row["robust"]) == bool(expected["certified"][i])
    assert summary["accuracy"] == pytest.approx(np.mean([r["correct"] for r in rows]))


def _certify_cli(workdir, images, *extra):
    command = [sys.executable, str(REPO / "launch.py"), f"--workdir={workdir}", "--mode=certify",
               f"--images={images}", *extra]  # fmt: skip
    return subprocess.run(command, env=launch_env(), cwd=REPO, capture_output=True, text=True)


def test_certify_command_line_writes_csv_quietly(tiny_run, image_zip, tmp_path):
    out = tmp_path / "rows.csv"
    result = _certify_cli(tiny_run("linf_dist"), image_zip, f"--out={out}", "--eps=0.01")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _rows(out)
    assert len(rows) == 12 and set(rows[0]) == {
        "file",
        "prediction",
        "radius",
        "robust",
        "label",
        "correct",
        "certified",
    }
    (summary,) = result.stdout.strip().splitlines()  # one summary line, nothing else on stdout
    assert "12 images" in summary and "certified accuracy" in summary and str(out) in summary
    # one meaning per word: the fraction robust is called robust, the certified accuracy counts correct points
    robust = np.mean([row["robust"] == "True" for row in rows])
    certified = np.mean([row["certified"] == "True" for row in rows])
    assert f"{robust:.4f} robust" in summary and f"certified accuracy {certified:.4f}" in summary
    assert not [line for line in result.stderr.splitlines() if line.startswith("I")]  # no absl/orbax INFO


def _write_image(path, size=(32, 32), mode="RGB"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).convert(
        mode
    ).save(path)


def test_bad_input_one_line_exit_2_nothing_written(tiny_run, tmp_path):
    workdir = tiny_run("linf_dist")
    good = tmp_path / "folder"
    _write_image(good / "cat" / "a.png")
    _write_image(good / "dog" / "b.png")
    (good / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    wrong = tmp_path / "wrong"
    _write_image(wrong / "big.png", size=(40, 32))
    empty = tmp_path / "empty"
    empty.mkdir()
    no_image = tmp_path / "labels.npz"
    np.savez(no_image, label=np.zeros(3))
    (tmp_path / "no_checkpoints").mkdir()
    cases = [
        ((tmp_path / "no_checkpoints", good), "no checkpoints"),
        ((workdir, good), "broken.png"),
        ((workdir, wrong), "big.png: image is 40x32"),
        ((workdir, empty), "no image files"),
        ((workdir, no_image), "no 'image' array"),
        ((workdir, good, "--eps=-0.1"), "--eps=-0.1"),
    ]
    for (run, images, *extra), expected in cases:
        out = tmp_path / "out.jsonl"
        result = _certify_cli(run, images, f"--out={out}", *extra)
        assert result.returncode == 2, (expected, result.stderr[-2000:])
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("certjax:") and expected in lines[0], (expected, lines)
        assert not out.exists()
    # the corrupt image is skipped with a warning when asked
    out = tmp_path / "skipped.jsonl"
    result = _certify_cli(workdir, good, f"--out={out}", "--skip-bad-images")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "warning" in result.stderr and "broken.png" in result.stderr
    assert [row["file"] for row in _rows(out)] == ["cat/a.png", "dog/b.png"]


def test_certify_files_reads_an_npz_with_labels_and_a_single_image(tiny_run, tmp_path):
    from certjax.inference.certify_files import certify_files

    workdir = tiny_run("linf_dist")
    images, labels = make_real_source("demo", "test", "cifar10").read(np.arange(0, 40, 4))
    np.savez(tmp_path / "batch.npz", image=images, label=labels)
    summary = certify_files(str(workdir), str(tmp_path / "batch.npz"), out=str(tmp_path / "npz.csv"))
    rows = _rows(tmp_path / "npz.csv")
    expected = certjax.restore(str(workdir)).certify(images, labels=labels)
    assert [r["file"] for r in rows] == [f"batch.npz:{i}" for i in range(10)]
    assert [int(r["label"]) for r in rows] == labels.tolist()
    assert [float(r["radius"]) for r in rows] == expected["radius"].tolist()
    certified = expected["correct"] & expected["robust"]
    assert summary["certified_accuracy"] == pytest.approx(np.mean(certified))
    assert [r["certified"] == "True" for r in rows] == certified.tolist()
    from PIL import Image

    Image.fromarray(images[3]).save(tmp_path / "one.png")
    certify_files(str(workdir), str(tmp_path / "one.png"), out=str(tmp_path / "one.jsonl"))
    (row,) = _rows(tmp_path / "one.jsonl")
    assert row["file"] == "one.png" and "label" not in row and row["radius"] == float(expected["radius"][3])
