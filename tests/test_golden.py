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


def evaluate_record(workdir: Path) -> tuple[dict, dict]:
    """`evaluate_checkpoint` on workdir (written to: pass a copy): every array of its radii file and its
    results record without the wall-clock time and the absolute radii path."""
    from certjax.evaluate import evaluate_checkpoint

    record = evaluate_checkpoint(str(workdir), "best", train_subset=TRAIN_SUBSET)
    with np.load(record["radii_path"]) as radii:
        arrays = {f"radii/{key}": radii[key] for key in radii.files}
    values = {k: v for k, v in record.items() if k not in ("time", "radii_path")}
    return arrays, {"record": _jsonable(values)}


def _model_outputs(prefix: str, model, images, labels) -> dict[str, np.ndarray]:
    """certify with labels (uint8 and float32 images), without labels, at half the eps; logits."""
    eps = float(model.info["eps"])
    floats = images.astype(np.float32) / np.float32(255)
    calls = {
        "certify": model.certify(images, labels=labels),
        "certify_float": model.certify(floats, labels=labels),
        "certify_nolabels": model.certify(images),
        "certify_half_eps": model.certify(images, eps=eps / 2, labels=labels),
    }
    arrays = {f"{prefix}/{call}/{k}": np.asarray(v) for call, out in calls.items() for k, v in out.items()}
    arrays[f"{prefix}/logits"] = np.asarray(model.logits(images))
    arrays[f"{prefix}/logits_float"] = np.asarray(model.logits(floats))
    return arrays


def restore_model(workdir: Path):
    """certjax.restore(workdir): the model `api_outputs` and `export_outputs` use."""
    import certjax

    return certjax.restore(str(workdir))


def api_outputs(model, images, labels) -> tuple[dict, dict]:
    """The restored model on the fixed images; its info without the workdir path."""
    info = {k: v for k, v in model.info.items() if k != "workdir"}
    return _model_outputs("api", model, images, labels), {"api_info": _jsonable(info)}


def export_outputs(model, out_dir: Path, images, labels) -> tuple[dict, dict]:
    """The export (CPU only) of the restored model, loaded with certjax.load_exported, on the fixed images;
    the manifest's numbers (not its hashes, paths or versions)."""
    import certjax
    from certjax.inference.export import export_model

    export_model(model, str(out_dir), platforms=("cpu",))
    exported = certjax.load_exported(str(out_dir))
    keep = ("family", "variant", "threat_model", "eps", "mean", "std", "dataset", "num_classes",
            "input_shape", "batch_size", "pair_lipschitz", "lipschitz")  # fmt: skip
    manifest = {k: exported.info[k] for k in keep}
    return _model_outputs("export", exported, images, labels), {"export_manifest": _jsonable(manifest)}


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


def recorded(case: str) -> tuple[dict, dict, dict]:
    """(arrays, digests, values) recorded for `case`."""
    with np.load(GOLDEN / case / "golden.npz") as data:
        arrays = {key: data[key] for key in data.files}
    values = json.loads((GOLDEN / case / "golden.json").read_text())
    return arrays, values.pop("digests"), values


@pytest.mark.parametrize("case", CASES)
def test_every_recorded_output_belongs_to_one_part(case):
    for record in recorded(case):
        for key in record:
            part_of(key)


@pytest.mark.parametrize("part", sorted(PARTS))
@pytest.mark.parametrize("case", CASES)
def test_golden_outputs_bit_for_bit(case, part, tmp_path):
    want_arrays, want_digests, want_values = (
        {k: v for k, v in record.items() if part_of(k) == part} for record in recorded(case)
    )
    got_arrays, got_values = compute_part(case, part, tmp_path)

    missing = sorted({*want_arrays, *want_digests} - set(got_arrays))
    extra = sorted(set(got_arrays) - {*want_arrays, *want_digests})
    assert not missing and not extra, f"{case}: outputs not computed {missing}, not recorded {extra}"
    for key, want in want_digests.items():
        assert digest(np.asarray(got_arrays[key])) == want, f"{case} {key}: differs from the recorded bits"
    for key, want in want_arrays.items():
        got = got_arrays[key]
        assert got.dtype == want.dtype and got.shape == want.shape, f"{case} {key}: {got.dtype}{got.shape}"
        # bit for bit: the bytes, so that -0.0 vs 0.0 and NaN payloads count too
        if got.tobytes() != want.tobytes():
            np.testing.assert_array_equal(got, want, err_msg=f"{case} {key}", strict=True)
            pytest.fail(f"{case} {key}: equal values but different bits")
    differences = _same_json(_jsonable(got_values), want_values, case)
    assert not differences, "\n".join(differences)
