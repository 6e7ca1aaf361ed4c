"""Downsampled ImageNet 64x64 from its official batch files, read in place, never loaded whole.

Source: P. Chrabaszcz, I. Loshchilov, F. Hutter, "A Downsampled Variant of ImageNet as an Alternative to the
CIFAR datasets" (arXiv:1707.08819, 2017); the file layout is that of the official downloads
(https://patrykchrabaszcz.github.io/Imagenet32/, written and read by PatrykChrabaszcz/Imagenet32_Scripts):

- ``Imagenet64_train_part1/`` holds ``train_data_batch_1`` .. ``_5`` and ``Imagenet64_train_part2/`` holds
  ``_6`` .. ``_10`` (1,281,167 images, 15.7 GB); ``Imagenet64_val/val_data`` holds the 50,000 validation
  images. Each file is a pickled dict: ``data`` uint8 [N, 12288], ``labels`` a list of ints 1..1000 (the
  order of the official ``map_clsloc.txt``), train files also ``mean``. The ``*_npz.zip`` downloads hold
  the same dicts as ``.npz`` files (``train_data_batch_1.npz``, ``val_data.npz``).
- A row of ``data`` is the red, green and blue planes of one 64x64 image, each row-major (as CIFAR's
  batches): reshape to [N, 3, 64, 64], then transpose to the pipeline's [N, 64, 64, 3].
- certjax's label is the official label - 1.

`load_imagenet64` reads an ``.npz`` whose ``data`` member is stored uncompressed (``np.savez``) where it lies
in the zip, with positional reads (the same scheme as npz.GeneratedNpzSource): only the labels are held in
memory. A pickle, or a compressed ``.npz`` (``np.savez_compressed``), cannot be read in place; such files are
refused with the command that converts them once (certjax/data/sources/imagenet64_convert.py)::

    python -m certjax.data.sources.imagenet64_convert SRC DST

which writes one uncompressed ``<name>.npz`` (``data``, ``labels`` and ``mean`` as stored) per batch file,
one file at a time. Every bad input raises one `DataError` naming the file, the problem and the fix.
"""

from __future__ import annotations

import math
import os
import re
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

from certjax.data.sources.base import DataError, check_index, check_num_classes, pread_into

IMAGENET64_SHAPE = (64, 64, 3)
ROW_BYTES = math.prod(IMAGENET64_SHAPE)  # 12288: one image's three 64x64 planes
CONVERT_COMMAND = "python -m certjax.data.sources.imagenet64_convert"
SPLIT_FILES = {"train": "train_data_batch_<k>", "test": "val_data", "val": "val_data"}

# "train_data_batch_3", "val_data.npz": the official names, with or without the .npz of the npz downloads
_BATCH_NAME = re.compile(r"(train_data_batch_([1-9][0-9]*)|val_data)(\.npz)?")
_ZIP_MAGIC = b"PK\x03\x04"
# A pickle starts with PROTO (protocol >= 2), or MARK / EMPTY_DICT for a dict at protocols 0 and 1
_PICKLE_FIRST_BYTES = (b"\x80", b"(", b"}")


def _convert_fix(folder) -> str:
    return f"convert the files once: {CONVERT_COMMAND} {folder} DST, then point certjax at DST"


def find_batch_files(folder: Path) -> dict[str, Path]:
    """{"train_data_batch_1": path, ..., "val_data": path}: the official files in `folder` and its immediate
    subfolders (the official downloads unpack into Imagenet64_train_part1/, _part2/ and Imagenet64_val/).

    Where a batch is there both as a pickle and as an .npz (converted beside the originals), the .npz is
    used: it is the form that reads in place. Two files of the same form are ambiguous: a DataError.
    """
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "no such folder"
        raise DataError(
            f"{folder}: {what}; give the folder holding the official ImageNet64 files (train_data_batch_1.."
            "10, val_data) or the parent of Imagenet64_train_part1/, _part2/ and Imagenet64_val/"
        )
    candidates: dict[str, dict[bool, list[Path]]] = {}
    for directory in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]:
        for file in sorted(directory.iterdir()):
            match = _BATCH_NAME.fullmatch(file.name)
            if match and file.is_file():
                forms = candidates.setdefault(match.group(1), {True: [], False: []})
                forms[match.group(3) is not None].append(file)
    found = {}
    for name, forms in candidates.items():
        files = forms[True] or forms[False]
        if len(files) > 1:
            raise DataError(
                f"{folder}: {name} found {len(files)} times ({', '.join(map(str, files))}); keep one"
            )
        found[name] = files[0]
    return found


