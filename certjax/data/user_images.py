"""A user's images for `launch.py --mode=certify`: a folder or zip of image files, an .npz, or one image file.

In a folder or zip, images lying in two or more sub-folders are labelled by their folder (class folders, the
layout of the CIFAR image zips, ``[<split>/]<class>/<file>``, read by the rules of
certjax.data.sources.image_folder): folders named by the dataset's class names get those classes' labels, any
other folders only as `labels` says ("sorted" or a mapping file, certjax/data/labels.py: never guessed);
images not in class folders stay unlabelled. An .npz holds `image` (uint8 [N, H, W, C], or float in [0, 1])
and optionally `label` [N]. The image shape is the model's dataset's (`image_shape`, from
certjax.data.sources.DATASETS; CIFAR's 32 x 32 x 3 by default). Every problem is a DataError naming the file
and the fix; a corrupt image is skipped with a warning instead when `skip_bad` is set.
"""

from __future__ import annotations

import dataclasses
import io
import os
import sys
import zipfile
from pathlib import Path

import numpy as np

from certjax.data.labels import folder_labels
from certjax.data.sources import DATASETS, IMAGE_SHAPE, IMAGE_SUFFIXES, DataError, is_junk


@dataclasses.dataclass
class UserImages:
    names: list[str]  # one per image: the file (member of a zip, or npz:index)
    images: np.ndarray  # uint8 [N, H, W, C] or float32 in [0, 1]
    labels: np.ndarray | None  # int32 [N] or None
    class_names: list[str] | None  # label -> class name (the dataset's, or the user's folder), with folders
    skipped: list[str]  # files skipped as unreadable (skip_bad)


def _shape_text(image_shape) -> str:
    return "x".join(str(n) for n in image_shape)


def _decode(data: bytes, where: str, image_shape) -> np.ndarray:
    from PIL import Image

    height, width = image_shape[:2]
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.size != (width, height) or image.mode not in ("RGB", "L", "P", "RGBA", "CMYK", "YCbCr"):
                bands = len(image.getbands())
                raise DataError(
                    f"{where}: image is {image.size[0]}x{image.size[1]}x{bands} ({image.mode}), expected "
                    f"{_shape_text(image_shape)} RGB: resize it to the model's input size first"
                )
            if image.mode == "RGBA":
                raise DataError(
                    f"{where}: image has an alpha channel (RGBA), expected {_shape_text(image_shape)} RGB"
                )
            return np.asarray(image.convert("RGB"), np.uint8)
    except DataError:
        raise
    except Exception as error:  # PIL raises many types for a damaged file
        reason = type(error).__name__ if "BytesIO" in str(error) else f"{type(error).__name__}: {error}"
        raise DataError(f"{where}: cannot decode the image ({reason}); the file is corrupt") from None


def _warn(message: str) -> None:
    print(f"certjax: warning: {message}", file=sys.stderr, flush=True)


def _from_members(
    path: Path, names: list[str], read, skip_bad: bool, image_shape, dataset, labels
) -> UserImages:
    names = sorted(n for n in names if not is_junk(n.split("/")) and n.lower().endswith(IMAGE_SUFFIXES))
    if not names:
        raise DataError(
            f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) found: pass a folder or zip of images, "
            "an .npz with an 'image' array, or one image file"
        )
    parents = {n.rsplit("/", 1)[0] if "/" in n else "" for n in names}
    labelled = len(parents) >= 2 and "" not in parents
    class_names, label_of = None, {}
    if labelled:
        folders = sorted({p.rsplit("/", 1)[-1] for p in parents})
        info = DATASETS[dataset]
        label_of = folder_labels(folders, info.class_names, info.num_classes, labels, str(path))
        class_names = list(info.class_names or map(str, range(info.num_classes)))
        if labels != "names":  # the user's folders name the classes they map to
            for folder, label in label_of.items():
                class_names[label] = folder
    images, kept, found, skipped = [], [], [], []
    for name in names:
        where = f"{path}: {name}" if path.is_file() else str(path / name)
        try:
            try:
                data = read(name)
            except Exception as error:  # a damaged zip member, an unreadable file
                raise DataError(f"{where}: cannot read ({type(error).__name__}: {error})") from error
            images.append(_decode(data, where, image_shape))
        except DataError as error:
            if f"expected {_shape_text(image_shape)}" in str(error):  # a wrong size is no corrupt file
                raise
            if not skip_bad:
                raise DataError(f"{error} (--skip-bad-images skips unreadable images)") from None
            _warn(f"{error} (skipped: --skip-bad-images)")
            skipped.append(name)
            continue
        kept.append(name)
        if labelled:
            found.append(label_of[name.rsplit("/", 1)[0].rsplit("/", 1)[-1]])
    if not images:
        raise DataError(f"{path}: every image was unreadable ({len(skipped)} skipped)")
    return UserImages(
        names=kept,
        images=np.stack(images),
        labels=np.asarray(found, np.int32) if labelled else None,
        class_names=class_names,
        skipped=skipped,
    )


