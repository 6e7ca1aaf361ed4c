"""Golden outputs recorded at commit 8811d5e (issue 21): the current code must reproduce them bit for bit.

For every family (tests/golden/record.py, RUNS) a tiny checkpoint trained by the 8811d5e code lies in
tests/golden/<case>/workdir, with what that code computed from it in tests/golden/<case>/golden.npz and
golden.json: the evaluation (results record and every per-example array of the radii file), the API's and
the export's outputs on the fixed images of tests/golden/images.npz, and one train step (loss, metrics, the
updated params / model state / optimiser state) from the restored state and from a fresh init, each on the
pipeline's own batch of that step. Restoring those checkpoints also proves that checkpoints written before a
change still load.

When code moves, update ONLY the call sites in the helpers below (`evaluate_record`, `restore_model`,
`api_outputs`, `export_outputs`, `train_step_outputs`); never the assertions, never the recorded files.
Each helper returns (arrays: {name: numpy array}, values: JSON-able dict); record.py stored exactly what they
returned at 8811d5e (where api and export each restored the model themselves).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

GOLDEN = Path(__file__).resolve().parent / "golden"
CASES = (
    "linf_dist_v1",
    "linf_dist_v2",
    "sortnet_dropout",
    "sortnet_nodropout",
    "lot",
    "liresnet",
    "liresnet_pp",
)
TRAIN_SUBSET = 64  # evaluate_checkpoint's train_subset: training accuracy on 64 fixed training images
# Recorded as the SHA-256 of their bytes (with dtype and shape), not in full, to keep the goldens small: the
# optimiser state and everything of the train step from a fresh init. Equal digests = equal bits.
DIGEST_PREFIXES = ("train_init/",)
DIGEST_PARTS = ("/opt_state",)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.ndarray, jax.Array)):
        return _jsonable(np.asarray(value).tolist())
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    return value


def _tree_arrays(prefix: str, tree) -> dict[str, np.ndarray]:
    """Every leaf of a pytree as {prefix + its flattened key path: numpy array}."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {prefix + jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


# ------------------------------------------------------------------------------ calls into certjax
# The only lines to update when the code moves.


# Issue 22 renamed outputs (one meaning per word, certjax/inference/certificates.py, certjax/radii_file.py);
# these map today's names back to the names recorded at 8811d5e, for the same arrays.
RECORDED_RADII_NAMES = {  # 8811d5e wrote the certifier's names into the radii file
    "certified_radius": "radius",  # the correct-class convention (0 on a wrong point)
    "radius": "prediction_radius",  # the prediction's radius
    "certified_radius_assumed": "radius_assumed",
}
RECORDED_CERTIFY_NAMES = {  # 8811d5e's certify called the prediction's certificate `certified`
    "prediction": "prediction",
    "radius": "radius",
    "robust": "certified",
    "robust_margin": "certified_margin",
    "robust_ibp": "certified_ibp",
    "label": "label",
    "correct": "correct",
}  # today's `certified` (correct and robust), `certified_radius`, `certified_margin` / `_ibp` are new


def recorded_export_names(out: dict) -> dict:
    """8811d5e's export certified by the margin only: its `certified` is today's `robust_margin` (the l_inf
    families, whose `robust` adds interval bounds) or `robust` (the others)."""
    names = {"prediction": "prediction", "radius": "radius", "label": "label", "correct": "correct"}
    names["robust_margin" if "robust_margin" in out else "robust"] = "certified"
    return names


# fields added after 8811d5e (issue 23: the record names the bound method and the assumed figure's estimator)
LATER_FIELDS = ("bound_method", "assumed_estimator", "eval_lanczos_steps")


def without_later_fields(values: dict) -> dict:
    """values without LATER_FIELDS, at its top level and in its "lipschitz" report: what 8811d5e recorded."""
    values = {k: v for k, v in values.items() if k not in LATER_FIELDS}
    if isinstance(values.get("lipschitz"), dict):
        values["lipschitz"] = {k: v for k, v in values["lipschitz"].items() if k not in LATER_FIELDS}
    return values


