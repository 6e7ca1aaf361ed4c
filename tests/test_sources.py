"""Tests of certjax.data.sources: every loader round-trips exact data, and every bad input stops
with one DataError that names the file."""

import io
import json
import os
import pickle
import re
import subprocess
import sys
import tarfile
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from certjax.data import sources as S
from certjax.data.sources import DataError
from certjax.data.sources import tfds as S_tfds

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
needs_shared = pytest.mark.skipif(
    not (SHARED / "cifar10-jpeg-test.zip").exists(), reason=f"no shared data in {SHARED}"
)


def _decode_member(zip_path, member):
    with zipfile.ZipFile(zip_path) as zf, Image.open(io.BytesIO(zf.read(member))) as im:
        return np.asarray(im.convert("RGB"))


def _class_members(zip_path):
    """{class: sorted member names} read straight from the zip."""
    out = {}
    with zipfile.ZipFile(zip_path) as zf:
        for name in zf.namelist():
            if not name.endswith("/"):
                out.setdefault(name.split("/")[1], []).append(name)
    return {c: sorted(v) for c, v in out.items()}


def _check_cifar10_zip(src, zip_path, per_class):
    assert len(src) == 10 * per_class and src.num_classes == 10
    assert np.array_equal(np.bincount(src.labels, minlength=10), [per_class] * 10)
    image, label = src[0]
    assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
    assert label.dtype == np.int32 and label.shape == ()
    # The 8th cat image: cat is label 3 in CIFAR-10 order (not alphabetical, where it would be 2).
    member = _class_members(zip_path)["cat"][7]
    index = 3 * per_class + 7
    assert src[index][1] == 3
    assert np.array_equal(src[index][0], _decode_member(zip_path, member))
    images, labels = src.read(np.array([index, 0]))
    assert images.shape == (2, 32, 32, 3) and labels.dtype == np.int32
    assert np.array_equal(images[0], src[index][0]) and list(labels) == [3, 0]


# ------------------------------------------------------------------------------ image folders


@needs_shared
def test_shared_test_zip():
    src = S.make_real_source(str(SHARED / "cifar10-jpeg-{split}.zip"), "test", "cifar10")
    _check_cifar10_zip(src, SHARED / "cifar10-jpeg-test.zip", 1000)


@pytest.mark.parametrize("split, per_class", [("train", 500), ("test", 100)])
def test_demo_zips(split, per_class):
    src = S.make_real_source("demo", split, "cifar10")
    zip_path = S.DEMO_DIR / f"cifar10-demo-{split}.zip"
    _check_cifar10_zip(src, zip_path, per_class)
    with zipfile.ZipFile(zip_path) as zf:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())


def _write_png(path, pixels):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def test_folder_on_disk(tmp_path):
    rng = np.random.default_rng(0)
    pixels = {}
    for split in ("train", "test"):
        for cls in ("zebra", "apple", "mango"):
            for k in range(3):
                p = tmp_path / split / cls / f"{k}.png"
                pixels[p] = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                _write_png(p, pixels[p])
    (tmp_path / "train" / "apple" / ".DS_Store").write_bytes(b"junk")
    gray = tmp_path / "train" / "apple" / "9.png"  # grayscale: converted to RGB
    Image.fromarray(np.full((32, 32), 77, np.uint8)).save(gray)
    src = S.load_image_folder(tmp_path, "train", 3, labels="sorted")
    assert len(src) == 10 and list(src.labels) == [0] * 4 + [1] * 3 + [2] * 3  # sorted classes
    assert np.array_equal(src[0][0], pixels[tmp_path / "train/apple/0.png"])
    assert np.array_equal(src[3][0], np.full((32, 32, 3), 77, np.uint8))
    assert np.array_equal(src[9][0], pixels[tmp_path / "train/zebra/2.png"])
    # Without a split folder, the class folders are at the top.
    flat = S.load_image_folder(tmp_path / "test", "test", 3, labels="sorted")
    assert len(flat) == 9 and np.array_equal(flat[8][0], pixels[tmp_path / "test/zebra/2.png"])


# ------------------------------------------------------------------------- official archives


def _pickle_batch(data, labels, label_key, numpy_module="numpy.core"):
    raw = pickle.dumps({b"data": data, label_key: labels, b"batch_label": b"x"}, protocol=2)
    # The official files were pickled by an old numpy under numpy.core; numpy 2 writes numpy._core.
    return raw.replace(b"numpy._core.multiarray", f"{numpy_module}.multiarray".encode())


