"""Random-access data sources: real CIFAR-10/100 and diffusion-generated images, one module per format.

Split from certjax/data/sources.py (736 lines). Every source maps an index to ``(image uint8 [H, W, C],
label int32 scalar)`` and has ``__len__``, ``num_classes``, ``name``, ``image_shape`` (H, W, C) and a batched
``read(indices) -> (images [n, H, W, C], labels int32 [n])`` that the pipeline uses instead of n single
reads. Sources are handed to ``grain.MapDataset.source``: reads are thread-safe (no shared file offsets)
and every source pickles cheaply enough to go to worker processes.

- ``registry``: ``DatasetInfo`` records (image shape, classes, mean) in ``DATASETS``, keyed by
  ``config.data.dataset``; the input shape comes from there.
- ``base``: ``DataError``, the ``Source`` interface and the input checks every format shares.
- ``arrays``: ``ArraySource`` (in-memory arrays, what the real-data loaders return), ``SubsetSource``,
  ``subset_indices``, ``complement_indices`` (deterministic subsets).
- ``image_folder``: ``load_image_folder``, a folder or ``.zip`` of ``[<split>/]<class>/<file>.jpg|png``.
- ``cifar_archive``: ``load_cifar_archive``, the official ``cifar-10-python.tar.gz`` / ``cifar-100-python``.
- ``npz``: ``GeneratedNpzSource``, EDM ``.npz`` (``image``, ``label``), mapped in place, never read whole.
- ``tfds``: ``tfds_source``, tensorflow-datasets (needs internet the first time).
- ``tiny_imagenet``: ``TinyImageNetSource``, Tiny-ImageNet-200's zip or folder as distributed, decoded
  on read.
- ``imagenet64``: ``load_imagenet64``, the official ImageNet 64x64 batch files, read in place.
- here: ``make_real_source``, the one entry point the trainer calls, from a config string.

Every bad input raises one ``DataError`` at construction, naming the file, the problem and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path

from certjax.data.sources.arrays import ArraySource, SubsetSource, complement_indices, subset_indices
from certjax.data.sources.base import OFFLINE_OPTIONS, DataError, Source
from certjax.data.sources.cifar_archive import load_cifar_archive
from certjax.data.sources.image_folder import IMAGE_SUFFIXES, is_junk, load_image_folder
from certjax.data.sources.npz import GeneratedNpzSource
from certjax.data.sources.registry import (
    CIFAR10_CLASSES,
    DATASETS,
    DEMO_DIR,
    IMAGE_SHAPE,
    NUM_CLASSES,
    DatasetInfo,
    dataset_info,
    offline_options,
)
from certjax.data.sources.tfds import TfdsSource, tfds_source
from certjax.data.sources.tiny_imagenet import TinyImageNetSource, is_tiny_imagenet

__all__ = [
    "CIFAR10_CLASSES",
    "DATASETS",
    "DEMO_DIR",
    "IMAGE_SHAPE",
    "IMAGE_SUFFIXES",
    "NUM_CLASSES",
    "OFFLINE_OPTIONS",
    "ArraySource",
    "DataError",
    "DatasetInfo",
    "GeneratedNpzSource",
    "Source",
    "SubsetSource",
    "TfdsSource",
    "TinyImageNetSource",
    "complement_indices",
    "dataset_info",
    "is_junk",
    "load_cifar_archive",
    "load_image_folder",
    "make_real_source",
    "offline_options",
    "subset_indices",
    "tfds_source",
]


def _split_path(spec: str, split: str) -> Path:
    """The path of `spec` for `split` ("{split}" replaced; "test" falls back to "val", the name of the
    labelled evaluation split of Tiny-ImageNet and ImageNet), or a DataError when it does not exist."""
    names = [split, "val"] if split == "test" and "{split}" in spec else [split]
    paths = [Path(spec.replace("{split}", name)).expanduser() for name in names]
    for path in paths:
        if path.exists():
            return path
    also = f", nor {paths[1].name}" if len(paths) > 1 else ""
    template = f" (from {spec!r}{also})" if "{split}" in spec else ""
    raise DataError(f"{paths[0]}{template}: no such file or directory")


def make_real_source(
    spec: str, split: str, dataset: str, data_dir=None, labels: str = "names", cache_dir: str = ""
):
    """The real-data source named by a config string, checked against the dataset's record.

    Args:
      spec: "tfds" (tensorflow-datasets), "demo" (CIFAR-10 images shipped with certjax), or a path to an
        official ``.tar.gz`` archive, a ``.zip`` or a folder of class folders, Tiny-ImageNet-200's zip or
        folder as distributed, a folder of the official ImageNet 64x64 batch files, or an ``.npz``
        (``image``, ``label``) of real images; ``{split}`` in a path is replaced by the split name (e.g.
        ``/data/cifar10-jpeg-{split}.zip``; for "test", "val" when no "test" file exists).
      split: "train" or "test".
      dataset: a key of DATASETS (``config.data.dataset``): the classes and image shape the data must have.
      data_dir: tensorflow-datasets' data dir (None: its default).
      labels: how class folders are labelled: "names" (the dataset's class names), "sorted" or a JSON
        mapping file (certjax/data/labels.py).
      cache_dir: where a compressed real ``.npz`` is extracted once (``GeneratedNpzSource``).

    Returns:
      A source with ``image_shape`` and ``num_classes`` of the dataset; a DataError for any bad input.
    """
    info = dataset_info(dataset)
    if spec == "tfds":
        return tfds_source(dataset, split, data_dir)
    if spec == "demo":
        if dataset != "cifar10":
            raise DataError(f"the demo data is CIFAR-10 only, not {dataset}; use tfds or a path")
        if split not in ("train", "test"):
            raise DataError(f"demo data has splits 'train' and 'test', not {split!r}")
        return load_image_folder(
            DEMO_DIR / f"cifar10-demo-{split}.zip",
            split,
            info.num_classes,
            info.image_shape,
            info.class_names,
        )
    if not spec:
        raise DataError(f"empty real-data spec.\n{offline_options(dataset)}")
    path = _split_path(os.fspath(spec), split)
    if path.suffix == ".npz":  # a repacked real set (DM-Improves-AT's tiny-imagenet-200/{train,val}.npz)
        return GeneratedNpzSource(path, info.num_classes, image_shape=info.image_shape, cache_dir=cache_dir)
    if is_tiny_imagenet(path):
        if dataset != "tiny_imagenet":
            raise DataError(f"{path}: this is Tiny-ImageNet-200; set --config.data.dataset=tiny_imagenet")
        return TinyImageNetSource(path, split, info.num_classes, info.image_shape)
    if dataset == "imagenet64" and path.is_dir():
        from certjax.data.sources.imagenet64 import load_imagenet64

        return load_imagenet64(path, split, info.num_classes, info.image_shape)
    if path.name.endswith((".tar.gz", ".tgz")):
        if info.image_shape != IMAGE_SHAPE:  # the archives' rows are CIFAR's 32 x 32 x 3
            raise DataError(
                f"{path}: official CIFAR archives hold images of shape {IMAGE_SHAPE}, {dataset}'s are "
                f"{info.image_shape}"
            )
        return load_cifar_archive(path, split, info.num_classes)
    if path.is_dir() or path.suffix == ".zip":
        return load_image_folder(path, split, info.num_classes, info.image_shape, info.class_names, labels)
    raise DataError(
        f"{path}: unknown real-data format for {dataset}; expected {info.local_formats} (generated data goes "
        "in --config.data.generated)"
    )
