"""64 x 64 fixtures in the exact layouts users have, built from real CIFAR-10 images (the demo sample shipped
in certjax/data/demo, so CI needs nothing outside the repository) resized to 64 x 64 with PIL's box filter.

- `write_tiny_imagenet`: a small Tiny-ImageNet-200 tree (all 200 wnids, listed unsorted in wnids.txt, a few
  train images a class, val/ labelled by val_annotations.txt, one greyscale image), as a folder or a zip.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

from tests.conftest import REPO

DEMO_TRAIN = REPO / "certjax" / "data" / "demo" / "cifar10-demo-train.zip"
# 200 WordNet-style ids whose listed order is not their sorted order (labels are the sorted rank)
WNIDS = [f"n{(7919 * k) % 100003 + 1000000:08d}" for k in range(1, 201)]


def cifar_images_64(n: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`n` real CIFAR-10 images of the demo zip, the classes in turn (image k: class (start + k) mod 10),
    resized to uint8 [n, 64, 64, 3], and their CIFAR-10 class index."""
    from PIL import Image

    with zipfile.ZipFile(DEMO_TRAIN) as zf:
        names = sorted(n for n in zf.namelist() if n.endswith(".jpg"))
        by_class: dict[str, list[str]] = {}
        for name in names:
            by_class.setdefault(name.split("/")[1], []).append(name)
        classes = sorted(by_class)
        turns = [(start + k) % len(classes) for k in range(n)]
        picked = [
            by_class[classes[c]][((start + k) // len(classes)) % len(by_class[classes[c]])]
            for k, c in enumerate(turns)
        ]
        images = [
            np.asarray(Image.open(io.BytesIO(zf.read(p))).convert("RGB").resize((64, 64), Image.BOX))
            for p in picked
        ]
    return np.stack(images), np.array(turns)


def _jpeg(image: np.ndarray, grey: bool = False) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).convert("L" if grey else "RGB").save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def tiny_imagenet_files(train_per_class: int = 2, val_per_class: int = 1) -> dict[str, bytes]:
    """{path below tiny-imagenet-200/: bytes} of the fixture: wnids.txt, train/<wnid>/images/<wnid>_<k>.JPEG
    (+ the <wnid>_boxes.txt the real set has), val/images/val_<k>.JPEG in shuffled class order and
    val/val_annotations.txt. The first val image is greyscale."""
    count = len(WNIDS) * (train_per_class + val_per_class)
    images, _ = cifar_images_64(count)
    files = {"wnids.txt": ("\n".join(WNIDS) + "\n").encode()}
    k = 0
    for wnid in WNIDS:
        boxes = []
        for j in range(train_per_class):
            files[f"train/{wnid}/images/{wnid}_{j}.JPEG"] = _jpeg(images[k])
            boxes.append(f"{wnid}_{j}.JPEG\t0\t0\t63\t63")
            k += 1
        files[f"train/{wnid}/{wnid}_boxes.txt"] = "\n".join(boxes).encode()
    rng = np.random.default_rng(0)
    val_wnids = [w for w in WNIDS for _ in range(val_per_class)]
    rng.shuffle(val_wnids)
    annotations = []
    for v, wnid in enumerate(val_wnids):
        files[f"val/images/val_{v}.JPEG"] = _jpeg(images[k], grey=v == 0)
        annotations.append(f"val_{v}.JPEG\t{wnid}\t0\t0\t63\t63")
        k += 1
    files["val/val_annotations.txt"] = ("\n".join(annotations) + "\n").encode()
    return files


def write_tiny_imagenet(root: Path, as_zip: bool = True, files: dict[str, bytes] | None = None) -> Path:
    """Write the fixture (or `files`, e.g. a damaged copy of it) under root/ as tiny-imagenet-200.zip or as
    the folder tiny-imagenet-200/, as distributed; returns its path."""
    files = tiny_imagenet_files() if files is None else files
    if as_zip:
        path = Path(root) / "tiny-imagenet-200.zip"
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in files.items():
                zf.writestr(f"tiny-imagenet-200/{name}", data)
        return path
    path = Path(root) / "tiny-imagenet-200"
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


def decoded(data: bytes) -> np.ndarray:
    """An independent decode of one JPEG to RGB (PIL directly), to compare a source's images with."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
