"""Random-access data sources: real CIFAR-10/100 and diffusion-generated images.

Every source maps an index to ``(image uint8 [32, 32, 3], label int32 scalar)`` and has
``__len__``, ``num_classes``, ``name`` and a batched ``read(indices) -> (images [n, 32, 32, 3],
labels int32 [n])`` that the pipeline uses instead of n single reads. Sources are handed to
``grain.MapDataset.source``: reads are thread-safe (no shared file offsets) and every source
pickles cheaply enough to go to worker processes.

- ``ArraySource``: in-memory arrays (what the real-data loaders below return).
- ``load_image_folder``: a folder or ``.zip`` of ``[<split>/]<class>/<file>.jpg|png``, in place.
- ``load_cifar_archive``: the official ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``.
- ``GeneratedNpzSource``: EDM ``.npz`` (``image``, ``label``), mapped in place, never read whole.
- ``tfds_source``: tensorflow-datasets (needs internet the first time).
- ``SubsetSource``, ``subset_indices``, ``complement_indices``: deterministic subsets.
- ``make_real_source``: the one entry point the trainer calls, from a config string.

Every bad input raises one ``DataError`` at construction, naming the file, the problem and the fix.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import logging
import operator
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Protocol

import numpy as np

IMAGE_SHAPE = (32, 32, 3)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
DEMO_DIR = Path(__file__).parent / "demo"
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_COPY_CHUNK = 16 << 20
_ROW_BYTES = 32 * 32 * 3
_log = logging.getLogger(__name__)

OFFLINE_OPTIONS = (
    "Without internet, point the trainer at local data instead:\n"
    "  --config.data.real=/path/to/cifar-10-python.tar.gz  (official python archive;"
    " cifar-100-python.tar.gz for CIFAR-100)\n"
    "  --config.data.real=/path/to/folder_or_zip  (class folders; a {split} template such as"
    " ../shared/data/cifar10-jpeg-{split}.zip picks the train/test file)\n"
    "  --config.data.real=demo  (5,000 real CIFAR-10 images shipped with certjax, for smoke tests)"
)


class DataError(ValueError):
    """A data input is missing or malformed; the message names the file, the problem and the fix."""


class Source(Protocol):
    """What the pipeline needs from a source (for type hints; sources do not inherit from it)."""

    num_classes: int
    name: str

    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> tuple[np.ndarray, np.int32]: ...
    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


# ------------------------------------------------------------------------------------------- checks


def _check_num_classes(num_classes, where) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer):
        raise DataError(f"{where}: num_classes must be an int, got {num_classes!r}")
    if num_classes < 1:
        raise DataError(f"{where}: num_classes must be >= 1, got {num_classes}")
    return int(num_classes)


def _check_image_layout(dtype, shape, where, what="images") -> None:
    if dtype != np.uint8:
        raise DataError(f"{where}: {what} have dtype {dtype}, expected uint8 (pixels 0..255)")
    if len(shape) != 4 or tuple(shape[1:]) != IMAGE_SHAPE:
        raise DataError(f"{where}: {what} have shape {tuple(shape)}, expected [N, 32, 32, 3]")
    if shape[0] == 0:
        raise DataError(f"{where}: {what} are empty (0 images)")


def _check_labels(labels, n_images, num_classes, where) -> np.ndarray:
    """Labels as int32, checked so that a bad label fails here, not deep inside a jitted step."""
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


def _check_index(index, n) -> int:
    i = operator.index(index)  # grain hands over numpy integers
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"index {index} out of range for a source of {n} elements")
    return i


# ------------------------------------------------------------------------------------- in memory


class ArraySource:
    """Images and labels held in memory (or any array-like with numpy indexing, e.g. a memmap)."""

    def __init__(self, images: np.ndarray, labels, num_classes: int, name: str = "arrays"):
        self.name = str(name)
        self.num_classes = _check_num_classes(num_classes, self.name)
        if not isinstance(images, np.ndarray):
            raise DataError(f"{self.name}: images must be a numpy array, got {type(images)}")
        _check_image_layout(images.dtype, images.shape, self.name)
        self.labels = _check_labels(labels, len(images), self.num_classes, self.name)
        # A read-only view: __getitem__ returns views, and a consumer writing into one must not be
        # able to change the dataset for every later epoch. The caller's array stays writeable.
        self.images = images.view()
        self.images.flags.writeable = False

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index) -> tuple[np.ndarray, np.int32]:
        i = _check_index(index, len(self))
        return self.images[i], self.labels[i]

    def read(self, indices) -> tuple[np.ndarray, np.ndarray]:
        return self.images[indices], self.labels[indices]

    def __repr__(self) -> str:
        return f"ArraySource({self.name!r}, {len(self)} images, {self.num_classes} classes)"


# ---------------------------------------------------------------------------------- image folder


def _is_junk(parts: list[str]) -> bool:
    # Archives made on macOS carry __MACOSX/ and ._* shadows; editors leave dot files.
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _group_by_class(names: list[str], split: str, where: str) -> dict[str, list[str]]:
    """{class folder: sorted member names} for the layout ``[<split>/]<class>/<file>``."""
    parts = [n.split("/") for n in names]
    parts = [p for p in parts if not _is_junk(p)]
    top = sorted({p[0] for p in parts if len(p) > 1})
    if split in top:
        parts = [p[1:] for p in parts if p[0] == split and len(p) > 1]
    elif {"train", "test"} & set(top):
        raise DataError(
            f"{where}: has no '{split}/' folder (found {top}); pass the file or folder that holds "
            f"the {split} split"
        )
    by_class: dict[str, list[str]] = {}
    prefix = f"{split}/" if split in top else ""
    for p in parts:
        if len(p) == 2 and p[1].lower().endswith(_IMAGE_SUFFIXES):
            by_class.setdefault(p[0], []).append(prefix + "/".join(p))
    if not by_class:
        raise DataError(
            f"{where}: no class folders with images found; expected [<split>/]<class>/<image> "
            f"(top-level entries: {top[:12] or sorted({p[0] for p in parts})[:12]})"
        )
    return {c: sorted(files) for c, files in by_class.items()}


def _class_order(classes, num_classes, where) -> list[str]:
    if len(classes) != num_classes:
        shown = sorted(classes)[:12]
        more = ", ..." if len(classes) > 12 else ""
        raise DataError(
            f"{where}: found {len(classes)} class folders ({', '.join(shown)}{more}) but the "
            f"dataset has {num_classes} classes; check the path and the dataset (cifar10/cifar100)"
        )
    # CIFAR-10's label order is not alphabetical; CIFAR-100's fine labels are.
    if set(classes) == set(CIFAR10_CLASSES):
        return list(CIFAR10_CLASSES)
    return sorted(classes)


def _decode_image(data: bytes, where: str) -> np.ndarray:
    from PIL import Image  # imported here: only image folders need it

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.size != (32, 32):
                raise DataError(
                    f"{where}: image is {im.size[0]}x{im.size[1]}, expected 32x32; resize the "
                    "images to CIFAR size first"
                )
            return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{where}: cannot decode the image ({e}); the file is corrupt") from e


def load_image_folder(path, split: str, num_classes: int) -> ArraySource:
    """Decode every image of ``[<split>/]<class>/<file>`` in a folder or zip into memory, once.

    Zips are read member by member with ``zipfile`` (no unpacking to disk), in the order they lie
    in the file. Labels follow the class order (CIFAR-10 names: CIFAR-10 order; otherwise sorted
    names), images within a class follow sorted file names: the same result on every machine.
    """
    path = Path(path).expanduser()
    num_classes = _check_num_classes(num_classes, path)
    zf = None
    try:
        if path.is_dir():
            names = []
            for dirpath, dirnames, filenames in os.walk(path):
                rel = Path(dirpath).relative_to(path).parts
                if len(rel) >= 2:  # [<split>/]<class>/ is as deep as the layout goes
                    dirnames[:] = []
                names += ["/".join((*rel, f)) for f in filenames]
            read = lambda name: (path / name).read_bytes()
            position = {}
        elif path.is_file():
            zf = zipfile.ZipFile(path)
            infos = [i for i in zf.infolist() if not i.is_dir()]
            names = [i.filename for i in infos]
            read = zf.read
            position = {i.filename: i.header_offset for i in infos}
        else:
            raise DataError(f"{path}: no such file or directory (expected a folder or a .zip)")
        by_class = _group_by_class(names, split, str(path))
        order = _class_order(by_class, num_classes, str(path))
        members = [(label, n) for label, c in enumerate(order) for n in by_class[c]]
        images = np.empty((len(members), *IMAGE_SHAPE), np.uint8)
        labels = np.array([label for label, _ in members], np.int32)
        # Reading in file order keeps the zip read sequential; each image goes to its sorted slot.
        for k in sorted(range(len(members)), key=lambda k: position.get(members[k][1], k)):
            name = members[k][1]
            try:
                data = read(name)
            except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as e:
                raise DataError(f"{path}: cannot read {name} ({e}); the file is corrupt") from e
            images[k] = _decode_image(data, f"{path}: {name}")
    except zipfile.BadZipFile as e:
        raise DataError(
            f"{path}: not a readable zip file ({e}); it is truncated or corrupt, copy it again"
        ) from e
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    finally:
        if zf is not None:
            zf.close()
    return ArraySource(images, labels, num_classes, name=f"{path} [{split}]")


# ---------------------------------------------------------------------------- official archives

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
    num_classes = _check_num_classes(num_classes, path)
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
                    labels = _check_labels(labels, len(data), num_classes, where)
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
    return ArraySource(images, labels, num_classes, name=f"{path} [{split}]")


# ------------------------------------------------------------------------------- generated .npz


def _npy_data_location(f, where) -> tuple[int, int]:
    """Parse the .npy header at f's position: (bytes of header, number of images)."""
    start = f.tell()
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except ValueError as e:
        raise DataError(f"{where}: image is not a readable .npy array ({e})") from e
    _check_image_layout(dtype, shape, where, what="'image'")
    if fortran:
        raise DataError(f"{where}: 'image' is stored in Fortran order; save a C-order array")
    return f.tell() - start, shape[0]


