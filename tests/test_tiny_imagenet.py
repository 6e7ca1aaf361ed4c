"""Tiny-ImageNet-200 as distributed (certjax/data/sources/tiny_imagenet.py), on a real-image fixture in the
exact layout (tests/data64.py): label order, greyscale to RGB, both splits, zip and folder, pickling,
bad input."""

import pickle

import numpy as np
import pytest

from certjax.data import sources as S
from certjax.data.sources import DataError
from tests.data64 import WNIDS, decoded, tiny_imagenet_files, write_tiny_imagenet


@pytest.fixture(scope="module")
def files():
    return tiny_imagenet_files()


@pytest.fixture(scope="module", params=["zip", "folder"])
def tiny(request, files, tmp_path_factory):
    return write_tiny_imagenet(tmp_path_factory.mktemp(request.param), request.param == "zip", files)


def test_train_split_labels_are_the_sorted_rank_of_the_wnid(tiny, files):
    src = S.make_real_source(str(tiny), "train", "tiny_imagenet")
    assert len(src) == 400 and src.num_classes == 200 and src.image_shape == (64, 64, 3)
    ranks = {w: k for k, w in enumerate(sorted(WNIDS))}
    assert WNIDS != sorted(WNIDS)  # the fixture lists them unsorted: the listed order must not matter
    for i in (0, 1, 199, 399):
        member = src.members[i]
        wnid = member.split("/")[1]
        image, label = src[i]
        assert label == ranks[wnid] and np.array_equal(image, decoded(files[member]))
    assert list(src.labels) == sorted(src.labels)  # train images in label order


def test_val_split_follows_the_annotations_and_greyscale_becomes_rgb(tiny, files):
    src = S.make_real_source(str(tiny), "test", "tiny_imagenet")
    lines = files["val/val_annotations.txt"].decode().split("\n")
    ranks = {w: k for k, w in enumerate(sorted(WNIDS))}
    assert len(src) == 200
    assert [ranks[line.split("\t")[1]] for line in lines if line] == list(src.labels)
    grey, _ = src[0]  # val_0 is a greyscale JPEG: three equal channels
    assert grey.shape == (64, 64, 3) and np.array_equal(grey[..., 0], grey[..., 2])
    assert np.array_equal(grey, decoded(files["val/images/val_0.JPEG"]))


def test_batched_reads_and_pickling_give_the_same_images(tiny):
    src = S.make_real_source(str(tiny), "train", "tiny_imagenet")
    order = np.array([5, 399, 5, 0, 77])
    images, labels = src.read(order)
    assert images.dtype == np.uint8 and labels.dtype == np.int32
    assert np.array_equal(images, np.stack([src[int(i)][0] for i in order]))
    again = pickle.loads(pickle.dumps(src))
    assert len(pickle.dumps(src)) < 100_000  # names and labels, not images
    assert np.array_equal(again.read(order)[0], images) and np.array_equal(again.labels, src.labels)


def test_a_tiny_imagenet_path_needs_the_tiny_imagenet_dataset(tiny):
    with pytest.raises(DataError, match="set --config.data.dataset=tiny_imagenet"):
        S.make_real_source(str(tiny), "train", "cifar10")


def _damaged(files, drop=(), add=None):
    out = {k: v for k, v in files.items() if k not in drop}
    out.update(add or {})
    return out


def _bad_inputs(files):
    import io

    from PIL import Image

    small = io.BytesIO()
    Image.new("RGB", (56, 56)).save(small, "JPEG")
    first_train = next(k for k in files if k.startswith("train/") and k.endswith(".JPEG"))
    annotations = files["val/val_annotations.txt"].decode()
    return {
        "missing annotations": (
            _damaged(files, drop=["val/val_annotations.txt"]),
            "test",
            "val_annotations.txt is missing",
        ),
        "wrong size": (
            _damaged(files, add={first_train: small.getvalue()}),
            "train",
            "is 56x56, expected 64x64",
        ),
        "unknown wnid": (
            _damaged(
                files, add={"val/val_annotations.txt": annotations.replace(WNIDS[0], "n99999999").encode()}
            ),
            "test",
            "'n99999999' is not in wnids.txt",
        ),
        "too few wnids": (
            _damaged(files, add={"wnids.txt": "\n".join(WNIDS[:150]).encode()}),
            "train",
            "lists 150 ids (150 distinct), expected 200",
        ),
        "class without images": (
            _damaged(files, drop=[k for k in files if k.startswith(f"train/{WNIDS[3]}/")]),
            "train",
            "no images for 1 of the 200 classes",
        ),
        "unannotated image": (
            _damaged(files, add={"val/images/val_9999.JPEG": files["val/images/val_1.JPEG"]}),
            "test",
            "have no annotation (e.g. val_9999.JPEG)",
        ),
        "corrupt image": (
            _damaged(files, add={first_train: b"not a jpeg"}),
            "train",
            "cannot decode the image",
        ),
    }


@pytest.mark.parametrize(
    "case",
    ["missing annotations", "wrong size", "unknown wnid", "too few wnids", "class without images",
     "unannotated image", "corrupt image"],
)  # fmt: skip
def test_bad_input_is_one_clear_error_naming_the_file(case, files, tmp_path):
    damaged, split, message = _bad_inputs(files)[case]
    path = write_tiny_imagenet(tmp_path, True, damaged)
    with pytest.raises(DataError) as error:
        S.make_real_source(str(path), split, "tiny_imagenet")
    assert message in str(error.value) and str(path) in str(error.value)
    assert "\n" not in str(error.value)


def test_repacked_npz_splits_read_as_real_data(tmp_path):
    """DM-Improves-AT's tiny-imagenet-200/{train,val}.npz (image uint8 NHWC, label): `{split}` finds val.npz
    for the test split."""
    from tests.data64 import cifar_images_64

    for split, start in (("train", 0), ("val", 1)):
        images, labels = cifar_images_64(6, start)
        np.savez(tmp_path / f"{split}.npz", image=images, label=labels * 20)
    train = S.make_real_source(str(tmp_path / "{split}.npz"), "train", "tiny_imagenet")
    test = S.make_real_source(str(tmp_path / "{split}.npz"), "test", "tiny_imagenet")
    images, labels = cifar_images_64(6, 1)
    assert np.array_equal(test.read(np.arange(6))[0], images) and list(test.labels) == list(labels * 20)
    assert len(train) == 6 and train.image_shape == (64, 64, 3)


def test_tfds_has_no_tiny_imagenet_and_says_what_to_pass():
    with pytest.raises(DataError, match="tiny-imagenet-200.zip"):
        S.make_real_source("tfds", "train", "tiny_imagenet")