def evaluate_record(workdir: Path) -> tuple[dict, dict]:
    """`evaluate_checkpoint` on workdir (written to: pass a copy): every array of its radii file and its
    results record without the wall-clock time and the absolute radii path."""
    from certjax.evaluate import evaluate_checkpoint

    record = evaluate_checkpoint(str(workdir), "best", train_subset=TRAIN_SUBSET)
    with np.load(record["radii_path"]) as radii:
        arrays = {f"radii/{RECORDED_RADII_NAMES.get(key, key)}": radii[key] for key in radii.files}
    values = {k: v for k, v in record.items() if k not in ("time", "radii_path")}
    return arrays, {"record": _jsonable(without_later_fields(values))}


def _model_outputs(prefix: str, model, images, labels, recorded_names) -> dict[str, np.ndarray]:
    """certify with labels (uint8 and float32 images), without labels, at half the eps; logits.
    recorded_names: a certify dict -> {today's name: the recorded name} of the fields recorded."""
    eps = float(model.info["eps"])
    floats = images.astype(np.float32) / np.float32(255)
    calls = {
        "certify": model.certify(images, labels=labels),
        "certify_float": model.certify(floats, labels=labels),
        "certify_nolabels": model.certify(images),
        "certify_half_eps": model.certify(images, eps=eps / 2, labels=labels),
    }
    arrays = {
        f"{prefix}/{call}/{recorded}": np.asarray(out[name])
        for call, out in calls.items()
        for name, recorded in recorded_names(out).items()
        if name in out
    }
    arrays[f"{prefix}/logits"] = np.asarray(model.logits(images))
    arrays[f"{prefix}/logits_float"] = np.asarray(model.logits(floats))
    return arrays


def restore_model(workdir: Path):
    """certjax.restore(workdir): the model `api_outputs` and `export_outputs` use."""
    import certjax

    return certjax.restore(str(workdir))


def api_outputs(model, images, labels) -> tuple[dict, dict]:
    """The restored model on the fixed images; its info without the workdir path."""
    info = without_later_fields({k: v for k, v in model.info.items() if k != "workdir"})
    arrays = _model_outputs("api", model, images, labels, lambda out: RECORDED_CERTIFY_NAMES)
    return arrays, {"api_info": _jsonable(info)}


def export_outputs(model, out_dir: Path, images, labels) -> tuple[dict, dict]:
    """The export (CPU only) of the restored model, loaded with certjax.load_exported, on the fixed images;
    the manifest's numbers (not its hashes, paths or versions)."""
    import certjax
    from certjax.inference.export import export_model

    export_model(model, str(out_dir), platforms=("cpu",))
    exported = certjax.load_exported(str(out_dir))
    keep = ("family", "variant", "threat_model", "eps", "mean", "std", "dataset", "num_classes",
            "input_shape", "batch_size", "pair_lipschitz", "lipschitz")  # fmt: skip
    manifest = without_later_fields({k: exported.info[k] for k in keep})
    arrays = _model_outputs("export", exported, images, labels, recorded_export_names)
    return arrays, {"export_manifest": _jsonable(manifest)}


