"""Tiny-ImageNet-200 as it is distributed (``tiny-imagenet-200.zip`` or its unpacked folder), read lazily.

The layout (cs231n.stanford.edu's zip; shared/RECIPES.md, "64x64 datasets"): ``wnids.txt`` (the 200
WordNet ids), ``train/<wnid>/images/<wnid>_<k>.JPEG`` (500 a class), ``val/images/val_<k>.JPEG`` labelled by
``val/val_annotations.txt`` (tab-separated: file, wnid, four box numbers) and an unlabelled ``test/``.

- Labels: the rank of the wnid in sorted order, as every original does (BRONet tools/dataset/tinyimgnet.py
  sorts wnids.txt; LiResNet's parse_tinyimgnet.py and torchvision's ImageFolder sort the train folders).
- Splits: certjax's "train" is ``train/``; "test" is the labelled ``val/`` split, which every original
  evaluates on (``test/`` has no labels). Train images follow (label, file name); val images the order of
  the annotation file (as LiResNet's ``tiny200.npz`` packs them).
- Images: 64x64 JPEG, a few greyscale: decoded to RGB. They are decoded when read, never all at once: the
  source holds the member names and labels only, so it pickles cheaply to grain's workers. Every image's
  size is checked from its header when the source is made, so a wrong image fails before training.
"""

from __future__ import annotations

import io
import threading
import zipfile
import zlib
from pathlib import Path

import numpy as np

from certjax.data.sources.base import DataError, check_index, check_num_classes

TINY_SHAPE = (64, 64, 3)
_SPLIT_FOLDERS = {"train": "train", "test": "val", "val": "val"}
_FIX_LAYOUT = "pass the tiny-imagenet-200 folder or zip as distributed (wnids.txt, train/, val/)"


def _decode(data: bytes, where: str, image_shape, header_only: bool = False) -> np.ndarray | None:
    from PIL import Image  # imported here: only image files need it

    height, width = image_shape[:2]
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.size != (width, height):
                raise DataError(
                    f"{where}: image is {im.size[0]}x{im.size[1]}, expected {width}x{height}; the "
                    "Tiny-ImageNet files are 64x64, replace this one with the original"
                )
            if header_only:
                return None
            return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))  # greyscale -> RGB
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{where}: cannot decode the image ({e}); the file is corrupt") from e


class _Files:
    """Bytes of the dataset's files by their path below the root, from a folder or a zip.

    A zip stays open for the life of the process (one ZipFile per process: `__getstate__` drops it and the
    next read reopens it); `zipfile` serialises its reads of the shared file, and the lock below guards the
    lazy open, so reader threads may share one.
    """

    def __init__(self, path: Path):
        self.path = path
        self._zip = None
        self._lock = threading.Lock()
        if path.is_dir():
            root = path if (path / "wnids.txt").is_file() else path / "tiny-imagenet-200"
            self.prefix = str(root.relative_to(path)) + "/" if root != path else ""
            self.names = None
        elif path.is_file():
            names = [i.filename for i in self._open().infolist() if not i.is_dir()]
            tops = [n.removesuffix("wnids.txt") for n in names if n.endswith("wnids.txt")]
            self.prefix = min(tops, key=len) if tops else ""  # "tiny-imagenet-200/" in the official zip
            self.names = names
        else:
            raise DataError(f"{path}: no such file or directory; {_FIX_LAYOUT}")

    def _open(self) -> zipfile.ZipFile:
        with self._lock:
            if self._zip is None:
                self._zip = zipfile.ZipFile(self.path)
            return self._zip

    def exists(self, name: str) -> bool:
        if self.names is None:
            return (self.path / self.prefix / name).is_file()
        return self.prefix + name in set(self.names)

    def listing(self, folder: str) -> list[str]:
        """Paths below the root of the files under `folder` (recursively), sorted."""
        if self.names is None:
            base = self.path / self.prefix
            return sorted(str(p.relative_to(base)) for p in (base / folder).rglob("*") if p.is_file())
        start = self.prefix + folder.rstrip("/") + "/"
        return sorted(n[len(self.prefix) :] for n in self.names if n.startswith(start))

    def read(self, name: str) -> bytes:
        try:
            if self.names is None:
                return (self.path / self.prefix / name).read_bytes()
            return self._open().read(self.prefix + name)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error, KeyError) as e:
            raise DataError(f"{self.path}: cannot read {name} ({e}); the file is corrupt") from e

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_zip"], state["_lock"] = None, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


def _wnids(files: _Files, num_classes: int) -> list[str]:
    if not files.exists("wnids.txt"):
        raise DataError(f"{files.path}: no wnids.txt; {_FIX_LAYOUT}")
    wnids = files.read("wnids.txt").decode("utf-8", "replace").split()
    if len(set(wnids)) != len(wnids) or len(wnids) != num_classes:
        raise DataError(
            f"{files.path}: wnids.txt lists {len(wnids)} ids ({len(set(wnids))} distinct), expected "
            f"{num_classes} distinct; the file is damaged or this is not Tiny-ImageNet-200"
        )
    return sorted(wnids)  # label = rank of the wnid in sorted order