def _stored_member_data_offset(f, info: zipfile.ZipInfo, where) -> int:
    """Offset in the file where an uncompressed member's bytes begin.

    ``info.header_offset`` (from the central directory, zip64-decoded by zipfile) points to the
    local header; its name and extra lengths can differ from the central directory's (the local
    extra holds the zip64 sizes), so they are read from the local header itself.
    """
    f.seek(info.header_offset)
    local = f.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise DataError(f"{where}: the zip header of image.npy is damaged; the file is corrupt")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _extracted_npy_path(npz: Path) -> Path:
    """``<file>.image.npy`` beside the .npz, or in a cache dir when that folder is not writable."""
    beside = npz.with_name(npz.name + ".image.npy")
    if os.access(npz.parent, os.W_OK):
        return beside
    cache = Path(os.environ.get("CERTJAX_CACHE", "~/.cache/certjax")).expanduser()
    key = hashlib.sha1(str(npz.resolve()).encode()).hexdigest()[:16]
    return cache / f"{npz.stem}-{key}.image.npy"


def _extract_once(zf: zipfile.ZipFile, info: zipfile.ZipInfo, npz: Path) -> Path:
    target = _extracted_npy_path(npz)
    st = target.stat() if target.exists() else None
    # Complete by construction (atomic rename); stale if the .npz changed after the extraction.
    if st and st.st_size == info.file_size and st.st_mtime >= npz.stat().st_mtime:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _log.info("extracting %s:image.npy to %s (once)", npz, target)
    # Write to a unique temp name and rename: a killed process (or a second one extracting at the
    # same time) never leaves a partial file under the final name.
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".tmp")
        with zf.open(info) as src, os.fdopen(fd, "wb") as dst:
            shutil.copyfileobj(src, dst, _COPY_CHUNK)  # zipfile checks the CRC at the end
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, target)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):  # disk full, no permission: not the .npz's fault
            raise DataError(f"{npz}: cannot extract image.npy to {target} ({e})") from e
        raise
    return target


