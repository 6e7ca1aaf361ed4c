"""CIFAR-10/100 and ImageNet 64x64 (imagenet_resized/64x64) from tensorflow-datasets (``tfds.data_source``):
the default real data, fetched on first use.

Moved from certjax/data/sources.py ("tfds"). tensorflow-datasets needs the internet the first time; offline
it retries for minutes before failing, so the download hosts are probed first and the error names the
offline options (`registry.offline_options`) at once (shared/DESIGN.md, "Known facts about the stack").
"""

from __future__ import annotations

import logging

import numpy as np

from certjax.data.sources.base import (
    DataError,
    check_image_layout,
    check_index,
    check_labels,
)
from certjax.data.sources.registry import IMAGE_SHAPE, dataset_info, offline_options

_log = logging.getLogger(__name__)


class TfdsSource:
    """A ``tfds.data_source`` (elements {'image', 'label'}) in this package's interface; its first element
    must be an image of ``image_shape`` (the dataset's, CIFAR's by default)."""

    def __init__(self, data_source, num_classes: int, name: str, image_shape=IMAGE_SHAPE):
        self._ds, self.num_classes, self.name = data_source, num_classes, name
        self.image_shape = tuple(image_shape)
        if len(self._ds) == 0:
            raise DataError(f"{name}: tensorflow_datasets returned an empty split")
        image, label = self[0]  # check the element layout now rather than mid-training
        check_image_layout(image.dtype, (1, *image.shape), name, self.image_shape)
        check_labels(np.array([label]), 1, num_classes, name)

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index):
        element = self._ds[check_index(index, len(self))]
        return np.asarray(element["image"]), np.int32(element["label"])

    def read(self, indices):
        pairs = [self[int(i)] for i in np.asarray(indices).reshape(-1)]
        images = np.stack([p[0] for p in pairs]) if pairs else np.empty((0, *self.image_shape), np.uint8)
        return images, np.array([p[1] for p in pairs], np.int32)

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, {len(self)} images)"


def _download_host_reachable(hosts, timeout: float = 5.0) -> bool:
    """One TCP connection attempt per host (the dataset's `download_hosts`, port 443): offline machines
    answer at once (or time out in seconds), instead of the ~205 s of retries tfds spends before it gives
    up."""
    import socket

    for host in hosts:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            return True
        except OSError:
            continue
    return False


def tfds_source(dataset_name: str, split: str, data_dir=None) -> TfdsSource:
    """A dataset of the registry (CIFAR-10/100, ImageNet 64x64) from tensorflow-datasets, downloaded and
    prepared at first.

    Args:
      dataset_name: a key of registry.DATASETS (its `tfds_name` is what is fetched). split: "train" / "test"
        (the dataset's `tfds_test_split`).
      data_dir: tensorflow-datasets' data dir (None: its default).

    Returns:
      A TfdsSource; a DataError naming the offline options when tensorflow-datasets cannot provide it.
    """
    info = dataset_info(dataset_name)
    options = offline_options(dataset_name)
    if info.tfds_name is None:
        raise DataError(f"{dataset_name}: tensorflow-datasets has no builder for it\n{options}")
    tfds_name = info.tfds_name or dataset_name
    tfds_split = info.tfds_test_split if split == "test" else split
    where = f"tfds:{tfds_name}[{tfds_split}]"
    try:
        import tensorflow_datasets as tfds
    except Exception as e:  # ImportError, or its own imports failing (importlib_resources)
        raise DataError(f"{where}: cannot import tensorflow_datasets ({e}).\n{options}") from e
    try:
        try:
            ds = tfds.data_source(tfds_name, split=tfds_split, data_dir=data_dir, download=False)
        except Exception:
            # Not prepared yet. Offline, tfds retries for ~3.5 minutes before failing: fail fast instead.
            if not _download_host_reachable(info.download_hosts):
                raise DataError(
                    f"{where}: not prepared in the tfds data dir and the download hosts "
                    f"({', '.join(info.download_hosts)}) cannot be reached: no internet?\n{options}"
                ) from None
            _log.warning("%s: not prepared yet, downloading. %s", where, options)
            ds = tfds.data_source(tfds_name, split=tfds_split, data_dir=data_dir, download=True)
    except DataError:
        raise
    except Exception as e:  # requests.ConnectionError offline, but tfds raises many types
        reason = f"{type(e).__name__}: {e}"[:400]
        raise DataError(f"{where}: the download failed ({reason}).\n{options}") from e
    return TfdsSource(ds, info.num_classes, where, info.image_shape)