def _write_archive(path, folder, batches, label_key):
    """A tar.gz like the official one; returns {member: (CHW rows, labels)}."""
    rng = np.random.default_rng(len(batches))
    written = {}
    with tarfile.open(path, "w:gz") as tar:
        for k, (name, n, num_classes) in enumerate(batches):
            data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            labels = [int(x) for x in rng.integers(0, num_classes, n)]
            raw = _pickle_batch(data, labels, label_key, ("numpy.core", "numpy._core")[k % 2])
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
            written[name] = (data, labels)
    return written


def _to_hwc(rows):
    return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def test_cifar10_archive(tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"
    names = ["batches.meta", "test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]
    written = _write_archive(path, "cifar-10-batches-py", [(n, 4, 10) for n in names], b"labels")
    train = S.make_real_source(str(path), "train", "cifar10")
    expected = [written[f"data_batch_{i}"] for i in range(1, 6)]
    assert len(train) == 20
    assert np.array_equal(train.images, _to_hwc(np.concatenate([d for d, _ in expected])))
    assert list(train.labels) == sum((labels for _, labels in expected), [])
    test = S.load_cifar_archive(path, "test", 10)
    assert np.array_equal(test.images, _to_hwc(written["test_batch"][0]))
    assert list(test.labels) == written["test_batch"][1]


def test_cifar100_archive(tmp_path):
    path = tmp_path / "cifar-100-python.tar.gz"
    written = _write_archive(path, "cifar-100-python", [("train", 6, 100), ("test", 5, 100)], b"fine_labels")
    for split in ("train", "test"):
        src = S.make_real_source(str(path), split, "cifar100")
        assert np.array_equal(src.images, _to_hwc(written[split][0]))
        assert list(src.labels) == written[split][1] and src.num_classes == 100
    with pytest.raises(DataError, match="cifar-100-python.tar.gz.*100-class archive"):
        S.load_cifar_archive(path, "train", 10)


def test_archive_refuses_code(tmp_path):
    path = tmp_path / "cifar-100-python.tar.gz"
    raw = pickle.dumps(types.SimpleNamespace(), protocol=2)  # any global but numpy's
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-100-python/test")
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
    with pytest.raises(DataError, match="cifar-100-python/test.*refusing to load types"):
        S.load_cifar_archive(path, "test", 100)


# ---------------------------------------------------------------------------- generated .npz


def _generated(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n)


def test_npz_stored_is_mapped(tmp_path):
    images, labels = _generated()
    path = tmp_path / "gen.npz"
    np.savez(path, image=images, label=labels.astype(np.uint8))
    src = S.GeneratedNpzSource(path, 10)
    assert isinstance(src.file_images, np.memmap) and Path(src.file_images.filename) == path
    assert len(src) == 40 and src.labels.dtype == np.int32
    assert np.array_equal(src.read(np.arange(40))[0], images)
    assert np.array_equal(src.labels, labels)
    assert np.array_equal(src[17][0], images[17]) and src[17][1] == labels[17]
    mixed = np.array([5, 6, 7, 0, 0, 39, -1, 38, 39])  # runs, repeats, negatives
    got_images, got_labels = src.read(mixed)
    assert np.array_equal(got_images, images[mixed]) and np.array_equal(got_labels, labels[mixed])
    assert src.read(np.array([], np.int64))[0].shape == (0, 32, 32, 3)
    with pytest.raises(IndexError):
        src.read(np.array([40]))
    clone = pickle.loads(pickle.dumps(src))  # as for grain workers: the map is reopened, not copied
    assert len(pickle.dumps(src)) < 2000 + labels.nbytes * 4
    assert np.array_equal(clone.read(np.array([3, 1]))[0], images[[3, 1]])


@pytest.mark.parametrize("syscall", ["preadv", "pread"])
def test_npz_partial_reads(tmp_path, monkeypatch, syscall):
    # The kernel may return fewer bytes than asked (at most ~2 GB per call): the reader continues.
    images, labels = _generated()
    np.savez(tmp_path / "gen.npz", image=images, label=labels)
    src = S.GeneratedNpzSource(tmp_path / "gen.npz", 10)
    if syscall == "preadv":
        real = os.preadv
        monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: real(fd, [bufs[0][:1000]], off))
    else:
        real = os.pread
        monkeypatch.delattr(os, "preadv", raising=False)
        monkeypatch.setattr(os, "pread", lambda fd, n, off: real(fd, min(n, 1000), off))
    assert np.array_equal(src.read(np.arange(3, 30))[0], images[3:30])


def test_npz_compressed_extracted_once(tmp_path):
    images, labels = _generated()
    path = tmp_path / "gen.npz"
    np.savez_compressed(path, image=images, label=labels)
    src = S.GeneratedNpzSource(path, 10)
    extracted = tmp_path / "gen.npz.image.npy"
    assert Path(src.file_images.filename) == extracted
    assert np.array_equal(src.read(np.arange(40))[0], images)
    mtime = extracted.stat().st_mtime_ns
    again = S.GeneratedNpzSource(path, 10)
    assert extracted.stat().st_mtime_ns == mtime
    assert np.array_equal(again[5][0], images[5])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen.npz", "gen.npz.image.npy"]
    # A new .npz under the same name makes the extraction stale.
    os.utime(extracted, ns=(mtime - 10**10, mtime - 10**10))
    images2, _ = _generated(seed=1)
    np.savez_compressed(path, image=images2, label=labels)
    assert np.array_equal(S.GeneratedNpzSource(path, 10)[5][0], images2[5])


def test_npz_compressed_corrupt_leaves_nothing(tmp_path):
    # Damage inside the compressed image member: the extraction fails (CRC or inflate error) and
    # neither the final file nor a temp file is left behind.
    images, labels = _generated(200)
    path = tmp_path / "gen.npz"
    np.savez_compressed(path, image=images, label=labels)
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("image.npy")
    raw = bytearray(path.read_bytes())
    middle = info.header_offset + 100 + info.compress_size // 2
    raw[middle : middle + 64] = bytes(64)
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="gen.npz: not a readable .npz.*corrupt"):
        S.GeneratedNpzSource(path, 10)
    assert os.listdir(tmp_path) == ["gen.npz"]


