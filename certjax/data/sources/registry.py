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

from certjax.data.sources.base import DataError

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

    name: the key of `DATASETS` and the value of `config.data.dataset` (and the tensorflow-datasets name).
    image_shape: (height, width, channels) of every image, uint8 pixels. num_classes: labels lie in
    [0, num_classes). mean: per-channel pixel mean in [0, 1]. class_names: the class of each label, the
    names class folders must have (certjax/data/labels.py; None: the dataset declares none, and folders
    are labelled only as the user says).
    """

    name: str
    image_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    class_names: tuple[str, ...] | None = None


DATASETS = {
    info.name: info
    for info in (
        # CIFAR-10's label order is not alphabetical; CIFAR-100's fine labels are
        DatasetInfo("cifar10", IMAGE_SHAPE, 10, (0.4914, 0.4822, 0.4465), CIFAR10_CLASSES),
        DatasetInfo("cifar100", IMAGE_SHAPE, 100, (0.5071, 0.4867, 0.4408), CIFAR100_CLASSES),
    )
}
NUM_CLASSES = {name: info.num_classes for name, info in DATASETS.items()}


def dataset_info(dataset: str) -> DatasetInfo:
    """The record of `dataset` (a key of DATASETS); a DataError naming the valid ones otherwise."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")
    return DATASETS[dataset]