def train_step_outputs(workdir: Path) -> tuple[dict, dict]:
    """One jitted train step (Trainer.train_step) on the pipeline's batch of that step, with the schedule
    values the training loop feeds there: from the last checkpoint's state ("restored", at its step) and from
    a fresh init ("init", step 0). The batches, the loss and metrics and every leaf of the new state."""
    from certjax import checkpoints
    from certjax.experiment import Experiment
    from certjax.optim import schedules
    from certjax.train import Trainer, _device_schedule

    manager = checkpoints.make_manager(str(workdir), read_only=True)
    try:
        step = checkpoints.select_step(manager, "last")
        config = checkpoints.restore_config(manager, step)
        exp = Experiment(config)
        trainer = Trainer(exp)
        restored = checkpoints.restore_state(manager, step, exp.abstract_restore_target(), announce=False)
    finally:
        manager.close()
    arrays, values = {}, {}
    for name, state in (("restored", restored), ("init", exp.init_state())):
        at = int(state.step)
        batch = exp.batches[at]
        schedule = schedules.schedule_values(config, at, exp.total_steps)
        new_state, metrics = trainer.train_step(state, exp.global_batch(batch), _device_schedule(schedule))
        arrays.update({f"train_{name}/batch/{k}": np.asarray(v) for k, v in batch.items()})
        arrays.update(_tree_arrays(f"train_{name}/metrics/", metrics.compute()))
        arrays.update(_tree_arrays(f"train_{name}/params", new_state.params))
        arrays.update(_tree_arrays(f"train_{name}/model_state", new_state.model_state))
        arrays.update(_tree_arrays(f"train_{name}/opt_state", new_state.opt_state))
        arrays[f"train_{name}/step"] = np.asarray(new_state.step)
        arrays[f"train_{name}/rng"] = np.asarray(jax.random.key_data(new_state.rng))
        values[f"train_{name}_schedule"] = _jsonable(schedule)
    return arrays, values


# ------------------------------------------------------------------------------ what a case computes


def golden_images() -> tuple[np.ndarray, np.ndarray]:
    with np.load(GOLDEN / "images.npz") as data:
        return data["images"], data["labels"]


# A case's outputs in two parts, tested separately so that test workers can share a case's work (LOT's train
# step alone compiles for about as long as its certification): the part of a recorded key is its prefix.
PARTS = {
    "certify": ("radii/", "api/", "export/", "record", "api_info", "export_manifest"),
    "train": ("train_",),
}


def part_of(key: str) -> str:
    (part,) = [part for part, prefixes in PARTS.items() if key.startswith(prefixes)]
    return part


def compute_part(case: str, part: str, scratch: Path) -> tuple[dict, dict]:
    """The outputs of one part of `case`, computed by the current code (scratch: a fresh directory)."""
    workdir = scratch / "workdir"
    shutil.copytree(GOLDEN / case / "workdir", workdir)  # evaluation writes results and radii files
    if part == "train":
        return train_step_outputs(workdir)
    images, labels = golden_images()
    arrays, values = evaluate_record(workdir)
    model = restore_model(workdir)
    for part_arrays, part_values in (
        api_outputs(model, images, labels),
        export_outputs(model, scratch / "export", images, labels),
    ):
        arrays.update(part_arrays)
        values.update(part_values)
    return arrays, values


def compute_case(case: str, scratch: Path) -> tuple[dict, dict]:
    """Everything recorded for `case` (both parts; record.py stores this)."""
    arrays, values = {}, {}
    for part in PARTS:
        part_arrays, part_values = compute_part(case, part, scratch / part)
        arrays.update(part_arrays)
        values.update(part_values)
    return arrays, values


# ------------------------------------------------------------------------------ assertions


def recorded_in_full(key: str) -> bool:
    return not (key.startswith(DIGEST_PREFIXES) or any(part in key for part in DIGEST_PARTS))


def digest(array: np.ndarray) -> dict:
    return {"sha256": hashlib.sha256(array.tobytes()).hexdigest(), "dtype": str(array.dtype),
            "shape": list(array.shape)}  # fmt: skip