def _from_npz(path: Path, image_shape) -> UserImages:
    dims = ", ".join(str(n) for n in image_shape)
    try:
        with np.load(path, allow_pickle=False) as data:
            if "image" not in data.files:
                raise DataError(
                    f"{path}: no 'image' array (found {sorted(data.files)}); save the images as "
                    f"np.savez(path, image=uint8 [N, {dims}], label=[N] optional)"
                )
            images = np.asarray(data["image"])
            labels = np.asarray(data["label"]) if "label" in data.files else None
    except DataError:
        raise
    except Exception as error:
        raise DataError(f"{path}: cannot read the .npz ({type(error).__name__}: {error})") from error
    if images.shape == tuple(image_shape):
        images = images[None]
    if images.ndim != 4 or images.shape[1:] != tuple(image_shape):
        raise DataError(f"{path}: 'image' has shape {images.shape}, expected [N, {dims}] (NHWC, RGB)")
    if labels is not None and labels.shape != (len(images),):
        raise DataError(f"{path}: 'label' has shape {labels.shape}, expected ({len(images)},)")
    if len(images) == 0:
        raise DataError(f"{path}: 'image' holds no images")
    from certjax.inference.images import as_images

    try:
        images = as_images(images, image_shape)
    except ValueError as error:
        raise DataError(f"{path}: 'image': {error}") from error
    names = [f"{path.name}:{i}" for i in range(len(images))]
    return UserImages(names, images, None if labels is None else labels.astype(np.int32), None, [])


def read_user_images(
    path, skip_bad: bool = False, image_shape=IMAGE_SHAPE, dataset: str = "cifar10", labels: str = "names"
) -> UserImages:
    """The images (and labels, when known) at path: folder, .zip, .npz or one image file.

    Args:
      path: the folder, .zip, .npz or image file. skip_bad: skip (with a warning) images that cannot be read.
      image_shape: (H, W, C) the model takes: its dataset's `DATASETS[config.data.dataset].image_shape`.
      dataset: the model's dataset (a key of DATASETS), whose class names label class folders.
      labels: "names", "sorted" or a JSON mapping file: how class folders are labelled (module docstring).

    Returns:
      UserImages; a DataError names the file and the fix for any bad input.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        names = []
        for directory, subdirectories, files in os.walk(path):
            subdirectories.sort()
            relative = Path(directory).relative_to(path)
            names += [(relative / f).as_posix() for f in files]
        return _from_members(
            path, names, lambda name: (path / name).read_bytes(), skip_bad, image_shape, dataset, labels
        )
    if not path.is_file():
        raise DataError(f"{path}: no such file or directory (pass a folder, a .zip, an .npz or an image)")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _from_npz(path, image_shape)
    if suffix == ".zip":
        try:
            with zipfile.ZipFile(path) as archive:
                names = [i.filename for i in archive.infolist() if not i.is_dir()]
                return _from_members(path, names, archive.read, skip_bad, image_shape, dataset, labels)
        except zipfile.BadZipFile as error:
            raise DataError(f"{path}: not a readable zip file ({error}); copy it again") from error
    if suffix in IMAGE_SUFFIXES:
        return UserImages(
            [path.name], _decode(path.read_bytes(), str(path), image_shape)[None], None, None, []
        )
    raise DataError(
        f"{path}: unknown kind of file {suffix!r}: pass a folder or .zip of images, an .npz or one image "
        f"({', '.join(IMAGE_SUFFIXES)})"
    )