class GeneratedNpzSource:
    """Generated images from an ``.npz`` with ``image`` uint8 [N, 32, 32, 3] and ``label`` [N].

    ``image`` is never read whole (files reach 30 GB): an uncompressed member (``np.savez``) is
    used where it lies in the .npz; a compressed one (``np.savez_compressed``) is extracted once to
    ``<file>.image.npy``. Batches are read with positional reads (see ``_read_rows``); the file is
    also memory-mapped as ``file_images``. ``limit`` keeps a fixed random subset of that many
    images (sorted, chosen by ``seed``), as in "1M subsampled from 5M".

    Attributes: ``file_images`` (np.memmap over all images in the file), ``rows`` (file rows used,
    None for all), ``labels`` (int32 per element of this source).
    """

    def __init__(self, path, num_classes: int, limit: int | None = None, seed: int = 0):
        self.path = Path(path).expanduser()
        self.num_classes = _check_num_classes(num_classes, self.path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: no such file (expected a generated-data .npz)")
        where = str(self.path)
        try:
            with zipfile.ZipFile(self.path) as zf:
                members = {i.filename: i for i in zf.infolist()}
                for key in ("image", "label"):
                    if f"{key}.npy" not in members:
                        keys = sorted(n.removesuffix(".npy") for n in members)
                        raise DataError(f"{where}: no '{key}' array (arrays in the file: {keys})")
                with zf.open("label.npy") as f:
                    labels = np.lib.format.read_array(f, allow_pickle=False)
                info = members["image.npy"]
                if info.flag_bits & 0x1:
                    raise DataError(f"{where}: image.npy is encrypted")
                if info.compress_type == zipfile.ZIP_STORED:
                    self._file = self.path
                    with open(self.path, "rb") as f:
                        f.seek(_stored_member_data_offset(f, info, where))
                        header, n = _npy_data_location(f, where)
                        self._offset = f.tell()
                    if info.file_size != header + n * _ROW_BYTES:
                        raise DataError(f"{where}: image.npy size disagrees with its header")
                else:
                    self._file = _extract_once(zf, info, self.path)
                    with open(self._file, "rb") as f:
                        _, n = _npy_data_location(f, f"{where} (extracted {self._file})")
                        self._offset = f.tell()
        except DataError:
            raise
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, zlib.error) as e:
            raise DataError(
                f"{where}: not a readable .npz ({type(e).__name__}: {e}); it is truncated or "
                "corrupt, write or copy it again"
            ) from e
        if os.path.getsize(self._file) < self._offset + n * _ROW_BYTES:
            raise DataError(f"{where}: truncated: the file ends before its {n} images do")
        self._num_file_images = n
        labels = _check_labels(labels, n, self.num_classes, where)
        if limit is not None and not 0 < limit <= n:
            raise DataError(f"{where}: limit must be in [1, {n}] (images in the file), got {limit}")
        self.rows = None if limit is None else subset_indices(n, limit, "random", seed)
        self.labels = labels if self.rows is None else labels[self.rows]
        subset = "" if limit is None else f" [random {limit} of {n}, seed {seed}]"
        self.name = f"{self.path}{subset}"
        self._map()

    def _map(self) -> None:
        self.file_images = np.memmap(
            self._file, np.uint8, "r", self._offset, (self._num_file_images, *IMAGE_SHAPE)
        )
        self._fh = open(self._file, "rb", buffering=0)  # for pread; closed with self

    def _read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Copy file rows into a new array with positional reads, one per run of consecutive rows.

        Not through ``file_images``: pages read through a map stay mapped and count in the RSS until
        the kernel wants them back, and with large page-cache folios (Linux 6.x) one 3 KB image maps
        up to ~1 MB, so a random batch of 1024 showed 1.3 GB of RSS (schedulers kill jobs on RSS).
        pread keeps RSS to the batch, is thread-safe and fast (0.6M random, 8M sequential img/s).
        """
        out = np.empty((len(rows), *IMAGE_SHAPE), np.uint8)
        if not len(rows):
            return out
        if not hasattr(os, "pread"):  # Windows: gather through the map
            out[:] = self.file_images[rows]
            return out
        buf, fd = memoryview(out).cast("B"), self._fh.fileno()
        breaks = (np.flatnonzero(np.diff(rows) != 1) + 1).tolist()
        for start, end in zip([0, *breaks], [*breaks, len(rows)], strict=True):
            part = buf[start * _ROW_BYTES : end * _ROW_BYTES]
            offset = self._offset + int(rows[start]) * _ROW_BYTES
            while len(part):  # a single read returns at most ~2 GB on Linux
                if hasattr(os, "preadv"):  # straight into the batch, no intermediate bytes
                    got = os.preadv(fd, [part], offset)
                else:
                    data = os.pread(fd, len(part), offset)
                    part[: len(data)], got = data, len(data)
                if got <= 0:
                    raise OSError(f"{self._file}: short read; the file changed on disk")
                part, offset = part[got:], offset + got
        return out

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index) -> tuple[np.ndarray, np.int32]:
        i = _check_index(index, len(self))
        row = i if self.rows is None else self.rows[i]
        return self._read_rows(np.array([row]))[0], self.labels[i]

    def read(self, indices) -> tuple[np.ndarray, np.ndarray]:
        labels = self.labels[indices]  # numpy checks the indices' type and range here
        idx = np.asarray(indices, np.int64) % len(self)  # negative indices count from the end
        return self._read_rows(idx if self.rows is None else self.rows[idx]), labels

    def __getstate__(self):
        state = self.__dict__.copy()
        del state["file_images"], state["_fh"]  # a pickled memmap would copy the whole file
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._map()

    def __repr__(self) -> str:
        return f"GeneratedNpzSource({self.name!r}, {len(self)} images)"


# ---------------------------------------------------------------------------------------- subsets


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
    """The elements ``indices`` of another source, in that order."""

    def __init__(self, source, indices):
        indices = np.asarray(indices)
        if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer) or not len(indices):
            raise DataError(f"{source.name}: subset indices must be a non-empty 1-D integer array")
        if indices.min() < 0 or indices.max() >= len(source):
            raise DataError(f"{source.name}: subset indices must lie in [0, {len(source)})")
        self.source, self.indices = source, indices.astype(np.int64)
        self.num_classes = source.num_classes
        self.name = f"{source.name} [subset of {len(indices)}]"

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index):
        return self.source[self.indices[_check_index(index, len(self))]]

    def read(self, indices):
        return self.source.read(self.indices[indices])

    def __repr__(self) -> str:
        return f"SubsetSource({self.name!r}, {len(self)} images)"


# ------------------------------------------------------------------------------------------- tfds


class TfdsSource:
    """A ``tfds.data_source`` (elements {'image', 'label'}) in this module's interface."""

    def __init__(self, data_source, num_classes: int, name: str):
        self._ds, self.num_classes, self.name = data_source, num_classes, name
        if len(self._ds) == 0:
            raise DataError(f"{name}: tensorflow_datasets returned an empty split")
        image, label = self[0]  # check the element layout now rather than mid-training
        _check_image_layout(image.dtype, (1, *image.shape), name)
        _check_labels(np.array([label]), 1, num_classes, name)

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index):
        element = self._ds[_check_index(index, len(self))]
        return np.asarray(element["image"]), np.int32(element["label"])

    def read(self, indices):
        pairs = [self[int(i)] for i in np.asarray(indices).reshape(-1)]
        images = np.stack([p[0] for p in pairs]) if pairs else np.empty((0, *IMAGE_SHAPE), np.uint8)
        return images, np.array([p[1] for p in pairs], np.int32)

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, {len(self)} images)"


