"""What every data source shares: the `DataError`, the `Source` interface and the checks of its inputs.

Moved from certjax/data/sources.py (its "checks" section), where the checks were private; every format module
of this package calls them, so they are public here. Every bad input raises one `DataError` at construction,
naming the file, the problem and the fix, so that it fails before training, not deep inside a jitted step.
"""

from __future__ import annotations

import operator
import os
from typing import Protocol

import numpy as np

OFFLINE_OPTIONS = (
    "Without internet, point the trainer at local data instead:\n"
    "  --config.data.real=/path/to/cifar-10-python.tar.gz  (official python archive;"
    " cifar-100-python.tar.gz for CIFAR-100)\n"
    "  --config.data.real=/path/to/folder_or_zip  (class folders; a {split} template such as"
    " /data/cifar10-jpeg-{split}.zip picks the train/test file)\n"
    "  --config.data.real=demo  (5,000 real CIFAR-10 images shipped with certjax, for smoke tests)"
)


class DataError(ValueError):
    """A data input is missing or malformed; the message names the file, the problem and the fix."""


class Source(Protocol):
    """What the pipeline needs from a source (for type hints; sources do not inherit from it).

    A source maps an index to ``(image uint8 [H, W, C], label int32 scalar)``, and ``read(indices)`` gives a
    batch ``(images [n, H, W, C], labels int32 [n])`` in one call; ``image_shape`` is (H, W, C).
    """

    num_classes: int
    name: str
    image_shape: tuple[int, int, int]

    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> tuple[np.ndarray, np.int32]: ...
    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


def check_num_classes(num_classes, where) -> int:
    """num_classes as an int >= 1, else a DataError naming `where`."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer):
        raise DataError(f"{where}: num_classes must be an int, got {num_classes!r}")
    if num_classes < 1:
        raise DataError(f"{where}: num_classes must be >= 1, got {num_classes}")
    return int(num_classes)


def check_image_layout(dtype, shape, where, image_shape, what="images") -> None:
    """Raise a DataError unless images of `dtype` and `shape` are a non-empty uint8 [N, *image_shape]."""
    if dtype != np.uint8:
        raise DataError(f"{where}: {what} have dtype {dtype}, expected uint8 (pixels 0..255)")
    if len(shape) != 4 or tuple(shape[1:]) != tuple(image_shape):
        expected = ", ".join(str(n) for n in image_shape)
        raise DataError(f"{where}: {what} have shape {tuple(shape)}, expected [N, {expected}]")
    if shape[0] == 0:
        raise DataError(f"{where}: {what} are empty (0 images)")


def check_labels(labels, n_images, num_classes, where) -> np.ndarray:
    """Labels as int32 [n_images] in [0, num_classes), checked so that a bad label fails here, not deep inside
    a jitted step."""
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: labels have dtype {labels.dtype}, expected an integer type")
    if labels.ndim != 1:
        raise DataError(f"{where}: labels have shape {labels.shape}, expected [N]")
    if len(labels) != n_images:
        raise DataError(f"{where}: {n_images} images but {len(labels)} labels; the counts must be equal")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise DataError(
            f"{where}: labels must lie in [0, {num_classes}), found values in [{lo}, {hi}]; "
            "is the dataset right (cifar10: 10 classes, cifar100: 100)?"
        )
    return labels.astype(np.int32)


def check_index(index, n) -> int:
    """index (numpy integers too; negative counts from the end) as an int in [0, n), else IndexError."""
    i = operator.index(index)  # grain hands over numpy integers
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"index {index} out of range for a source of {n} elements")
    return i


def pread_into(fd: int, part: memoryview, offset: int, where) -> None:
    """Fill `part` with the bytes of the open file `fd` from `offset` by positional reads (no shared file
    position, so reader threads may share `fd`), straight into `part` where the OS has preadv. One read
    returns at most ~2 GB on Linux, hence the loop; an OSError naming `where` if the file ends early."""
    while len(part):
        if hasattr(os, "preadv"):
            got = os.preadv(fd, [part], offset)
        else:
            data = os.pread(fd, len(part), offset)
            part[: len(data)], got = data, len(data)
        if got <= 0:
            raise OSError(f"{where}: short read; the file changed on disk")
        part, offset = part[got:], offset + got