def test_npz_compressed_unwritable_dir(tmp_path, monkeypatch):
    images, labels = _generated()
    path = tmp_path / "ro" / "gen.npz"
    path.parent.mkdir()
    np.savez_compressed(path, image=images, label=labels)
    monkeypatch.setenv("CERTJAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != path.parent)
    src = S.GeneratedNpzSource(path, 10)
    assert Path(src.file_images.filename).parent == tmp_path / "cache"
    assert np.array_equal(src[0][0], images[0]) and os.listdir(path.parent) == ["gen.npz"]


def test_npz_limit(tmp_path):
    images, labels = _generated(100)
    path = tmp_path / "gen.npz"
    np.savez(path, image=images, label=labels)
    a = S.GeneratedNpzSource(path, 10, limit=30, seed=5)
    b = S.GeneratedNpzSource(path, 10, limit=30, seed=5)
    c = S.GeneratedNpzSource(path, 10, limit=30, seed=6)
    assert len(a) == 30 and np.array_equal(a.rows, b.rows) and not np.array_equal(a.rows, c.rows)
    assert np.all(np.diff(a.rows) > 0)
    assert np.array_equal(a.read(np.arange(30))[0], images[a.rows])
    assert np.array_equal(a.labels, labels[a.rows]) and a[29][1] == labels[a.rows[29]]
    with pytest.raises(DataError, match=r"gen.npz: limit must be in \[1, 100\].*got 101"):
        S.GeneratedNpzSource(path, 10, limit=101)


# ------------------------------------------------------------------------------------- subsets


def test_subsets():
    images, labels = _generated(50)
    base = S.ArraySource(images, labels, 10)
    assert np.array_equal(S.subset_indices(50, 5, "first", 0), np.arange(5))
    r = S.subset_indices(50, 20, "random", 1)
    assert np.array_equal(r, S.subset_indices(50, 20, "random", 1)) and np.all(np.diff(r) > 0)
    rest = S.complement_indices(50, r)
    assert len(rest) == 30 and not set(rest) & set(r)
    sub = S.SubsetSource(base, r)
    assert len(sub) == 20 and np.array_equal(sub[3][0], images[r[3]])
    assert np.array_equal(sub.read(np.array([0, 19]))[1], labels[r[[0, 19]]])
    with pytest.raises(DataError, match="unknown subset mode"):
        S.subset_indices(50, 5, "last", 0)


def test_grain_accepts_sources(tmp_path):
    grain = pytest.importorskip("grain")
    images, labels = _generated(12)
    np.savez(tmp_path / "gen.npz", image=images, label=labels)
    for src in (S.ArraySource(images, labels, 10), S.GeneratedNpzSource(tmp_path / "gen.npz", 10)):
        ds = grain.MapDataset.source(src)
        assert len(ds) == 12 and np.array_equal(ds[4][0], images[4])


# -------------------------------------------------------------------------------- bad inputs


def _npz(tmp_path, name="bad.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.npz: no such file"):
        S.GeneratedNpzSource(tmp_path / "nope.npz", 10)
    with pytest.raises(DataError, match=r"nope-test.zip \(from .*nope-\{split\}.zip.*no such file"):
        S.make_real_source(str(tmp_path / "nope-{split}.zip"), "test", "cifar10")


def test_npz_missing_key(tmp_path):
    images, labels = _generated()
    path = _npz(tmp_path, images=images, label=labels)
    with pytest.raises(DataError, match=r"bad.npz: no 'image' array .*\['images', 'label'\]"):
        S.GeneratedNpzSource(path, 10)


def test_npz_wrong_dtype(tmp_path):
    images, labels = _generated()
    path = _npz(tmp_path, image=images.astype(np.float32), label=labels)
    with pytest.raises(DataError, match="bad.npz: 'image' have dtype float32, expected uint8"):
        S.GeneratedNpzSource(path, 10)
    path = _npz(tmp_path, image=images, label=labels.astype(np.float32))
    with pytest.raises(DataError, match="bad.npz: labels have dtype float32"):
        S.GeneratedNpzSource(path, 10)


def test_npz_wrong_shape(tmp_path):
    images, labels = _generated()
    path = _npz(tmp_path, image=images.transpose(0, 3, 1, 2).copy(), label=labels)
    with pytest.raises(DataError, match=r"bad.npz: 'image' have shape \(40, 3, 32, 32\)"):
        S.GeneratedNpzSource(path, 10)


def test_labels_out_of_range(tmp_path):
    images, labels = _generated()
    labels[3] = 10
    path = _npz(tmp_path, image=images, label=labels)
    with pytest.raises(DataError, match=r"bad.npz: labels must lie in \[0, 10\), found .*\[0, 10\]"):
        S.GeneratedNpzSource(path, 10)
    with pytest.raises(DataError, match=r"mine: labels must lie in \[0, 10\)"):
        S.ArraySource(images, labels, 10, name="mine")


def test_count_mismatch(tmp_path):
    images, labels = _generated()
    path = _npz(tmp_path, image=images, label=labels[:-1])
    with pytest.raises(DataError, match="bad.npz: 40 images but 39 labels"):
        S.GeneratedNpzSource(path, 10)
    with pytest.raises(DataError, match="mine: 40 images but 39 labels"):
        S.ArraySource(images, labels[:-1], 10, name="mine")


def test_array_source_checks():
    images, labels = _generated()
    with pytest.raises(DataError, match="mine: images have dtype int64"):
        S.ArraySource(images.astype(np.int64), labels, 10, name="mine")
    with pytest.raises(DataError, match=r"mine: images have shape \(40, 32, 32\)"):
        S.ArraySource(images[..., 0], labels, 10, name="mine")


@pytest.mark.parametrize("keep", [0.5, -100])
def test_truncated_npz(tmp_path, keep):
    images, labels = _generated()
    path = _npz(tmp_path, image=images, label=labels)
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)] if keep > 0 else raw[:keep])
    with pytest.raises(DataError, match="bad.npz: not a readable .npz.*truncated or corrupt"):
        S.GeneratedNpzSource(path, 10)


