"""In-memory sources and deterministic subsets of any source.

Moved from certjax/data/sources.py ("in memory" and "subsets"): `ArraySource`, `SubsetSource`,
`subset_indices`, `complement_indices`. The real-data loaders (image folders, CIFAR
archives) decode into an `ArraySource`; subsets serve small-data studies (`data.real_subset`) and the
held-out rest of one (experiments/cpu_replication.py).
"""

from __future__ import annotations

import numpy as np

from certjax.data.sources.base import (
    DataError,
    check_image_layout,
    check_index,
    check_labels,
    check_num_classes,
)
from certjax.data.sources.registry import IMAGE_SHAPE


class ArraySource:
    """Images and labels held in memory (or any array-like with numpy indexing, e.g. a memmap).

    Args:
      images: uint8 [N, *image_shape]. labels: integers [N] in [0, num_classes). name: for messages.
      image_shape: (H, W, C) of the dataset (registry.DATASETS); CIFAR's by default.
    """

    def __init__(
        self, images: np.ndarray, labels, num_classes: int, name: str = "arrays", image_shape=IMAGE_SHAPE
    ):
        self.name = str(name)
        self.num_classes = check_num_classes(num_classes, self.name)
        self.image_shape = tuple(image_shape)
        if not isinstance(images, np.ndarray):
            raise DataError(f"{self.name}: images must be a numpy array, got {type(images)}")
        check_image_layout(images.dtype, images.shape, self.name, self.image_shape)
        self.labels = check_labels(labels, len(images), self.num_classes, self.name)
        # A read-only view: __getitem__ returns views, and a consumer writing into one must not be
        # able to change the dataset for every later epoch. The caller's array stays writeable.
        self.images = images.view()
        self.images.flags.writeable = False

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index) -> tuple[np.ndarray, np.int32]:
        i = check_index(index, len(self))
        return self.images[i], self.labels[i]

    def read(self, indices) -> tuple[np.ndarray, np.ndarray]:
        return self.images[indices], self.labels[indices]

    def __repr__(self) -> str:
        return f"ArraySource({self.name!r}, {len(self)} images, {self.num_classes} classes)"


def subset_indices(n_total: int, n: int, mode: str = "first", seed: int = 0) -> np.ndarray:
    """Sorted int64 indices of ``n`` of ``n_total`` elements: the first n, or random by seed."""
    if not 0 < n <= n_total:
        raise DataError(f"subset size must be in [1, {n_total}] (the source's size), got {n}")
    if mode == "first":
        return np.arange(n, dtype=np.int64)
    if mode == "random":
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(n_total, size=n, replace=False)).astype(np.int64)
    raise DataError(f"unknown subset mode {mode!r}; valid: 'first', 'random'")


def complement_indices(n_total: int, indices) -> np.ndarray:
    """Sorted indices in [0, n_total) not in ``indices`` (e.g. the held-out rest of a subset)."""
    keep = np.ones(n_total, bool)
    keep[np.asarray(indices, np.int64)] = False
    return np.flatnonzero(keep).astype(np.int64)


class SubsetSource:
    """The elements ``indices`` of another source, in that order (its classes and image shape too)."""

    def __init__(self, source, indices):
        indices = np.asarray(indices)
        if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer) or not len(indices):
            raise DataError(f"{source.name}: subset indices must be a non-empty 1-D integer array")
        if indices.min() < 0 or indices.max() >= len(source):
            raise DataError(f"{source.name}: subset indices must lie in [0, {len(source)})")
        self.source, self.indices = source, indices.astype(np.int64)
        self.num_classes = source.num_classes
        self.image_shape = source.image_shape
        self.name = f"{source.name} [subset of {len(indices)}]"

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index):
        return self.source[self.indices[check_index(index, len(self))]]

    def read(self, indices):
        return self.source.read(self.indices[indices])

    def __repr__(self) -> str:
        return f"SubsetSource({self.name!r}, {len(self)} images)"
