"""Convert the official ImageNet 64x64 batch files once into uncompressed ``.npz`` files that
`certjax.data.sources.imagenet64.load_imagenet64` reads in place:

    python -m certjax.data.sources.imagenet64_convert SRC DST

The official downloads are pickled dicts (Chrabaszcz et al. 2017, arXiv:1707.08819; written by
PatrykChrabaszcz/Imagenet32_Scripts), or ``np.savez_compressed`` files in the ``*_npz.zip`` variants: neither
can be read in place, so certjax refuses them and names this command. It writes one ``<name>.npz`` (``data``,
``labels``, ``mean`` as stored) per batch file, one file at a time.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np

from certjax.data.sources.base import DataError
from certjax.data.sources.imagenet64 import (
    CONVERT_COMMAND,
    check_rows,
    file_kind,
    find_batch_files,
    train_number,
)
from certjax.data.sources.npz import human_bytes
from certjax.outputs import publish_mode


def _field(batch, key, where):
    if not isinstance(batch, dict):
        raise DataError(f"{where}: holds a {type(batch).__name__}, expected a dict; not an ImageNet64 batch")
    for k in (key, key.encode()):  # Python 2 pickles read with encoding="bytes" have bytes keys
        if k in batch:
            return batch[k]
    raise DataError(
        f"{where}: no '{key}' entry (entries: {sorted(map(str, batch))}); not an ImageNet64 batch"
    )


def _load_whole(file: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(data, labels, mean or None) of one batch file, pickle or .npz, checked and held in memory."""
    if file_kind(file) == "npz":
        try:
            with np.load(file, allow_pickle=False) as npz:
                if "data" not in npz or "labels" not in npz:
                    raise DataError(
                        f"{file}: arrays {sorted(npz.files)}; official files hold 'data' and 'labels'"
                    )
                mean = npz["mean"] if "mean" in npz else None
                data, labels = npz["data"], npz["labels"]
        except DataError:
            raise
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, zlib.error) as e:
            raise DataError(f"{file}: not a readable .npz ({type(e).__name__}: {e}); copy it again") from e
    else:
        try:
            with open(file, "rb") as f:
                # latin1 reads the numpy arrays of Python 2 pickles too; Python 3 pickles ignore it.
                batch = pickle.load(f, encoding="latin1")
        except Exception as e:  # unpickling damaged bytes can raise anything
            raise DataError(
                f"{file}: not a readable pickle ({type(e).__name__}: {e}); it is truncated or corrupt, "
                "download it again"
            ) from e
        data, labels = np.asarray(_field(batch, "data", file)), np.asarray(_field(batch, "labels", file))
        mean = next((np.asarray(batch[k]) for k in ("mean", b"mean") if k in batch), None)  # val has none
    check_rows(data.dtype, data.shape, file)
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{file}: {len(data)} images but labels are {labels.dtype} {labels.shape}; expected {len(data)} "
            "integers (the file is damaged or not official: copy it again)"
        )
    return data, labels, mean


def _write_npz(target: Path, arrays: dict) -> None:
    """np.savez (uncompressed: readable in place) to `target`, whole or not at all."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        publish_mode(tmp)  # mkstemp's 0600: the umask's mode, as any file the user makes
        os.replace(tmp, target)  # a killed conversion never leaves a partial file under the final name
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise DataError(f"{target}: cannot write ({e})") from e
        raise


def convert_imagenet64(src_folder, dst_folder, log=print) -> list[Path]:
    """Write every official batch file under `src_folder` as an uncompressed ``.npz`` in `dst_folder`.

    The files are found as `load_imagenet64` finds them (the folder and its immediate subfolders) and
    written as ``dst_folder/<name>.npz`` with ``data``, ``labels`` (as stored: 1-based) and ``mean`` (when
    present), so that `load_imagenet64(dst_folder, ...)` reads them in place. One file at a time: a pickled
    train batch (~1.6 GB) must be loaded whole, is written, and freed before the next.

    Unpickling runs code named in the file (as numpy's ``allow_pickle=True`` does): convert only the
    official files, or files you made. Compressed ``.npz`` files are read without pickle.

    Args:
      src_folder: the folder holding the pickled (or compressed ``.npz``) files, or their parent.
      dst_folder: where the ``.npz`` files go (created if missing; may be `src_folder` itself).
      log: called with one line per file written.

    Returns:
      The paths written, train batches (in number order) first, then val_data.
    """
    src, dst = Path(src_folder).expanduser(), Path(dst_folder).expanduser()
    found = find_batch_files(src)
    if not found:
        raise DataError(
            f"{src}: no official ImageNet64 files (train_data_batch_<k>, val_data) here or in its subfolders"
        )
    try:
        dst.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{dst}: cannot create the output folder ({e})") from e
    order = sorted(found, key=lambda name: train_number(name) if name.startswith("train_") else math.inf)
    written = []
    for name in order:
        data, labels, mean = _load_whole(found[name])
        target = dst / f"{name}.npz"
        arrays = {"data": data, "labels": labels, **({} if mean is None else {"mean": mean})}
        _write_npz(target, arrays)
        count = len(data)
        del data, labels, mean, arrays  # free this batch before loading the next
        log(f"{target}: {count} images ({human_bytes(target.stat().st_size)})")
        written.append(target)
    return written


def main(argv=None) -> int:
    """``python -m certjax.data.sources.imagenet64_convert SRC DST``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog=CONVERT_COMMAND,
        description="ImageNet 64x64 pickled or compressed batch files -> uncompressed .npz, read in place. "
        "Unpickling runs code named in the file: convert only the official files.",
    )
    convert = parser
    convert.add_argument("src", help="folder of the official files (or the parent of their part folders)")
    convert.add_argument("dst", help="folder for the .npz files; point certjax at it")
    args = parser.parse_args(argv)
    try:
        convert_imagenet64(args.src, args.dst)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