def _train_members(files: _Files, wnids: list[str]) -> tuple[list[str], list[int]]:
    by_class: dict[str, list[str]] = {}
    for name in files.listing("train"):
        parts = name.split("/")  # train/<wnid>/images/<file>
        if len(parts) == 4 and parts[2] == "images" and parts[3].lower().endswith((".jpeg", ".jpg")):
            by_class.setdefault(parts[1], []).append(name)
    unknown = sorted(set(by_class) - set(wnids))
    if unknown:
        raise DataError(
            f"{files.path}: train/ has folders not in wnids.txt ({', '.join(unknown[:5])}); {_FIX_LAYOUT}"
        )
    missing = [w for w in wnids if w not in by_class]
    if missing:
        raise DataError(
            f"{files.path}: train/ has no images for {len(missing)} of the {len(wnids)} classes "
            f"(e.g. {', '.join(missing[:5])}); the copy is incomplete, {_FIX_LAYOUT}"
        )
    members = [(label, name) for label, w in enumerate(wnids) for name in by_class[w]]
    return [n for _, n in members], [label for label, _ in members]


def _val_members(files: _Files, wnids: list[str]) -> tuple[list[str], list[int]]:
    where = f"{files.path}: val/val_annotations.txt"
    if not files.exists("val/val_annotations.txt"):
        raise DataError(f"{where} is missing: the val images have no labels without it; {_FIX_LAYOUT}")
    label_of = {w: k for k, w in enumerate(wnids)}
    images = {n.split("/")[-1]: n for n in files.listing("val/images")}
    names, labels = [], []
    for number, line in enumerate(
        files.read("val/val_annotations.txt").decode("utf-8", "replace").splitlines()
    ):
        fields = line.split("\t")
        if not line.strip():
            continue
        if len(fields) < 2:
            raise DataError(f"{where}, line {number + 1}: expected 'file<TAB>wnid<TAB>boxes', got {line!r}")
        file, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in label_of:
            raise DataError(f"{where}, line {number + 1}: wnid {wnid!r} is not in wnids.txt")
        if file not in images:
            raise DataError(
                f"{where}, line {number + 1}: {file} is not in val/images; the copy is incomplete"
            )
        names.append(images.pop(file))
        labels.append(label_of[wnid])
    if images:
        raise DataError(
            f"{where}: {len(images)} images of val/images have no annotation (e.g. {sorted(images)[0]}); "
            "the annotation file does not belong to these images"
        )
    if not names:
        raise DataError(f"{where}: no annotations; {_FIX_LAYOUT}")
    return names, labels


class TinyImageNetSource:
    """One split of Tiny-ImageNet-200, decoded on read (see the module docstring).

    Attributes: ``num_classes``, ``name`` (``"<path> [<split>]"``), ``image_shape``, ``labels`` (int32 per
    image), ``wnids`` (sorted: ``wnids[label]`` is the class of a label), ``members`` (file of each image).
    """

    def __init__(self, path, split: str, num_classes: int = 200, image_shape=TINY_SHAPE):
        self.path = Path(path).expanduser()
        self.num_classes = check_num_classes(num_classes, self.path)
        self.image_shape = tuple(image_shape)
        if self.image_shape[2] != 3:
            raise DataError(f"{self.path}: Tiny-ImageNet images are RGB, not {self.image_shape}")
        if split not in _SPLIT_FOLDERS:
            raise DataError(f"{self.path}: split {split!r}; Tiny-ImageNet has 'train' and 'test' (its val/)")
        try:
            self._files = _Files(self.path)
            self.wnids = _wnids(self._files, self.num_classes)
            folder = _SPLIT_FOLDERS[split]
            read_split = _train_members if folder == "train" else _val_members
            self.members, labels = read_split(self._files, self.wnids)
        except zipfile.BadZipFile as e:
            raise DataError(f"{self.path}: not a readable zip file ({e}); it is truncated or corrupt") from e
        self.labels = np.asarray(labels, np.int32)
        self.name = f"{self.path} [{split}]"
        for name in self.members:  # headers only: a wrong size fails here, not in the middle of training
            _decode(self._files.read(name), f"{self.path}: {name}", self.image_shape, header_only=True)

    def __len__(self) -> int:
        return len(self.members)

    def __getitem__(self, index) -> tuple[np.ndarray, np.int32]:
        i = check_index(index, len(self))
        name = self.members[i]
        return _decode(self._files.read(name), f"{self.path}: {name}", self.image_shape), self.labels[i]

    def read(self, indices) -> tuple[np.ndarray, np.ndarray]:
        labels = self.labels[indices]  # numpy checks the indices' type and range here
        idx = np.asarray(indices, np.int64) % len(self)
        images = np.empty((len(idx), *self.image_shape), np.uint8)
        for k, i in enumerate(idx.tolist()):
            name = self.members[i]
            images[k] = _decode(self._files.read(name), f"{self.path}: {name}", self.image_shape)
        return images, labels

    def __repr__(self) -> str:
        return f"TinyImageNetSource({self.name!r}, {len(self)} images)"


def is_tiny_imagenet(path) -> bool:
    """Whether a folder or zip has Tiny-ImageNet's layout (a wnids.txt at its root or one folder down)."""
    path = Path(path).expanduser()
    if path.is_dir():
        return (path / "wnids.txt").is_file() or (path / "tiny-imagenet-200" / "wnids.txt").is_file()
    if path.suffix == ".zip" and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            return any(
                n == "wnids.txt" or n.count("/") == 1 and n.endswith("/wnids.txt") for n in zf.namelist()
            )
    return False
