"""Diffusion-generated images in an EDM ``.npz`` (``image`` uint8 [N, H, W, C], ``label`` [N]), read in place.

Moved from certjax/data/sources.py ("generated .npz"). The generated sets of the seed paper (1M/5M/10M
images, 3-30 GB) do not fit in memory: the ``image`` member is used in place where the zip stores it
uncompressed (``np.savez``), or extracted once, atomically, to a ``.npy`` when compressed
(``np.savez_compressed``: one printed line says what, how large and where; config ``data.cache_dir``
chooses the folder). Batches are read with positional reads (shared/DESIGN.md, "Data flow" 1).
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import struct
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np

from certjax.data.sources.arrays import subset_indices
from certjax.data.sources.base import (
    DataError,
    check_image_layout,
    check_index,
    check_labels,
    check_num_classes,
    pread_into,
)
from certjax.data.sources.registry import IMAGE_SHAPE
from certjax.outputs import publish_mode

_COPY_CHUNK = 16 << 20


def _npy_data_location(f, where, image_shape) -> tuple[int, int]:
    """Parse the .npy header at f's position: (bytes of header, number of images of image_shape)."""
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
    check_image_layout(dtype, shape, where, image_shape, what="'image'")
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


def user_cache_dir() -> Path:
    """certjax's folder in the user's cache: $CERTJAX_CACHE, else $XDG_CACHE_HOME/certjax, else
    ~/.cache/certjax."""
    if os.environ.get("CERTJAX_CACHE"):
        return Path(os.environ["CERTJAX_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "certjax"


def extraction_path(npz: Path, cache_dir: str = "") -> Path:
    """Where a compressed ``image`` member is extracted: ``<file>.image.npy`` beside the .npz when
    ``cache_dir`` is empty and that folder is writable; else ``<name>-<hash of the path>.image.npy`` in
    ``cache_dir`` (config ``data.cache_dir``) or, when that is empty, in the user's cache folder."""
    if not cache_dir and os.access(npz.parent, os.W_OK):
        return npz.with_name(npz.name + ".image.npy")
    folder = Path(cache_dir).expanduser() if cache_dir else user_cache_dir()
    key = hashlib.sha1(str(npz.resolve()).encode()).hexdigest()[:16]
    return folder / f"{npz.stem}-{key}.image.npy"


def human_bytes(count: int) -> str:
    """1234567 -> '1.2 MB' (powers of 1000, as disk sizes are sold and `df -H` shows them)."""
    for unit, name in ((10**12, "TB"), (10**9, "GB"), (10**6, "MB"), (10**3, "kB")):
        if count >= unit:
            return f"{count / unit:.1f} {name}"
    return f"{count} B"


def _make_room(npz: Path, target: Path, size: int) -> None:
    """The target's folder exists and has `size` bytes free, or a DataError naming the fix."""
    fix = (
        "set --config.data.cache_dir to a folder with room, or save the .npz uncompressed (np.savez: read "
        "in place, nothing extracted)"
    )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(target.parent).free
    except OSError as e:
        raise DataError(f"{npz}: cannot extract image.npy to {target.parent} ({e}); {fix}") from e
    if free < size:
        raise DataError(
            f"{npz}: image.npy is compressed and must be extracted once ({human_bytes(size)}), but "
            f"{target.parent} has {human_bytes(free)} free; free space there, or {fix}"
        )


def _extract_once(zf: zipfile.ZipFile, info: zipfile.ZipInfo, npz: Path, cache_dir: str = "") -> Path:
    target = extraction_path(npz, cache_dir)
    st = target.stat() if target.exists() else None
    # Complete by construction (atomic rename); stale if the .npz changed after the extraction.
    if st and st.st_size == info.file_size and st.st_mtime >= npz.stat().st_mtime:
        return target
    _make_room(npz, target, info.file_size)
    from certjax.writers import console  # imports jax: only when there is something to say

    # One line: the README promises the .npz is read in place, and this is the exception (time and disk).
    console(
        f"{npz}: image.npy is compressed (np.savez_compressed); extracting it once "
        f"({human_bytes(info.file_size)}) to {target}"
    )
    # Write to a unique temp name and rename: a killed process (or a second one extracting at the
    # same time) never leaves a partial file under the final name.
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".tmp")
        with zf.open(info) as src, os.fdopen(fd, "wb") as dst:
            shutil.copyfileobj(src, dst, _COPY_CHUNK)  # zipfile checks the CRC at the end
            dst.flush()
            os.fsync(dst.fileno())
        publish_mode(tmp)  # mkstemp's 0600: the umask's mode, as any file the user makes
        os.replace(tmp, target)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):  # disk full, no permission: not the .npz's fault
            raise DataError(f"{npz}: cannot extract image.npy to {target} ({e})") from e
        raise
    return target


