"""Class folders are labelled by the dataset's class names or as the user says, never guessed (issue 22, 3):
certjax.data.labels on its own, and through the training sources and the user images of --mode=certify,
on real CIFAR-10 JPEGs from the embedded sample."""

import json
import zipfile

import numpy as np
import pytest

from certjax.data import sources as S
from certjax.data.labels import folder_labels
from certjax.data.sources import CIFAR10_CLASSES, DataError
from certjax.data.sources.registry import CIFAR100_CLASSES
from certjax.data.user_images import read_user_images
from tests.conftest import REPO

DEMO_TEST = REPO / "certjax" / "data" / "demo" / "cifar10-demo-test.zip"


def _real_zip(path, folders: dict[str, str], per_class: int = 2):
    """A zip of real CIFAR-10 test JPEGs: folder name -> the CIFAR-10 class whose images it holds."""
    with zipfile.ZipFile(DEMO_TEST) as source, zipfile.ZipFile(path, "w") as target:
        names = sorted(source.namelist())
        for folder, cls in folders.items():
            members = [n for n in names if n.startswith(f"test/{cls}/")][:per_class]
            for member in members:
                file = member.rsplit("/", 1)[1]
                target.writestr(f"{folder}/{file}" if folder else file, source.read(member))
    return path


def test_folder_labels_by_name_sorted_and_from_a_file(tmp_path):
    assert folder_labels(["dog", "airplane"], CIFAR10_CLASSES, 10) == {"airplane": 0, "dog": 5}
    with pytest.raises(DataError, match=r"data: class folders cats, dogs are not the dataset's class names "
                       r"\(airplane, .*--labels=sorted.*--labels=FILE"):  # fmt: skip
        folder_labels(["cats", "dogs"], CIFAR10_CLASSES, 10, where="data")
    assert folder_labels(["dogs", "cats"], CIFAR10_CLASSES, 10, "sorted") == {"cats": 0, "dogs": 1}
    with pytest.raises(DataError, match="3 class folders, more than the 2 classes"):
        folder_labels(["a", "b", "c"], None, 2, "sorted")
    with pytest.raises(DataError, match="declares no class names"):
        folder_labels(["a", "b"], None, 2)
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"cats": "cat", "dogs": 5, "unused": 0}))
    assert folder_labels(["cats", "dogs"], CIFAR10_CLASSES, 10, str(mapping)) == {"cats": 3, "dogs": 5}
    for bad, message in (({"cats": "kitten", "dogs": 5}, "'cats' -> 'kitten' is no label"),
                         ({"cats": 10, "dogs": 5}, r"integer in \[0, 10\)"),
                         ({"dogs": 5}, "missing from the labels file .*: cats")):  # fmt: skip
        mapping.write_text(json.dumps(bad))
        with pytest.raises(DataError, match=message):
            folder_labels(["cats", "dogs"], CIFAR10_CLASSES, 10, str(mapping))
    mapping.write_text("{not json")
    with pytest.raises(DataError, match="cannot read it as JSON"):
        folder_labels(["cats"], CIFAR10_CLASSES, 10, str(mapping))
    with pytest.raises(DataError, match="neither 'names', 'sorted' nor a JSON file"):
        folder_labels(["cats"], CIFAR10_CLASSES, 10, str(tmp_path / "nowhere.json"))


def test_cifar100_class_names_are_its_fine_labels_in_order():
    assert len(CIFAR100_CLASSES) == 100 == len(set(CIFAR100_CLASSES))
    assert list(CIFAR100_CLASSES) == sorted(CIFAR100_CLASSES)  # the meta file's order is alphabetical
    assert CIFAR100_CLASSES[:3] == ("apple", "aquarium_fish", "baby") and CIFAR100_CLASSES[-1] == "worm"
    assert folder_labels(["worm", "apple"], CIFAR100_CLASSES, 100) == {"apple": 0, "worm": 99}


def test_training_folders_not_named_by_class_stop_unless_mapped(tmp_path):
    renamed = {f"class_{k}": cls for k, cls in enumerate(reversed(CIFAR10_CLASSES))}
    path = _real_zip(tmp_path / "renamed.zip", renamed)
    with pytest.raises(DataError, match=r"renamed.zip: class folders class_0, .* are not the dataset's"):
        S.make_real_source(str(path), "train", "cifar10")
    sorted_source = S.make_real_source(str(path), "train", "cifar10", labels="sorted")
    assert list(sorted_source.labels) == [k for k in range(10) for _ in range(2)]
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps(renamed))  # each folder -> the CIFAR-10 name of its images
    mapped = S.make_real_source(str(path), "train", "cifar10", labels=str(mapping))
    named = S.make_real_source(str(_real_zip(tmp_path / "named.zip", {c: c for c in CIFAR10_CLASSES})),
                               "train", "cifar10")  # fmt: skip
    # the same images under the same labels, whatever the folders were called
    order = np.lexsort((np.arange(len(mapped)), mapped.labels))
    np.testing.assert_array_equal(mapped.labels[order], named.labels)
    np.testing.assert_array_equal(mapped.images[order], named.images)


def test_user_images_in_folders_of_other_names_are_an_error_or_mapped(tmp_path):
    path = _real_zip(tmp_path / "pets.zip", {"cats": "cat", "dogs": "dog"})
    with pytest.raises(DataError, match=r"pets.zip: class folders cats, dogs are not the dataset's"):
        read_user_images(path)
    data = read_user_images(path, labels="sorted")
    assert list(data.labels) == [0, 0, 1, 1] and data.class_names[:2] == ["cats", "dogs"]
    mapping = tmp_path / "pets.json"
    mapping.write_text(json.dumps({"cats": "cat", "dogs": "dog"}))
    data = read_user_images(path, labels=str(mapping))
    assert list(data.labels) == [3, 3, 5, 5]
    # folders named by the dataset's classes need nothing; a flat folder stays unlabelled
    named = read_user_images(_real_zip(tmp_path / "named.zip", {"cat": "cat", "truck": "truck"}))
    assert list(named.labels) == [3, 3, 9, 9] and named.class_names == list(CIFAR10_CLASSES)
    flat = read_user_images(_real_zip(tmp_path / "flat.zip", {"": "cat"}))
    assert flat.labels is None and len(flat.images) == 2
    # a CIFAR-100 model's folders are CIFAR-100's names
    apples = _real_zip(tmp_path / "c100.zip", {"apple": "cat", "worm": "dog"})
    assert list(read_user_images(apples, dataset="cifar100").labels) == [0, 0, 99, 99]