def _num_classes(dataset: str) -> int:
    if dataset not in NUM_CLASSES:
        raise DataError(f"unknown dataset {dataset!r}; valid: {', '.join(NUM_CLASSES)}")
    return NUM_CLASSES[dataset]


# Where tfds fetches CIFAR from (its GCS mirror first, then the dataset's home page).
_DOWNLOAD_HOSTS = (("storage.googleapis.com", 443), ("www.cs.toronto.edu", 443))


def _download_host_reachable(timeout: float = 5.0) -> bool:
    """One TCP connection attempt per host: offline machines answer at once (or time out in seconds),
    instead of the ~205 s of retries tfds spends before it gives up."""
    import socket

    for host, port in _DOWNLOAD_HOSTS:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            return True
        except OSError:
            continue
    return False


def tfds_source(dataset_name: str, split: str, data_dir=None) -> TfdsSource:
    """CIFAR-10/100 from tensorflow-datasets, downloaded and prepared on first use."""
    num_classes = _num_classes(dataset_name)
    where = f"tfds:{dataset_name}[{split}]"
    try:
        import tensorflow_datasets as tfds
    except Exception as e:  # ImportError, or its own imports failing (importlib_resources)
        raise DataError(f"{where}: cannot import tensorflow_datasets ({e}).\n{OFFLINE_OPTIONS}") from e
    try:
        try:
            ds = tfds.data_source(dataset_name, split=split, data_dir=data_dir, download=False)
        except Exception:
            # Not prepared yet. Offline, tfds retries for ~3.5 minutes before failing: fail fast instead.
            if not _download_host_reachable():
                raise DataError(
                    f"{where}: not prepared in the tfds data dir and the download hosts "
                    f"({', '.join(h for h, _ in _DOWNLOAD_HOSTS)}) cannot be reached: no internet?\n"
                    f"{OFFLINE_OPTIONS}"
                ) from None
            _log.warning("%s: not prepared yet, downloading. %s", where, OFFLINE_OPTIONS)
            ds = tfds.data_source(dataset_name, split=split, data_dir=data_dir, download=True)
    except DataError:
        raise
    except Exception as e:  # requests.ConnectionError offline, but tfds raises many types
        reason = f"{type(e).__name__}: {e}"[:400]
        raise DataError(f"{where}: the download failed ({reason}).\n{OFFLINE_OPTIONS}") from e
    return TfdsSource(ds, num_classes, where)


