"""Build the small CIFAR-10 demo zips shipped inside certjax (``--config.data.real=demo``).

From the shared JPEG zips (real CIFAR-10 images, see ../shared/data/README.md) it keeps the
first 500 files per class of the training set and the first 100 per class of the test set, in
sorted file name order, and writes ``certjax/data/demo/cifar10-demo-{train,test}.zip`` with the
same layout (``<split>/<class>/<name>.jpg``), uncompressed, with the JPEG bytes and timestamps
copied unchanged, so that rebuilding gives the same bytes.

    python bench/make_demo_data.py [--shared ../shared/data]
"""

import argparse
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PER_CLASS = {"train": 500, "test": 100}


def make_demo_zip(src: Path, dst: Path, split: str, per_class: int) -> int:
    with zipfile.ZipFile(src) as zin:
        by_class: dict[str, list[zipfile.ZipInfo]] = {}
        for info in zin.infolist():
            parts = info.filename.split("/")
            if not info.is_dir() and len(parts) == 3 and parts[0] == split:
                by_class.setdefault(parts[1], []).append(info)
        dst.parent.mkdir(parents=True, exist_ok=True)
        count = 0
        with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
            for cls in sorted(by_class):
                for info in sorted(by_class[cls], key=lambda i: i.filename)[:per_class]:
                    out = zipfile.ZipInfo(info.filename, date_time=info.date_time)
                    zout.writestr(out, zin.read(info), compress_type=zipfile.ZIP_STORED)
                    count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    args = parser.parse_args()
    for split, per_class in PER_CLASS.items():
        src = args.shared / f"cifar10-jpeg-{split}.zip"
        dst = REPO / "certjax" / "data" / "demo" / f"cifar10-demo-{split}.zip"
        n = make_demo_zip(src, dst, split, per_class)
        print(f"{dst.relative_to(REPO)}: {n} images, {dst.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
