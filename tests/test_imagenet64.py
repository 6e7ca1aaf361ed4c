"""Tests of certjax.data.sources.imagenet64: official ImageNet64 batch files, read in place.

The fixture holds real images: the demo's CIFAR-10 JPEGs (tests/data64.py), resized to 64x64 (box resampling)
and written as the official scripts write them (PatrykChrabaszcz/Imagenet32_Scripts): a row is the R, G and B
planes of one image, labels are 1-based ints, as pickled dicts and as .npz. Three train batches stand for the
official ten (the loader takes train_data_batch_1..K). Pixels are checked against the resized arrays the test
wrote, not against anything the loader computes.
"""

import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from certjax.data.sources.base import DataError
from certjax.data.sources.imagenet64 import CONVERT_COMMAND, Imagenet64Source, load_imagenet64
from certjax.data.sources.imagenet64_convert import convert_imagenet64, main
from tests.data64 import cifar_images_64

REPO = Path(__file__).resolve().parents[1]
TRAIN_SIZES = (10, 9, 11)  # three batches of different sizes, so reads cross uneven file boundaries
VAL_SIZE = 8


def _real_images(count, start=0):
    """`count` real CIFAR-10 images resized to 64x64 NHWC, and official labels spanning 1..1000."""
    images, classes = cifar_images_64(count, start)
    return images, [int(c) * 111 + 1 for c in classes]  # 1, 112, ..., 1000: the official range's both ends