def _same_json(got, want, where: str) -> list[str]:
    """Exact equality of JSON values (floats bit for bit, NaN equal to NaN): the differing paths."""
    if isinstance(want, dict) and isinstance(got, dict):
        if sorted(got) != sorted(want):
            return [f"{where}: keys {sorted(got)} != {sorted(want)}"]
        return [d for k in want for d in _same_json(got[k], want[k], f"{where}.{k}")]
    if isinstance(want, list) and isinstance(got, list):
        if len(got) != len(want):
            return [f"{where}: length {len(got)} != {len(want)}"]
        return [d for i, (g, w) in enumerate(zip(got, want)) for d in _same_json(g, w, f"{where}[{i}]")]
    if isinstance(want, float) and isinstance(got, float) and math.isnan(want) and math.isnan(got):
        return []
    if type(got) is not type(want) or got != want:
        return [f"{where}: {got!r} != recorded {want!r}"]
    return []


# ------------------------------------------------------------------------------ recorded hosts
# The last bits of XLA:CPU's float reductions (Eigen's blocking follows the host's caches) and of
# numpy's LAPACK (OpenBLAS picks kernels per CPU) depend on the host, also with tests/conftest.py's AVX2
# cap: 8811d5e's own outputs differ in their last bits between the first recording's AVX-512 host and an
# AMD EPYC one. So the goldens hold one recording per kind of host we have run on, each made by 8811d5e's
# code from the same checkpoints (tests/golden/record.py): golden.npz/json for the first, and for each
# further host HOST golden-HOST.json (every value and digest) with golden-HOST.npz (only the arrays that
# differ from golden.npz). The current code passes when it reproduces one recording bit for bit.
RECORDING_TOLERANCE = 1e-5  # relative: a foreign host's last-bit differences, far below what a change moves


def recording_hosts(case: str) -> list[str]:
    """The hosts recorded for `case`: "" for golden.npz/json, then HOST for each golden-HOST.json."""
    others = sorted(p.stem[len("golden-") :] for p in (GOLDEN / case).glob("golden-*.json"))
    return ["", *others]


def recorded(case: str, host: str = "") -> tuple[dict, dict, dict]:
    """(arrays, digests, values) recorded for `case` on `host` ("" the first recording)."""
    with np.load(GOLDEN / case / "golden.npz") as data:
        arrays = {key: data[key] for key in data.files}
    name = f"golden-{host}" if host else "golden"
    if host:
        with np.load(GOLDEN / case / f"{name}.npz") as data:
            arrays.update({key: data[key] for key in data.files})
    values = json.loads((GOLDEN / case / f"{name}.json").read_text())
    return arrays, values.pop("digests"), values


@pytest.mark.parametrize("case", CASES)
def test_every_recorded_output_belongs_to_one_part(case):
    for host in recording_hosts(case):
        for record in recorded(case, host):
            for key in record:
                part_of(key)


def _bit_differences(got_arrays, got_values, want_arrays, want_digests, want_values, case) -> list[str]:
    """Every output of `got` not bit for bit the recorded one (-0.0 vs 0.0 and NaN payloads count too)."""
    missing = sorted({*want_arrays, *want_digests} - set(got_arrays))
    extra = sorted(set(got_arrays) - {*want_arrays, *want_digests})
    if missing or extra:
        return [f"{case}: outputs not computed {missing}, not recorded {extra}"]
    differences = [
        f"{case} {key}: differs from the recorded bits"
        for key, want in want_digests.items()
        if digest(np.asarray(got_arrays[key])) != want
    ]
    for key, want in want_arrays.items():
        got = np.asarray(got_arrays[key])
        if got.dtype != want.dtype or got.shape != want.shape:
            differences.append(f"{case} {key}: {got.dtype}{got.shape} != recorded {want.dtype}{want.shape}")
        elif got.tobytes() != want.tobytes():
            changed = np.flatnonzero(got.ravel() != want.ravel())
            differences.append(f"{case} {key}: {changed.size or 'no'} values differ (bits: all equal values)")
    return differences + _same_json(_jsonable(got_values), want_values, case)


