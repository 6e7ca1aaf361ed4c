"""Record the golden outputs of tests/test_golden.py. Run at commit 8811d5e; kept for the record, it may not
run on later code (the goldens must stay those of 8811d5e: never re-record them to make a change pass).

    PYTHONPATH=$PWD JAX_PLATFORMS=cpu XLA_FLAGS=--xla_cpu_max_isa=AVX2 python tests/golden/record.py [case]

from the repo root, XLA:CPU capped at AVX2 as tests/conftest.py caps the suite (the last bits of XLA:CPU's
reductions depend on the host's vector width). A case whose workdir holds a checkpoint keeps it and only
recomputes the outputs: the outputs of 2026-12-02 were recomputed so, at 8811d5e, from the checkpoints of the
first recording, after that recording turned out specific to its host. A further kind of host is recorded
beside the first (tests/test_golden.py, "recorded hosts"): run this at 8811d5e (with tests/test_golden.py
of f318183) in a worktree holding copies of the checkpoints, then keep the new golden.json as
golden-HOST.json and, of its golden.npz, only the arrays that differ from the first recording as
golden-HOST.npz. amd-epyc-avx512 was recorded so on 2026-12-02 (AMD EPYC with AVX-512, numpy's OpenBLAS):
linf_dist and sortnet came out identical to the first recording, lot / liresnet / liresnet_pp in last bits.

For each case of CASES (every family; l_inf-dist v1 and v2, SortNet with and without dropout) it trains a tiny
model with `certjax.train.train_and_evaluate` (1 epoch of 4 steps on 128 images of the embedded demo sample,
tiny widths) into tests/golden/<case>/workdir, keeping only the orbax checkpoint (state and config), and
stores what tests/test_golden.py's helpers compute from it in golden.npz (arrays) and golden.json (the
record's numbers, the schedules, info and manifest). tests/golden/images.npz holds the 16 fixed test images
(uint8 [16, 32, 32, 3] from the embedded demo test set) and their labels.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.test_golden import CASES, GOLDEN, compute_case, digest, recorded_in_full  # noqa: E402

_LINF = {"model.depth": 3, "model.width": 8, "certify.eps": 2 / 255}
_LIRESNET = {"model.width": 8, "model.neck_features": 16, "model.eval_power_iterations": 50,
             "optimizer.warmup_epochs": 0, "certify.eps": 0.02}  # fmt: skip
RUNS = {
    "linf_dist_v1": ("configs/linf_dist.py", "v1,demo", _LINF),
    "linf_dist_v2": ("configs/linf_dist.py", "demo", _LINF),
    "sortnet_dropout": ("configs/sortnet.py", "demo", _LINF),
    "sortnet_nodropout": ("configs/sortnet.py", "demo,nodropout", _LINF),
    "lot": ("configs/lot.py", "S,demo,cosine", {"model.init_channels": 4, "optimizer.lr": 0.05,
                                                "certify.eps": 0.02}),
    "liresnet": ("configs/liresnet.py", "XS,demo", _LIRESNET),
    "liresnet_pp": ("configs/liresnet_pp.py", "demo", _LIRESNET),
}  # fmt: skip
SETTINGS = {
    "train.epochs": 1, "train.batch_size": 32, "data.real_subset": 128, "train.eval_batch_size": 64,
    "train.eval_subset": 64, "checkpoint.every_epochs": 1,
}  # fmt: skip
IMAGE_INDICES = np.arange(16) * 61  # 16 fixed images spread over the 1,000 of the demo test set


def tiny_config(case: str):
    path, variant, overrides = RUNS[case]
    spec = importlib.util.spec_from_file_location(f"_golden_{case}", REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(variant)
    for key, value in {**SETTINGS, **overrides}.items():
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def record_images() -> None:
    from certjax.data.sources import make_real_source

    images, labels = make_real_source("demo", "test", "cifar10", None).read(IMAGE_INDICES)
    np.savez(GOLDEN / "images.npz", images=np.asarray(images, np.uint8), labels=np.asarray(labels, np.int32))


def record_case(case: str) -> None:
    from certjax import train

    root = GOLDEN / case
    workdir = root / "workdir"
    if not (workdir / "checkpoints").is_dir():  # else outputs only, from the recorded checkpoint
        shutil.rmtree(root, ignore_errors=True)
        train.train_and_evaluate(tiny_config(case), str(workdir))
        shutil.rmtree(workdir / "tensorboard", ignore_errors=True)  # only the checkpoints are kept
    with tempfile.TemporaryDirectory() as scratch:
        arrays, values = compute_case(case, Path(scratch))
    full = {key: array for key, array in arrays.items() if recorded_in_full(key)}
    values["digests"] = {key: digest(array) for key, array in arrays.items() if key not in full}
    np.savez_compressed(root / "golden.npz", **full)
    (root / "golden.json").write_text(json.dumps(values, indent=1, sort_keys=True) + "\n")
    print(f"{case}: {len(full)} arrays, {len(values['digests'])} digests, record {values['record']}")


def main(cases) -> None:
    if not (GOLDEN / "images.npz").exists():
        record_images()
    for case in cases or CASES:
        record_case(case)


if __name__ == "__main__":
    main(sys.argv[1:])