@pytest.fixture(scope="module")
def real():
    """{"train": [(images NHWC, official labels) per batch], "val": (images, labels)}."""
    images, labels = _real_images(sum(TRAIN_SIZES))
    bounds = np.cumsum([0, *TRAIN_SIZES])
    train = [(images[a:b], labels[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    return {"train": train, "val": _real_images(VAL_SIZE, start=7)}


def _rows(images):
    """NHWC -> the official rows: the R, G and B planes of each image, [N, 12288]."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), -1))


def _write_batch(path: Path, images, labels, form, train=True):
    """One official batch file: a pickled dict (as the official scripts write it) or an .npz."""
    data = _rows(images)
    batch = {"data": data, "labels": list(labels)}
    if train:
        batch["mean"] = data.mean(axis=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    if form == "pickle":
        with open(path, "wb") as f:
            pickle.dump(batch, f)
    else:
        save = np.savez_compressed if form == "npz_compressed" else np.savez
        save(path.with_name(path.name + ".npz"), **batch)


def _write_official(folder: Path, real, form="npz", layout="flat") -> Path:
    """train_data_batch_1..3 and val_data in `folder` ("flat") or in the official part folders ("parts")."""
    for k, (images, labels) in enumerate(real["train"], start=1):
        part = "" if layout == "flat" else ("Imagenet64_train_part1" if k <= 2 else "Imagenet64_train_part2")
        _write_batch(folder / part / f"train_data_batch_{k}", images, labels, form)
    val = "" if layout == "flat" else "Imagenet64_val"
    _write_batch(folder / val / "val_data", *real["val"], form, train=False)
    return folder


def _expected(real, split):
    if split == "train":
        return np.concatenate([b[0] for b in real["train"]]), np.concatenate(
            [b[1] for b in real["train"]]
        ) - 1
    return real["val"][0], np.asarray(real["val"][1]) - 1


def _assert_reads(src, real, split):
    images, labels = _expected(real, split)
    assert len(src) == len(labels)
    got_images, got_labels = src.read(np.arange(len(src)))
    assert got_images.dtype == np.uint8 and got_images.shape == (len(src), 64, 64, 3)
    assert np.array_equal(got_images, images)  # exact: the pixels the test resized and wrote
    assert got_labels.dtype == np.int32 and np.array_equal(got_labels, labels)
    assert np.array_equal(src.labels, labels)


@pytest.mark.parametrize("layout", ["flat", "parts"])
def test_both_splits_read_back_the_exact_pixels_and_labels_minus_one(tmp_path, real, layout):
    folder = _write_official(tmp_path, real, layout=layout)
    train = load_imagenet64(folder, "train")
    assert isinstance(train, Imagenet64Source)
    assert train.num_classes == 1000 and train.image_shape == (64, 64, 3)
    assert train.name == f"{folder} [train]" and len(train.files) == 3
    assert [f.name for f in train.files] == [f"train_data_batch_{k}.npz" for k in (1, 2, 3)]
    _assert_reads(train, real, "train")
    for split in ("test", "val"):  # "val" names the same file as "test"
        _assert_reads(load_imagenet64(folder, split), real, "test")


def test_getitem_gives_one_image_and_an_int32_label(tmp_path, real):
    src = load_imagenet64(_write_official(tmp_path, real), "train")
    images, labels = _expected(real, "train")
    image, label = src[TRAIN_SIZES[0]]  # the first image of the second file
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert isinstance(label, np.int32) and label == labels[TRAIN_SIZES[0]]
    assert np.array_equal(image, images[TRAIN_SIZES[0]])
    assert np.array_equal(src[np.int64(-1)][0], images[-1])  # numpy indices, negative from the end
    with pytest.raises(IndexError):
        src[len(src)]


def test_read_in_any_order_with_repeats_equals_stacked_getitem(tmp_path, real):
    src = load_imagenet64(_write_official(tmp_path, real), "train")
    rng = np.random.default_rng(0)
    # shuffled, repeated, a run crossing the boundary of files 1 and 2, and a negative index
    indices = np.concatenate([rng.permutation(len(src)), [3, 3, 9, 10, 11, 29, 0, -2]])
    images, labels = src.read(indices)
    one_by_one = [src[int(i)] for i in indices]
    assert np.array_equal(images, np.stack([image for image, _ in one_by_one]))
    assert np.array_equal(labels, [label for _, label in one_by_one])
    assert src.read(np.array([], np.int64))[0].shape == (0, 64, 64, 3)


def test_pickling_the_source_copies_no_images_and_reads_the_same(tmp_path, real):
    src = load_imagenet64(_write_official(tmp_path, real), "train")
    blob = pickle.dumps(src)
    assert len(blob) < 4096  # file names, offsets and labels; not 30 x 12288 bytes of pixels
    copy = pickle.loads(blob)
    assert np.array_equal(copy.read(np.arange(len(src)))[0], src.read(np.arange(len(src)))[0])
    assert np.array_equal(copy.labels, src.labels) and copy.name == src.name


@pytest.mark.parametrize("form", ["pickle", "npz_compressed"])
def test_files_that_cannot_be_read_in_place_are_refused_with_the_convert_command(tmp_path, real, form):
    folder = _write_official(tmp_path, real, form=form)
    for split, file in (("train", "train_data_batch_1"), ("test", "val_data")):
        with pytest.raises(DataError) as error:
            load_imagenet64(folder, split)
        message = str(error.value)
        assert file in message and "python -m certjax.data.sources.imagenet64_convert" in message
        assert ("pickled" if form == "pickle" else "compressed") in message
        assert "\n" not in message


@pytest.mark.parametrize("form", ["pickle", "npz_compressed"])
def test_converted_files_read_identically(tmp_path, real, form):
    src = _write_official(tmp_path / "official", real, form=form, layout="parts")
    lines = []
    written = convert_imagenet64(src, tmp_path / "converted", log=lines.append)
    names = ["train_data_batch_1", "train_data_batch_2", "train_data_batch_3", "val_data"]
    assert written == [tmp_path / "converted" / f"{n}.npz" for n in names]
    assert len(lines) == 4 and all(str(p) in line for p, line in zip(written, lines))
    for split in ("train", "test"):
        _assert_reads(load_imagenet64(tmp_path / "converted", split), real, split)
    with np.load(written[0]) as npz:  # stored as the official files hold it: 1-based labels, the mean
        assert np.array_equal(npz["labels"], real["train"][0][1])
        assert np.allclose(npz["mean"], _rows(real["train"][0][0]).mean(axis=0))
    with np.load(written[-1]) as npz:
        assert "mean" not in npz.files  # val_data has none


def test_converting_into_the_same_folder_leaves_both_forms_and_the_npz_is_read(tmp_path, real):
    folder = _write_official(tmp_path, real, form="pickle")
    convert_imagenet64(folder, folder, log=lambda line: None)
    _assert_reads(load_imagenet64(folder, "train"), real, "train")


def test_the_command_line_converts_and_prints_one_line_per_file(tmp_path, real):
    src = _write_official(tmp_path / "official", real, form="pickle")
    dst = tmp_path / "converted"
    result = subprocess.run(
        [sys.executable, "-m", "certjax.data.sources.imagenet64_convert", str(src), str(dst)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4 and lines[0].startswith(str(dst / "train_data_batch_1.npz"))
    _assert_reads(load_imagenet64(dst, "test"), real, "test")
    assert CONVERT_COMMAND == "python -m certjax.data.sources.imagenet64_convert"


def test_the_command_line_reports_a_bad_folder_in_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nowhere" in err and len(err.strip().splitlines()) == 1


def _rewrite_batch_1(folder, real, **changes):
    """train_data_batch_1.npz written again with `data` and/or `labels` replaced."""
    images, labels = real["train"][0]
    batch = {"data": _rows(images), "labels": np.asarray(labels), **changes}
    np.savez(folder / "train_data_batch_1.npz", **batch)


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


# (case, how to spoil the folder, load arguments, the file the message names, words it must hold)
BAD_INPUTS = {
    "gap": (
        lambda d, r: (d / "train_data_batch_2.npz").unlink(),
        {},
        "",
        ["train batches [2] missing", "found [1, 3]"],
    ),
    "no train files": (
        lambda d, r: [p.unlink() for p in d.glob("train_*")],
        {},
        "",
        ["no train_data_batch_<k> files"],
    ),
    "no val file": (lambda d, r: (d / "val_data.npz").unlink(), {"split": "test"}, "", ["no val_data"]),
    "32x32 rows": (
        lambda d, r: _rewrite_batch_1(d, r, data=np.zeros((10, 3072), np.uint8)),
        {},
        "train_data_batch_1.npz",
        ["this is ImageNet 32x32 (3072 bytes a row); ImageNet 64x64 rows have 12288"],
    ),
    "not uint8 rows": (
        lambda d, r: _rewrite_batch_1(d, r, data=np.zeros((10, 12288), np.float32)),
        {},
        "train_data_batch_1.npz",
        ["float32", "expected uint8 [N, 12288]"],
    ),
    "image shape": (lambda d, r: None, {"image_shape": (32, 32, 3)}, "", ["(64, 64, 3)", "(32, 32, 3)"]),
    "labels already 0-based": (
        lambda d, r: _rewrite_batch_1(d, r, labels=np.asarray(r["train"][0][1]) - 1),
        {},
        "train_data_batch_1.npz",
        ["label 0 found", "0-based", "1..1000"],
    ),
    "labels above num_classes": (
        lambda d, r: None,
        {"num_classes": 100},
        "train_data_batch_1.npz",
        ["labels must lie in 1..100", "[1, 1000]", "num_classes"],
    ),
    "counts differ": (
        lambda d, r: _rewrite_batch_1(d, r, labels=np.asarray(r["train"][0][1][:-1])),
        {},
        "train_data_batch_1.npz",
        ["10 images but 9 labels"],
    ),
    "truncated": (
        lambda d, r: _truncate(d / "train_data_batch_3.npz"),
        {},
        "train_data_batch_3.npz",
        ["truncated"],
    ),
    "not a zip": (
        lambda d, r: (d / "train_data_batch_2.npz").write_bytes(b"<html>not found</html>"),
        {},
        "train_data_batch_2.npz",
        ["not a zip"],
    ),
    "no data array": (
        lambda d, r: np.savez(d / "train_data_batch_1.npz", labels=np.arange(1, 11)),
        {},
        "train_data_batch_1.npz",
        ["no 'data' array"],
    ),
    "not a pickle": (
        lambda d, r: [(d / "val_data.npz").unlink(), (d / "val_data").write_bytes(b"GIF89a...")],
        {"split": "test"},
        "val_data",
        ["neither a .npz (zip) nor a pickle"],
    ),
    "found twice": (
        lambda d, r: [(d / "copy").mkdir(), shutil.copy(d / "train_data_batch_2.npz", d / "copy")],
        {},
        "train_data_batch_2",
        ["found 2 times", "keep one"],
    ),
    "unknown split": (lambda d, r: None, {"split": "validation"}, "", ["unknown split 'validation'"]),
    "a file, not a folder": (
        lambda d, r: None,
        {"path": "val_data.npz"},
        "val_data.npz",
        ["is a file", "give the folder"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_each_bad_input_is_one_data_error_naming_the_file_and_the_fix(tmp_path, real, case):
    spoil, arguments, file, words = BAD_INPUTS[case]
    folder = _write_official(tmp_path, real)
    spoil(folder, real)
    arguments = {"split": "train", **arguments}
    path = folder / arguments.pop("path", "")
    with pytest.raises(DataError) as error:
        load_imagenet64(path, **arguments)
    message = str(error.value)
    assert str(folder / file) in message, message
    for word in words:
        assert word in message, message


def test_convert_rejects_files_it_cannot_use(tmp_path, real):
    folder = tmp_path / "official"
    _write_batch(folder / "train_data_batch_1", np.zeros((2, 32, 32, 3), np.uint8), [1, 2], "pickle")
    with pytest.raises(DataError, match=r"train_data_batch_1: this is ImageNet 32x32 \(3072 bytes a row\)"):
        convert_imagenet64(folder, tmp_path / "out", log=lambda line: None)
    _write_batch(folder / "train_data_batch_1", *real["train"][0], "pickle")
    _truncate(folder / "train_data_batch_1")
    with pytest.raises(DataError, match=r"train_data_batch_1: not a readable pickle .*truncated"):
        convert_imagenet64(folder, tmp_path / "out", log=lambda line: None)
    assert not list((tmp_path / "out").iterdir())  # nothing half-written
    with pytest.raises(DataError, match="no official ImageNet64 files"):
        convert_imagenet64(tmp_path / "out", tmp_path / "out2", log=lambda line: None)


def test_the_trainer_entry_point_reads_the_folder_for_the_imagenet64_dataset(tmp_path, real):
    from certjax.data.sources import make_real_source

    folder = _write_official(tmp_path, real, layout="parts")
    for split in ("train", "test"):
        _assert_reads(make_real_source(str(folder), split, "imagenet64"), real, split)