def train_number(name: str) -> int:
    return int(name.rsplit("_", 1)[1])


def _split_files(folder: Path, split: str, found: dict[str, Path]) -> list[Path]:
    """The files of `split` in reading order: train batches 1..K (contiguous from 1), or val_data."""
    if split != "train":
        if "val_data" not in found:
            raise DataError(
                f"{folder}: no val_data (or val_data.npz) here or in its subfolders; copy the official "
                "Imagenet64_val/val_data there"
            )
        return [found["val_data"]]
    numbers = sorted(train_number(name) for name in found if name.startswith("train_"))
    if not numbers:
        raise DataError(
            f"{folder}: no train_data_batch_<k> files here or in its subfolders; copy the official "
            "Imagenet64_train_part1/ and _part2/ (train_data_batch_1..10) there"
        )
    # The official set has batches 1..10; a smaller set 1..K is accepted (tests, quick runs), a gap is not.
    missing = sorted(set(range(1, numbers[-1] + 1)) - set(numbers))
    if missing:
        raise DataError(
            f"{folder}: train batches {missing} missing (found {numbers}): train_data_batch_<k> must run "
            "from 1 without a gap; copy the missing files (the official set is train_data_batch_1..10)"
        )
    return [found[f"train_data_batch_{k}"] for k in numbers]


def check_rows(dtype, shape, where) -> None:
    """Raise a DataError unless `data` of `dtype` and `shape` is a non-empty uint8 [N, 12288]."""
    shape = tuple(shape)
    if dtype == np.uint8 and len(shape) == 2 and shape[1] != ROW_BYTES:
        side = math.isqrt(shape[1] // 3)
        if 3 * side * side == shape[1] and side:  # another of the downsampled sets (8, 16 or 32 pixels)
            raise DataError(
                f"{where}: this is ImageNet {side}x{side} ({shape[1]} bytes a row); ImageNet 64x64 rows "
                f"have {ROW_BYTES}: use the Imagenet64 files"
            )
    if dtype != np.uint8 or len(shape) != 2 or shape[1] != ROW_BYTES:
        raise DataError(
            f"{where}: data is {dtype} {shape}, expected uint8 [N, {ROW_BYTES}] (a row holds the R, G and B "
            "planes of one 64x64 image); not an official ImageNet64 file"
        )
    if shape[0] == 0:
        raise DataError(f"{where}: data holds 0 images; the file is damaged, copy it again")


def official_labels(labels, n_images: int, num_classes: int, where) -> np.ndarray:
    """certjax labels (int32 [n_images] in [0, num_classes)) from official ones (1..num_classes)."""
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer) or labels.ndim != 1:
        raise DataError(f"{where}: labels are {labels.dtype} {labels.shape}, expected integers [N]")
    if len(labels) != n_images:
        raise DataError(
            f"{where}: {n_images} images but {len(labels)} labels; the counts must be equal (the file is "
            "damaged or not official: copy it again)"
        )
    lo, hi = int(labels.min()), int(labels.max())
    if lo == 0:
        raise DataError(
            f"{where}: label 0 found, so this file's labels are already 0-based; official ImageNet64 labels "
            f"run 1..{num_classes} (map_clsloc.txt order) and certjax subtracts 1: use the official file, or "
            "add 1 to its labels"
        )
    if lo < 1 or hi > num_classes:
        raise DataError(
            f"{where}: labels must lie in 1..{num_classes} (official labels are 1-based), found values in "
            f"[{lo}, {hi}]; is num_classes right (ImageNet64: 1000)?"
        )
    return (labels - 1).astype(np.int32)