def _close_json(got, want, where: str) -> list[str]:
    """As _same_json, numbers within RECORDING_TOLERANCE (relative)."""
    if isinstance(want, dict) and isinstance(got, dict) and sorted(got) == sorted(want):
        return [d for k in want for d in _close_json(got[k], want[k], f"{where}.{k}")]
    if isinstance(want, list) and isinstance(got, list) and len(got) == len(want):
        return [d for i, (g, w) in enumerate(zip(got, want)) for d in _close_json(g, w, f"{where}[{i}]")]
    if isinstance(want, float) and isinstance(got, float):
        if (
            math.isclose(got, want, rel_tol=RECORDING_TOLERANCE, abs_tol=1e-12)
            or got == want
            or (math.isnan(got) and math.isnan(want))
        ):
            return []
    return _same_json(got, want, where)


def _rounding_differences(got_arrays, got_values, want_arrays, want_values, case) -> list[str]:
    """Every output farther from the recorded one than a host's rounding: floats beyond
    RECORDING_TOLERANCE, any other dtype not equal (digests cannot be compared to a tolerance)."""
    differences = []
    for key, want in want_arrays.items():
        got = np.asarray(got_arrays[key])
        if np.issubdtype(want.dtype, np.floating):
            scale = np.max(np.abs(want), initial=0.0)
            close = np.allclose(got, want, rtol=RECORDING_TOLERANCE, atol=RECORDING_TOLERANCE * scale)
        else:
            close = np.array_equal(got, want)
        if not close:
            differences.append(f"{case} {key}: differs by more than rounding")
    return differences + _close_json(_jsonable(got_values), want_values, case)


@pytest.mark.parametrize("part", sorted(PARTS))
@pytest.mark.parametrize("case", CASES)
def test_golden_outputs_bit_for_bit(case, part, tmp_path):
    """Bit for bit equal to 8811d5e's outputs on one recorded host. On a host whose arithmetic matches no
    recording, the outputs must still agree with each recording to a host's rounding, and the test skips
    with how to record that host."""
    got_arrays, got_values = compute_part(case, part, tmp_path)
    by_host = {}
    for host in recording_hosts(case):
        want_arrays, want_digests, want_values = (
            {k: v for k, v in record.items() if part_of(k) == part} for record in recorded(case, host)
        )
        by_host[host or "first"] = (want_arrays, want_digests, want_values)
        if not _bit_differences(got_arrays, got_values, want_arrays, want_digests, want_values, case):
            return
    report = {}
    for host, (want_arrays, want_digests, want_values) in by_host.items():
        bits = _bit_differences(got_arrays, got_values, want_arrays, want_digests, want_values, case)
        missing = [line for line in bits if "outputs not computed" in line]
        report[host] = missing or _rounding_differences(
            got_arrays, got_values, want_arrays, want_values, case
        )
    lines = [f"[recorded on host {host}] {line}" for host, found in report.items() for line in found]
    assert not all(report.values()), "\n".join(lines[:40])
    pytest.skip(
        f"{case} {part}: equal to the recordings within {RECORDING_TOLERANCE:g} but bit for bit to none of "
        f"{len(by_host)} recorded hosts: record this host (tests/golden/record.py at 8811d5e)"
    )


def test_the_comparisons_catch_one_ulp_and_more_than_rounding():
    """The two comparisons above on a recorded case, doctored: one ulp is a bit difference but within a host's
    rounding; a change of 1e-3 is beyond it; an unchanged copy passes both."""
    arrays, _, values = recorded("lot")
    key, digests = "api/logits", {}  # the digests' arrays are not recorded in full
    assert not _bit_differences(arrays, values, arrays, digests, values, "lot")
    one_ulp = dict(arrays, **{key: np.nextafter(arrays[key], np.inf)})
    assert _bit_differences(one_ulp, values, arrays, digests, values, "lot")
    assert not _rounding_differences(one_ulp, values, arrays, values, "lot")
    moved = dict(arrays, **{key: arrays[key] * np.float32(1 + 1e-3)})
    found = _rounding_differences(moved, values, arrays, values, "lot")
    assert found == [f"lot {key}: differs by more than rounding"]