# -------------------------------------------------------------------------------------- entry point


def make_real_source(spec: str, split: str, dataset: str, data_dir=None):
    """The real-data source named by a config string.

    ``spec``: "tfds" (tensorflow-datasets), "demo" (CIFAR-10 images shipped with certjax), or a
    path to an official ``.tar.gz`` archive, a ``.zip`` or a folder; ``{split}`` in a path is
    replaced by the split name (e.g. ``../shared/data/cifar10-jpeg-{split}.zip``).
    """
    num_classes = _num_classes(dataset)
    if spec == "tfds":
        return tfds_source(dataset, split, data_dir)
    if spec == "demo":
        if dataset != "cifar10":
            raise DataError(f"the demo data is CIFAR-10 only, not {dataset}; use tfds or a path")
        if split not in ("train", "test"):
            raise DataError(f"demo data has splits 'train' and 'test', not {split!r}")
        return load_image_folder(DEMO_DIR / f"cifar10-demo-{split}.zip", split, num_classes)
    if not spec:
        raise DataError(f"empty real-data spec.\n{OFFLINE_OPTIONS}")
    spec = os.fspath(spec)
    path = Path(spec.replace("{split}", split)).expanduser()
    if not path.exists():
        template = f" (from {spec!r})" if "{split}" in spec else ""
        raise DataError(f"{path}{template}: no such file or directory")
    if path.name.endswith((".tar.gz", ".tgz")):
        return load_cifar_archive(path, split, num_classes)
    if path.is_dir() or path.suffix == ".zip":
        return load_image_folder(path, split, num_classes)
    raise DataError(
        f"{path}: unknown real-data format; expected an official .tar.gz archive, a .zip or a "
        "folder of class folders (generated .npz data goes in --config.data.generated)"
    )