def _member_data_offset(f, info: zipfile.ZipInfo, where) -> int:
    """Offset in the file where a stored (uncompressed) zip member's bytes begin.

    The central directory gives the local header's offset; the local header's own name and extra lengths
    (its extra field holds the zip64 sizes that np.savez writes) give where the bytes start.
    """
    f.seek(info.header_offset)
    local = f.read(30)
    if len(local) < 30 or local[:4] != _ZIP_MAGIC:
        raise DataError(f"{where}: the zip header of data.npy is damaged; the file is corrupt, copy it again")
    name_length, extra_length = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_length + extra_length


def _npy_rows(f, where) -> tuple[int, int]:
    """Parse the .npy header of `data` at f's position: (bytes of header, number of rows)."""
    start = f.tell()
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except ValueError as e:
        raise DataError(f"{where}: data is not a readable .npy array ({e}); copy the file again") from e
    check_rows(dtype, shape, where)
    if fortran and shape[0] > 1:
        raise DataError(f"{where}: data is stored in Fortran order; save a C-order array")
    return f.tell() - start, shape[0]


def _inspect_npz(file: Path, folder: Path, num_classes: int) -> tuple[int, int, np.ndarray]:
    """(offset of data's first row in the file, number of rows, certjax labels) of one .npz batch."""
    try:
        with zipfile.ZipFile(file) as zf:
            members = {i.filename: i for i in zf.infolist()}
            for key in ("data", "labels"):
                if f"{key}.npy" not in members:
                    keys = sorted(n.removesuffix(".npy") for n in members)
                    raise DataError(
                        f"{file}: no '{key}' array (arrays in the file: {keys}); official ImageNet64 files "
                        "hold 'data' and 'labels'"
                    )
            with zf.open("labels.npy") as f:
                labels = np.lib.format.read_array(f, allow_pickle=False)
            info = members["data.npy"]
            if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
                raise DataError(
                    f"{file}: data.npy is compressed (np.savez_compressed), so it cannot be read in place; "
                    + _convert_fix(folder)
                )
            with open(file, "rb") as f:
                f.seek(_member_data_offset(f, info, file))
                header, n = _npy_rows(f, file)
                offset = f.tell()
            if info.file_size != header + n * ROW_BYTES:
                raise DataError(f"{file}: data.npy's size disagrees with its header; the file is corrupt")
    except DataError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, zlib.error) as e:
        raise DataError(
            f"{file}: not a readable .npz ({type(e).__name__}: {e}); it is truncated or corrupt, copy it "
            "again (or convert the originals again)"
        ) from e
    if os.path.getsize(file) < offset + n * ROW_BYTES:
        raise DataError(f"{file}: truncated: the file ends before its {n} images do; copy it again")
    return offset, n, official_labels(labels, n, num_classes, file)


