"""Image folders and zips of class folders: ``[<split>/]<class>/<file>.jpg|png``, decoded once into memory.

Moved from certjax/data/sources.py ("image folder"). The layout is that of the CIFAR image zips and of the
demo data shipped in certjax/data/demo; `IMAGE_SUFFIXES` and `is_junk` are public because
certjax.data.user_images reads users' folders by the same rules.
"""

from __future__ import annotations

import io
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from certjax.data.labels import folder_labels
from certjax.data.sources.arrays import ArraySource
from certjax.data.sources.base import DataError, check_num_classes
from certjax.data.sources.registry import IMAGE_SHAPE

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def is_junk(parts: list[str]) -> bool:
    """Whether a path (split into its parts) is no image of the dataset: macOS archives carry __MACOSX/ and
    ._* shadows, editors leave dot files."""
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _group_by_class(names: list[str], split: str, where: str) -> dict[str, list[str]]:
    """{class folder: sorted member names} for the layout ``[<split>/]<class>/<file>``."""
    parts = [n.split("/") for n in names]
    parts = [p for p in parts if not is_junk(p)]
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
        if len(p) == 2 and p[1].lower().endswith(IMAGE_SUFFIXES):
            by_class.setdefault(p[0], []).append(prefix + "/".join(p))
    if not by_class:
        raise DataError(
            f"{where}: no class folders with images found; expected [<split>/]<class>/<image> "
            f"(top-level entries: {top[:12] or sorted({p[0] for p in parts})[:12]})"
        )
    return {c: sorted(files) for c, files in by_class.items()}


def _class_labels(classes, num_classes, class_names, labels, where) -> dict[str, int]:
    if len(classes) != num_classes:
        shown = sorted(classes)[:12]
        more = ", ..." if len(classes) > 12 else ""
        raise DataError(
            f"{where}: found {len(classes)} class folders ({', '.join(shown)}{more}) but the "
            f"dataset has {num_classes} classes; check the path and the dataset (cifar10/cifar100)"
        )
    return folder_labels(classes, class_names, num_classes, labels, where)


def _decode_image(data: bytes, where: str, image_shape) -> np.ndarray:
    from PIL import Image  # imported here: only image folders need it

    height, width = image_shape[:2]
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.size != (width, height):
                raise DataError(
                    f"{where}: image is {im.size[0]}x{im.size[1]}, expected {width}x{height}; resize the "
                    "images to the dataset's size first"
                )
            return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{where}: cannot decode the image ({e}); the file is corrupt") from e


def _list_members(path: Path):
    """(member names, read(name) -> bytes, {name: position in the file}, the open ZipFile or None)."""
    if path.is_dir():
        names = []
        for dirpath, dirnames, filenames in os.walk(path):
            rel = Path(dirpath).relative_to(path).parts
            if len(rel) >= 2:  # [<split>/]<class>/ is as deep as the layout goes
                dirnames[:] = []
            names += ["/".join((*rel, f)) for f in filenames]
        return names, lambda name: (path / name).read_bytes(), {}, None
    if path.is_file():
        zf = zipfile.ZipFile(path)
        infos = [i for i in zf.infolist() if not i.is_dir()]
        return [i.filename for i in infos], zf.read, {i.filename: i.header_offset for i in infos}, zf
    raise DataError(f"{path}: no such file or directory (expected a folder or a .zip)")


def load_image_folder(
    path, split: str, num_classes: int, image_shape=IMAGE_SHAPE, class_names=None, labels: str = "names"
) -> ArraySource:
    """Decode every image of ``[<split>/]<class>/<file>`` in a folder or zip into memory, once.

    Zips are read member by member with ``zipfile`` (no unpacking to disk), in the order they lie
    in the file. Labels are the dataset's for folders named by its class names, else as `labels` says
    (certjax/data/labels.py: never guessed); images within a class follow sorted file names (folders in
    label order): the same result on every machine.

    Args:
      path: the folder or .zip. split: "train" or "test" (a ``<split>/`` folder, if the layout has one).
      num_classes: class folders expected. image_shape: (H, W, C) of every image (the dataset's).
      class_names: the dataset's class names in label order (None: it declares none).
      labels: "names", "sorted" or a JSON mapping file (certjax/data/labels.py).

    Returns:
      An ArraySource named ``"<path> [<split>]"``.
    """
    path = Path(path).expanduser()
    num_classes = check_num_classes(num_classes, path)
    zf = None
    try:
        names, read, position, zf = _list_members(path)
        by_class = _group_by_class(names, split, str(path))
        label_of = _class_labels(by_class, num_classes, class_names, labels, str(path))
        order = sorted(by_class, key=lambda c: (label_of[c], c))
        members = [(label_of[c], n) for c in order for n in by_class[c]]
        images = np.empty((len(members), *image_shape), np.uint8)
        labels = np.array([label for label, _ in members], np.int32)
        # Reading in file order keeps the zip read sequential; each image goes to its sorted slot.
        for k in sorted(range(len(members)), key=lambda k: position.get(members[k][1], k)):
            name = members[k][1]
            try:
                data = read(name)
            except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as e:
                raise DataError(f"{path}: cannot read {name} ({e}); the file is corrupt") from e
            images[k] = _decode_image(data, f"{path}: {name}", image_shape)
    except zipfile.BadZipFile as e:
        raise DataError(
            f"{path}: not a readable zip file ({e}); it is truncated or corrupt, copy it again"
        ) from e
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    finally:
        if zf is not None:
            zf.close()
    return ArraySource(images, labels, num_classes, name=f"{path} [{split}]", image_shape=image_shape)