def test_npz_truncated_image_data(tmp_path):
    # The zip directory is intact but the image member ends early (a bad copy that kept its end).
    images, labels = _generated()
    path = tmp_path / "bad.npz"
    with zipfile.ZipFile(path, "w") as zf:
        buf = io.BytesIO()
        np.save(buf, images)
        zf.writestr("image.npy", buf.getvalue()[:-5000])
        buf = io.BytesIO()
        np.save(buf, labels)
        zf.writestr("label.npy", buf.getvalue())
    with pytest.raises(DataError, match="bad.npz: image.npy size disagrees with its header"):
        S.GeneratedNpzSource(path, 10)


def test_corrupt_zip(tmp_path):
    path = tmp_path / "images.zip"
    path.write_bytes(b"PK\x03\x04" + os.urandom(2000))
    with pytest.raises(DataError, match="images.zip: not a readable zip file"):
        S.make_real_source(str(path), "train", "cifar10")


def test_corrupt_tar(tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"
    _write_archive(path, "cifar-10-batches-py", [("test_batch", 50, 10)], b"labels")
    path.write_bytes(path.read_bytes()[:-3000])
    with pytest.raises(DataError, match="cifar-10-python.tar.gz: cannot read the archive.*corrupt"):
        S.make_real_source(str(path), "test", "cifar10")
    path.write_bytes(os.urandom(3000))
    with pytest.raises(DataError, match="cifar-10-python.tar.gz: cannot read the archive"):
        S.load_cifar_archive(path, "test", 10)


def _zip(path, members):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _png_bytes(size=32):
    buf = io.BytesIO()
    Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_zip_without_class_folders(tmp_path):
    path = _zip(tmp_path / "flat.zip", {"a.png": _png_bytes(), "b.png": _png_bytes()})
    with pytest.raises(DataError, match="flat.zip: no class folders with images found"):
        S.load_image_folder(path, "train", 10)


def test_wrong_number_of_classes(tmp_path):
    path = _zip(tmp_path / "three.zip", {f"train/c{k}/0.png": _png_bytes() for k in range(3)})
    with pytest.raises(DataError, match=r"three.zip: found 3 class folders \(c0, c1, c2\).* 10 "):
        S.load_image_folder(path, "train", 10)
    with pytest.raises(DataError, match="three.zip: has no 'test/' folder"):
        S.load_image_folder(path, "test", 3)


def test_image_not_32x32(tmp_path):
    path = _zip(tmp_path / "big.zip", {"a/0.png": _png_bytes(), "b/0.png": _png_bytes(64)})
    with pytest.raises(DataError, match="big.zip: b/0.png: image is 64x64, expected 32x32"):
        S.load_image_folder(path, "train", 2, labels="sorted")


def test_corrupt_image(tmp_path):
    path = _zip(tmp_path / "broken.zip", {"a/0.jpg": _png_bytes(), "b/0.jpg": b"\xff\xd8junk"})
    with pytest.raises(DataError, match="broken.zip: b/0.jpg: cannot decode the image"):
        S.load_image_folder(path, "train", 2, labels="sorted")


def test_unknown_dataset_and_demo_cifar100():
    with pytest.raises(DataError, match="unknown dataset 'mnist'; valid: cifar10, cifar100"):
        S.make_real_source("demo", "train", "mnist")
    with pytest.raises(DataError, match="demo data is CIFAR-10 only"):
        S.make_real_source("demo", "train", "cifar100")


def _fake_tfds(monkeypatch, data_source):
    try:
        import tensorflow_datasets as tfds
    except ImportError:  # the wrapper's behaviour does not depend on the real module
        tfds = types.ModuleType("tensorflow_datasets")
        monkeypatch.setitem(sys.modules, "tensorflow_datasets", tfds)
    monkeypatch.setattr(tfds, "data_source", data_source, raising=False)


def test_tfds_offline_fails_fast_without_downloading(monkeypatch):
    calls = []

    def data_source(name, split, data_dir, download):
        calls.append(download)
        raise AssertionError("not prepared")

    _fake_tfds(monkeypatch, data_source)
    monkeypatch.setattr(S_tfds, "_download_host_reachable", lambda hosts: False)  # no network traffic
    with pytest.raises(DataError) as err:
        S.make_real_source("tfds", "train", "cifar10")
    assert calls == [False]  # the download was never started
    message = str(err.value)
    assert "cannot be reached" in message
    for option in ("cifar-10-python.tar.gz", "folder_or_zip", "cifar10-jpeg-{split}.zip", "=demo"):
        assert option in message


def test_tfds_offline(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'www.cs.toronto.edu'")

    _fake_tfds(monkeypatch, offline)
    monkeypatch.setattr(S_tfds, "_download_host_reachable", lambda hosts: True)
    with pytest.raises(DataError) as err:
        S.make_real_source("tfds", "train", "cifar10")
    message = str(err.value)
    assert "tfds:cifar10[train]: the download failed" in message and "toronto" in message
    for option in ("cifar-10-python.tar.gz", "folder_or_zip", "cifar10-jpeg-{split}.zip", "=demo"):
        assert f"{option}" in message


def test_tfds_wrapper(monkeypatch):
    images, labels = _generated(6)
    calls = []

    def data_source(name, split, data_dir, download):
        calls.append(download)
        if not download:
            raise AssertionError("not prepared")
        return [{"image": im, "label": np.int64(lb)} for im, lb in zip(images, labels, strict=True)]

    _fake_tfds(monkeypatch, data_source)
    monkeypatch.setattr(S_tfds, "_download_host_reachable", lambda hosts: True)
    src = S.make_real_source("tfds", "test", "cifar100")
    assert calls == [False, True] and len(src) == 6 and src.num_classes == 100
    got_images, got_labels = src.read(np.array([5, 0]))
    assert np.array_equal(got_images, images[[5, 0]]) and got_labels.dtype == np.int32
    assert list(got_labels) == list(labels[[5, 0]]) and src[-1][1] == labels[5]


# ----------------------------------------------------------------------------------- memory


def _write_big_npz(path, n, chunk=8192):
    """An .npz written chunk by chunk straight into the zip (no 2 GB array in memory)."""
    pattern = np.arange(3072, dtype=np.uint8)
    total = 0
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        with zf.open("image.npy", "w", force_zip64=True) as f:  # like np.savez
            header = {"descr": "|u1", "fortran_order": False, "shape": (n, 32, 32, 3)}
            np.lib.format.write_array_header_1_0(f, header)
            for start in range(0, n, chunk):
                rows = np.arange(start, min(start + chunk, n))
                block = pattern[None, :] + (rows % 251).astype(np.uint8)[:, None]  # wraps at 256
                total += int(block.sum(dtype=np.uint64))
                f.write(block.data)
        with zf.open("label.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, np.arange(n) % 10)
    return total


_MEASURE = """
import json, resource, sys
import numpy as np
from certjax.data.sources import GeneratedNpzSource
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
src = GeneratedNpzSource(sys.argv[1], 10)
total = 0
for start in range(0, len(src), 4096):
    images, labels = src.read(np.arange(start, min(start + 4096, len(src))))
    total += int(images.sum(dtype=np.uint64))
rng = np.random.default_rng(0)
for _ in range(20):  # shuffled batches, as in training, touch pages all over the file
    src.read(rng.integers(0, len(src), 4096))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"n": len(src), "total": total, "rise_mb": (peak - baseline) / 1024}))
"""


def test_big_npz_memory(tmp_path):
    """Reading a 2.15 GB generated file (sequential pass + random batches) raises the peak RSS of a
    fresh process by < 500 MB."""
    n = 700_000  # 700k * 3072 bytes = 2.15 GB > 2 GiB
    path = tmp_path / "big.npz"
    try:
        total = _write_big_npz(path, n)
        assert path.stat().st_size > 2 * 1024**3
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        run = subprocess.run(
            [sys.executable, "-c", _MEASURE, str(path)],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        result = json.loads(run.stdout.strip().splitlines()[-1])
        assert result["n"] == n and result["total"] == total
        assert result["rise_mb"] < 500, result
    finally:
        path.unlink(missing_ok=True)


def test_messages_name_files_not_python_reprs(tmp_path):
    # Paths in messages are plain (no PosixPath(...)), so users can copy them.
    with pytest.raises(DataError) as err:
        S.GeneratedNpzSource(tmp_path / "x.npz", 10)
    assert re.match(re.escape(str(tmp_path / "x.npz")), str(err.value))


def test_tfds_imagenet64_is_imagenet_resized_and_its_validation_split(monkeypatch):
    """Online users get ImageNet 64x64 from tensorflow-datasets' imagenet_resized/64x64, whose evaluation
    split is "validation"; offline, the error names the local files to pass instead."""
    calls = []
    image = np.zeros((64, 64, 3), np.uint8)

    def data_source(name, split, data_dir, download):
        calls.append((name, split))
        return [{"image": image, "label": np.int64(999)}]

    _fake_tfds(monkeypatch, data_source)
    source = S.make_real_source("tfds", "test", "imagenet64")
    assert calls == [("imagenet_resized/64x64", "validation")] and source.image_shape == (64, 64, 3)
    assert source.num_classes == 1000 and source[0][1] == 999

    def offline(*args, **kwargs):
        raise AssertionError("not prepared")

    _fake_tfds(monkeypatch, offline)
    monkeypatch.setattr(S_tfds, "_download_host_reachable", lambda hosts: hosts != ("image-net.org",))
    with pytest.raises(DataError, match="(?s)image-net.org.*cannot be reached.*official Imagenet64 batch"):
        S.make_real_source("tfds", "train", "imagenet64")