def file_kind(file: Path) -> str:
    """ "npz" (a zip, whatever the name), "pickle", or a DataError for anything else."""
    try:
        with open(file, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise DataError(f"{file}: cannot read ({e})") from e
    if head == _ZIP_MAGIC:
        return "npz"
    if file.suffix == ".npz":
        raise DataError(
            f"{file}: not a zip (first bytes {head!r}), so not a .npz; it is truncated or corrupt, copy it "
            "again"
        )
    if head[:1] in _PICKLE_FIRST_BYTES:
        return "pickle"
    raise DataError(
        f"{file}: neither a .npz (zip) nor a pickle (first bytes {head!r}); not an official ImageNet64 batch "
        "file: download it again"
    )


class Imagenet64Source:
    """Official ImageNet64 batch files as one source; see `load_imagenet64`.

    Attributes: ``files`` (the batch files, in reading order), ``labels`` (int32 [N], certjax labels of all
    rows), ``num_classes``, ``image_shape`` (64, 64, 3), ``name`` ("<folder> [<split>]"), ``split``.
    """

    def __init__(self, path, split: str, num_classes: int = 1000, image_shape=IMAGENET64_SHAPE):
        self.path = Path(path).expanduser()
        self.num_classes = check_num_classes(num_classes, self.path)
        if tuple(image_shape) != IMAGENET64_SHAPE:
            raise DataError(
                f"{self.path}: ImageNet64 images have shape {IMAGENET64_SHAPE}, not {tuple(image_shape)}; "
                "use the imagenet64 dataset (its image shape)"
            )
        if split not in SPLIT_FILES:
            raise DataError(
                f"{self.path}: unknown split {split!r}; ImageNet64 has 'train' (train_data_batch_1..10) and "
                "'test' (val_data; 'val' means the same)"
            )
        self.image_shape, self.split = IMAGENET64_SHAPE, split
        self.files = _split_files(self.path, split, find_batch_files(self.path))
        offsets, counts, labels = [], [], []
        for file in self.files:
            if file_kind(file) == "pickle":
                raise DataError(
                    f"{file}: a pickled batch (the official download format) cannot be read in place and "
                    "is never loaded whole here; " + _convert_fix(self.path)
                )
            offset, n, file_labels = _inspect_npz(file, self.path, self.num_classes)
            offsets.append(offset)
            counts.append(n)
            labels.append(file_labels)
        self._offsets = offsets
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # first row of each file
        self.labels = np.concatenate(labels)
        self.name = f"{self.path} [{split}]"
        self._open()

    def _open(self) -> None:
        self._handles = [open(file, "rb", buffering=0) for file in self.files]  # for pread; closed with self

    def _read_into(self, k: int, part: memoryview, offset: int) -> None:
        """Fill `part` with the bytes of file k from `offset` (positional reads: no shared file position, so
        threads may read at once)."""
        if not hasattr(os, "pread"):  # Windows: a handle of its own for this read
            with open(self.files[k], "rb") as f:
                f.seek(offset)
                got = f.readinto(part)
            if got != len(part):
                raise OSError(f"{self.files[k]}: short read; the file changed on disk")
            return
        pread_into(self._handles[k].fileno(), part, offset, self.files[k])

    def _read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Images [n, 64, 64, 3] of global rows `rows`, one positional read per run of consecutive rows."""
        raw = np.empty((len(rows), ROW_BYTES), np.uint8)
        if len(rows):
            file_of = np.searchsorted(self._starts, rows, side="right") - 1
            local = rows - self._starts[file_of]
            breaks = (np.flatnonzero((np.diff(rows) != 1) | (np.diff(file_of) != 0)) + 1).tolist()
            buf = memoryview(raw).cast("B")
            for start, end in zip([0, *breaks], [*breaks, len(rows)]):
                k = int(file_of[start])
                offset = self._offsets[k] + int(local[start]) * ROW_BYTES
                self._read_into(k, buf[start * ROW_BYTES : end * ROW_BYTES], offset)
        # A row holds the R, G and B planes (CHW); the pipeline's images are HWC.
        return np.ascontiguousarray(raw.reshape(len(rows), 3, 64, 64).transpose(0, 2, 3, 1))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index) -> tuple[np.ndarray, np.int32]:
        i = check_index(index, len(self))
        return self._read_rows(np.array([i], np.int64))[0], self.labels[i]

    def read(self, indices) -> tuple[np.ndarray, np.ndarray]:
        labels = self.labels[indices]  # numpy checks the indices' type and range here
        rows = np.asarray(indices, np.int64) % len(self)  # negative indices count from the end
        return self._read_rows(rows), labels

    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_handles"]  # open files do not pickle; each process opens its own
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()

    def __repr__(self) -> str:
        return f"Imagenet64Source({self.name!r}, {len(self)} images, {len(self.files)} files)"


def load_imagenet64(path, split: str, num_classes: int = 1000, image_shape=IMAGENET64_SHAPE):
    """The official ImageNet 64x64 files of `split`, read in place.

    Args:
      path: a folder holding the official files as uncompressed ``.npz`` (``train_data_batch_<k>.npz``,
        ``val_data.npz``), directly or in its immediate subfolders (e.g. ``Imagenet64_train_part1/``,
        ``Imagenet64_train_part2/``, ``Imagenet64_val/``).
      split: "train" (``train_data_batch_1..K`` in order, K = 10 in the official set; 1..K must have no
        gap) or "test" (``val_data``; "val" is accepted too).
      num_classes: labels must lie in 1..num_classes in the files (1000 for ImageNet).
      image_shape: the dataset's (H, W, C); must be (64, 64, 3).

    Returns:
      An `Imagenet64Source`. Pickled or compressed files raise a DataError naming `convert_imagenet64`'s
      command; so does every other bad input, naming the file and the fix.
    """
    return Imagenet64Source(path, split, num_classes, image_shape)
