"""The official CIFAR-10/100 python archives (``cifar-10-python.tar.gz``, ``cifar-100-python.tar.gz``).

Moved from certjax/data/sources.py ("official archives"). The archives (Krizhevsky 2009,
https://www.cs.toronto.edu/~kriz/cifar.html) hold pickled batches of rows of 3072 uint8 values, the 32 x 32
red, green and blue planes of one image: the format fixes the image shape to CIFAR's `IMAGE_SHAPE`. They are
read in one pass and unpickled with an allow-list (`_ArrayUnpickler`), never with plain `pickle.load`.
"""

from __future__ import annotations

import codecs
import pickle
import tarfile
from pathlib import Path

import numpy as np

from certjax.data.sources.arrays import ArraySource
from certjax.data.sources.base import DataError, check_labels, check_num_classes
from certjax.data.sources.registry import IMAGE_SHAPE

_ARCHIVE_LAYOUT = {  # num_classes -> (folder, {split: batch files}, label key)
    10: (
        "cifar-10-batches-py",
        {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
        "labels",
    ),
    100: ("cifar-100-python", {"train": ["train"], "test": ["test"]}, "fine_labels"),
}

# The archives are pickles, and unpickling runs whatever callable the file names: allow only what
# numpy arrays need (names differ between the numpy that wrote the official files and numpy 2).
_ARRAY = np.zeros(1, np.uint8)
_PICKLE_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # bytes objects at pickle protocol 2
}
for _mod in ("numpy.core", "numpy._core"):
    _PICKLE_GLOBALS[(f"{_mod}.multiarray", "_reconstruct")] = _ARRAY.__reduce__()[0]
    _PICKLE_GLOBALS[(f"{_mod}.multiarray", "scalar")] = np.int64(0).__reduce__()[0]
    _PICKLE_GLOBALS[(f"{_mod}.numeric", "_frombuffer")] = _ARRAY.__reduce_ex__(5)[0]


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (not a CIFAR batch)")
        return _PICKLE_GLOBALS[(module, name)]


def _batch_field(batch, key):
    # Python 2 pickles read with encoding="bytes" have bytes keys; tolerate str keys too.
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    keys = sorted(k.decode() if isinstance(k, bytes) else str(k) for k in batch)
    raise KeyError(f"no '{key}' entry (entries: {keys})")


def load_cifar_archive(path, split: str, num_classes: int) -> ArraySource:
    """The official CIFAR-10/100 python archive (``.tar.gz``): pickled batches of CHW uint8 rows."""
    path = Path(path).expanduser()
    num_classes = check_num_classes(num_classes, path)
    if num_classes not in _ARCHIVE_LAYOUT:
        raise DataError(f"{path}: official archives exist for 10 or 100 classes, not {num_classes}")
    folder, splits, label_key = _ARCHIVE_LAYOUT[num_classes]
    if split not in splits:
        raise DataError(f"{path}: unknown split '{split}'; the archive holds {sorted(splits)}")
    if not path.is_file():
        raise DataError(f"{path}: no such file (expected cifar-{num_classes}-python.tar.gz)")
    wanted = [f"{folder}/{b}" for b in splits[split]]
    batches, tops = {}, set()
    try:
        # One pass in stream order: a .tar.gz cannot seek backwards without decompressing again.
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                tops.add(member.name.split("/")[0])
                if member.name in wanted and member.isfile():
                    where = f"{path}: {member.name}"
                    try:
                        batch = _ArrayUnpickler(tar.extractfile(member), encoding="bytes").load()
                        data = np.asarray(_batch_field(batch, "data"))
                        labels = np.asarray(_batch_field(batch, label_key))
                    except (tarfile.TarError, EOFError, OSError):
                        raise  # a damaged archive, reported below
                    except Exception as e:  # unpickling hostile/damaged bytes can raise anything
                        raise DataError(f"{where}: not a CIFAR batch ({e})") from e
                    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
                        raise DataError(
                            f"{where}: data is {data.dtype} {data.shape}, expected uint8 [N, 3072]"
                        )
                    labels = check_labels(labels, len(data), num_classes, where)
                    batches[member.name] = (data, labels)
                    if len(batches) == len(wanted):
                        break
    except DataError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise DataError(
            f"{path}: cannot read the archive ({type(e).__name__}: {e}); it is truncated or "
            "corrupt, download it again"
        ) from e
    missing = [w for w in wanted if w not in batches]
    if missing:
        hint = ""
        other = [n for n, (f, _, _) in _ARCHIVE_LAYOUT.items() if f in tops and n != num_classes]
        if other:
            hint = f"; this is the {other[0]}-class archive, choose the matching dataset"
        raise DataError(
            f"{path}: missing {missing[0]}; not the official CIFAR-{num_classes} python archive "
            f"(top-level entries: {sorted(tops)[:12]}){hint}"
        )
    data = np.concatenate([batches[w][0] for w in wanted])
    labels = np.concatenate([batches[w][1] for w in wanted])
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # CHW -> HWC
    return ArraySource(images, labels, num_classes, name=f"{path} [{split}]", image_shape=IMAGE_SHAPE)