class GeneratedNpzSource:
    """Generated images from an ``.npz`` with ``image`` uint8 [N, *image_shape] and ``label`` [N].

    ``image`` is never read whole (files reach 30 GB): an uncompressed member (``np.savez``) is
    used where it lies in the .npz; a compressed one (``np.savez_compressed``) is extracted once, with
    one printed line, to ``<file>.image.npy`` or into ``cache_dir`` (``extraction_path``). Batches are
    read with positional reads (see ``_read_rows``); the file is also memory-mapped as ``file_images``.
    ``limit`` keeps a fixed random subset of that many images (sorted, chosen by ``seed``), as in "1M
    subsampled from 5M".

    Args: ``image_shape`` is the dataset's (H, W, C) (CIFAR's by default): the file must hold images of
    that shape, so that generated and real images can share a batch. ``cache_dir`` (config
    ``data.cache_dir``): where a compressed ``image`` is extracted; "" = beside the file when that folder
    is writable, else the user's cache folder (``user_cache_dir``).

    Attributes: ``file_images`` (np.memmap over all images in the file), ``rows`` (file rows used,
    None for all), ``labels`` (int32 per element of this source), ``image_shape``.
    """

    def __init__(
        self,
        path,
        num_classes: int,
        limit: int | None = None,
        seed: int = 0,
        image_shape=IMAGE_SHAPE,
        cache_dir: str = "",
    ):
        self.path = Path(path).expanduser()
        self.num_classes = check_num_classes(num_classes, self.path)
        self.image_shape = tuple(image_shape)
        self._row_bytes = math.prod(self.image_shape)
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
                        header, n = _npy_data_location(f, where, self.image_shape)
                        self._offset = f.tell()
                    if info.file_size != header + n * self._row_bytes:
                        raise DataError(f"{where}: image.npy size disagrees with its header")
                else:
                    self._file = _extract_once(zf, info, self.path, cache_dir)
                    with open(self._file, "rb") as f:
                        _, n = _npy_data_location(f, f"{where} (extracted {self._file})", self.image_shape)
                        self._offset = f.tell()
        except DataError:
            raise
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, zlib.error) as e:
            raise DataError(
                f"{where}: not a readable .npz ({type(e).__name__}: {e}); it is truncated or "
                "corrupt, write or copy it again"
            ) from e
        if os.path.getsize(self._file) < self._offset + n * self._row_bytes:
            raise DataError(f"{where}: truncated: the file ends before its {n} images do")
        self._num_file_images = n
        labels = check_labels(labels, n, self.num_classes, where)
        if limit is not None and not 0 < limit <= n:
            raise DataError(f"{where}: limit must be in [1, {n}] (images in the file), got {limit}")
        self.rows = None if limit is None else subset_indices(n, limit, "random", seed)
        self.labels = labels if self.rows is None else labels[self.rows]
        subset = "" if limit is None else f" [random {limit} of {n}, seed {seed}]"
        self.name = f"{self.path}{subset}"
        self._map()

    def _map(self) -> None:
        self.file_images = np.memmap(
            self._file, np.uint8, "r", self._offset, (self._num_file_images, *self.image_shape)
        )
        self._fh = open(self._file, "rb", buffering=0)  # for pread; closed with self

    def _read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Copy file rows into a new array with positional reads, one per run of consecutive rows.

        Not through ``file_images``: pages read through a map stay mapped and count in the RSS until
        the kernel wants them back, and with large page-cache folios (Linux 6.x) one 3 KB image maps
        up to ~1 MB, so a random batch of 1024 showed 1.3 GB of RSS (schedulers kill jobs on RSS).
        pread keeps RSS to the batch, is thread-safe and fast (0.6M random, 8M sequential img/s).
        """
        out = np.empty((len(rows), *self.image_shape), np.uint8)
        if not len(rows):
            return out
        if not hasattr(os, "pread"):  # Windows: gather through the map
            out[:] = self.file_images[rows]
            return out
        buf, fd = memoryview(out).cast("B"), self._fh.fileno()
        breaks = (np.flatnonzero(np.diff(rows) != 1) + 1).tolist()
        for start, end in zip([0, *breaks], [*breaks, len(rows)], strict=True):
            part = buf[start * self._row_bytes : end * self._row_bytes]
            pread_into(fd, part, self._offset + int(rows[start]) * self._row_bytes, self._file)
        return out

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index) -> tuple[np.ndarray, np.int32]:
        i = check_index(index, len(self))
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
