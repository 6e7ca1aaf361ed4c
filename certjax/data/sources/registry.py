"""The datasets certjax knows, one `DatasetInfo` record each: image shape, classes, per-channel mean.

Principle 8 of the redesign (issue 21): the input shape comes from the data. `config.data.dataset` names a
record of `DATASETS`; the sources, the pipeline and the user-image checks take the image shape from it (and
the sources expose it as `image_shape`), so a 64 x 64 dataset is one new record here, not a code hunt. Moved
from certjax/data/sources.py (`NUM_CLASSES`, `IMAGE_SHAPE`, `CIFAR10_CLASSES`, `_num_classes`).

The means are the datasets' per-channel pixel means (in [0, 1]) that configs/common.py normalises with; the
std of a run is the family's recipe (one std for all channels keeps l_inf balls l_inf balls), not the
dataset's, so it stays in the configs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from certjax.data.sources.base import OFFLINE_OPTIONS, DataError

# CIFAR's images (Krizhevsky 2009): the shape loaders check when they are given no dataset
IMAGE_SHAPE = (32, 32, 3)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
# CIFAR-100's fine labels, in the order of the archive's meta file (alphabetical)
CIFAR100_CLASSES = tuple(
    """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly
    camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile
    cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp
    lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom
    oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine
    possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake
    spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor
    train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split()
)
DEMO_DIR = Path(__file__).parent.parent / "demo"  # certjax/data/demo: the embedded CIFAR-10 sample


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """One dataset: what the model's input and output look like, whatever format the files come in.

    name: the key of `DATASETS` and the value of `config.data.dataset`. image_shape: (height, width,
    channels) of every image, uint8 pixels. num_classes: labels lie in [0, num_classes). mean: per-channel
    pixel mean in [0, 1]. class_names: the class of each label, the names class folders must have
    (certjax/data/labels.py; None: the dataset declares none, and folders are labelled only as the user
    says). tfds_name, tfds_test_split, download_hosts: its tensorflow-datasets name ("" = name, None = it
    has none), the split that is certjax's "test", the hosts a download needs. local_formats: the files a
    user can pass instead, as an error tells them.
    """

    name: str
    image_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    class_names: tuple[str, ...] | None = None
    tfds_name: str | None = ""  # "": the same as name; None: tensorflow-datasets has no builder for it
    tfds_test_split: str = "test"  # the tensorflow-datasets split certjax's "test" reads
    # the hosts a tensorflow-datasets download of it fetches from (probed before tfds retries for minutes)
    download_hosts: tuple[str, ...] = ("storage.googleapis.com", "www.cs.toronto.edu")
    # what a user is told to pass when the data is not at hand (the offline options of an error)
    local_formats: str = "an official .tar.gz archive, a .zip or a folder of class folders"


DATASETS = {
    info.name: info
    for info in (
        # CIFAR-10's label order is not alphabetical; CIFAR-100's fine labels are
        DatasetInfo("cifar10", IMAGE_SHAPE, 10, (0.4914, 0.4822, 0.4465), CIFAR10_CLASSES),
        DatasetInfo("cifar100", IMAGE_SHAPE, 100, (0.5071, 0.4867, 0.4408), CIFAR100_CLASSES),
        # 64 x 64 (shared/RECIPES.md, "64x64 datasets"); means as SortNet's dataset.py normalises them. Their
        # class names come with the files: Tiny's wnids.txt (labels = sorted wnids), ImageNet 64x64's
        # official label order (map_clsloc.txt, labels 1-1000 in the files, 0-999 here)
        DatasetInfo(
            "tiny_imagenet", (64, 64, 3), 200, (0.4802, 0.4481, 0.3975), None, None, "test", (),
            "tiny-imagenet-200.zip or its folder as distributed, or DM-Improves-AT's repacked {split}.npz",
        ),
        DatasetInfo(
            "imagenet64", (64, 64, 3), 1000, (0.4815, 0.4578, 0.4082), None, "imagenet_resized/64x64",
            "validation", ("image-net.org",),
            "a folder of the official Imagenet64 batch files (train_data_batch_1..10, val_data; .npz)",
        ),
    )
}  # fmt: skip
NUM_CLASSES = {name: info.num_classes for name, info in DATASETS.items()}


def offline_options(dataset: str) -> str:
    """What to pass when the dataset cannot be downloaded: the CIFAR options, or the dataset's local files."""
    info = dataset_info(dataset)
    if info.image_shape == IMAGE_SHAPE:
        return OFFLINE_OPTIONS
    return (
        f"Without internet (or for {dataset}, which tensorflow-datasets may not provide), point the trainer "
        f"at local data: --config.data.real=PATH with PATH {info.local_formats}"
    )


def dataset_info(dataset: str) -> DatasetInfo:
    """The record of `dataset` (a key of DATASETS); a DataError naming the valid ones otherwise."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")
    return DATASETS[dataset]
