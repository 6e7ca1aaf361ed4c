"""Evaluate a checkpoint: clean and certified accuracy on the full test set, radii, a results record.

Reads the config saved beside the checkpoint, so evaluation certifies exactly the trained model (same family,
normalisation and eps). Every evaluation appends one JSON line to `<workdir>/results.jsonl`, written to a
temporary file and renamed over the old one, so the results file is never half-written. Per-example radii go
to
`<workdir>/eval/radii_step<step>.npz` (input to the radius-distribution figures), together with
`prediction_radius`: the certified radius of the *predicted* class (equal to `radius` on correct points; on
incorrect ones, how robustly the model is wrong: seed paper Fig. 5). The record holds the certified accuracy
at a list of radii (`config.certify.radii`, default eps * (0, 0.5, 1, 1.5, 2); radius 0 = clean accuracy).
With interval bounds (`certify.method` ibp | both, the l_inf families) it also holds the certified accuracy by
the margin alone and by IBP alone, at eps and at every radius, next to the method's own (`certify_method`).
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile

import jax
import numpy as np

from certjax import checkpoints
from certjax.data import pipeline
from certjax.data.sources import SubsetSource, subset_indices
from certjax.writers import console


def atomic_write_bytes(path: str, payload: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def append_record(path: str, record: dict) -> None:
    """Append one JSON line: old contents + new line written to a temp file, then renamed atomically."""
    old = b""
    if os.path.exists(path):
        with open(path, "rb") as f:
            old = f.read()
        if old and not old.endswith(b"\n"):
            old += b"\n"
    atomic_write_bytes(path, old + (json.dumps(record, sort_keys=True) + "\n").encode())


def save_radii(path: str, results: dict[str, np.ndarray]) -> None:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **results)
    atomic_write_bytes(path, buffer.getvalue())


DEFAULT_RADIUS_FACTORS = (0.0, 0.5, 1.0, 1.5, 2.0)


def certified_accuracy_at(correct, radius, radii) -> dict[str, float]:
    """{f"{r:.6g}": fraction of points correct with certified radius > r} (r = 0: clean accuracy).

    Strict '>' as the certifier's own flag (a point exactly on the boundary is not certified); keys are
    strings because the record is JSON."""
    correct = np.asarray(correct, bool)
    radius = np.asarray(radius, np.float64)
    out = {}
    for r in radii:
        r = float(r)
        hit = correct if r == 0.0 else correct & (radius > r)
        out[f"{r:.6g}"] = float(hit.mean()) if len(hit) else float("nan")
    return out


def by_method_records(exp, results, radii) -> dict:
    """With interval bounds (certify.method ibp | both): certified accuracy by the margin alone, by IBP alone
    and combined, at certify.eps and at every radius; `certified_at` then holds the method's own figures
    (combined for both: correct and margin radius > r, or IBP-certified at r)."""
    if "ibp_certified_at" not in results:
        return {}
    correct = np.asarray(results["correct"], bool)
    ibp_radii = exp.ibp_radii()
    ibp_at = {}
    for r in radii:
        r = float(r)
        key = f"{r:.6g}"
        ibp_at[key] = correct if r == 0.0 else np.asarray(results["ibp_certified_at"])[:, ibp_radii.index(r)]
    margin_at = certified_accuracy_at(correct, results["radius"], radii)
    margin_hit = {f"{float(r):.6g}": correct & (np.asarray(results["radius"]) > float(r)) for r in radii}
    combined = {
        key: float(np.mean(ibp_at[key] if exp.certify_method == "ibp" else margin_hit[key] | ibp_at[key]))
        for key in ibp_at
    }
    return {
        "certified_accuracy_margin": float(np.mean(results["certified_margin"])),
        "certified_accuracy_ibp": float(np.mean(results["certified_ibp"])),
        "certified_at_margin": margin_at,
        "certified_at_ibp": {key: float(np.mean(hit)) for key, hit in ibp_at.items()},
        "certified_at": combined,
    }


def radii_of(config) -> list[float]:
    """config.certify.radii if given, else eps times DEFAULT_RADIUS_FACTORS (pixel units)."""
    radii = config.certify.get("radii", None)
    if radii:
        return [float(r) for r in radii]
    return [float(config.certify.eps) * f for f in DEFAULT_RADIUS_FACTORS]


def evaluate_checkpoint(workdir: str, which: str = "best", train_subset: int = 10_000) -> dict:
    """Certify the test set with the chosen checkpoint; print and record the results."""
    from certjax.train import (
        Experiment,
    )  # import here: train imports this module's helpers indirectly

    manager = checkpoints.make_manager(workdir, read_only=True)
    step = checkpoints.select_step(manager, which)
    config = checkpoints.restore_config(manager, step)
    exp = Experiment(config, need_train_data=False)
    state = checkpoints.restore_state(manager, step, exp.abstract_restore_target())
    saved_metrics = manager.metrics(step) or {}
    best = checkpoints.best_step(manager)
    best_epoch = int((manager.metrics(best) or {}).get("epoch", 0)) if best is not None else 0
    last_epoch = int((manager.metrics(manager.latest_step()) or {}).get("epoch", 0))
    manager.close()

    test_batches = pipeline.eval_batches(exp.sources.test, config.train.eval_batch_size)
    results = exp.certify_batches(state.params, state.model_state, test_batches, every_radius=True)
    clean = float(results["correct"].mean())
    certified = float(results["certified"].mean())
    bounds_report = dict(exp.last_bounds_report)

    # Training accuracy (for the generalisation gap) on a fixed random subset of the real training images:
    # image-folder sources are ordered by class, so their first N would be a few classes only.
    train = pipeline.make_sources(config, need_train=True, need_generated=False).train
    if train_subset and train_subset < len(train):
        train = SubsetSource(train, subset_indices(len(train), train_subset, "random", config.seed))
    train_eval = exp.evaluate_source(state, train)

    radii_path = os.path.join(os.path.abspath(workdir), "eval", f"radii_step{step}.npz")
    if jax.process_index() == 0:
        save_radii(radii_path, results)
    generated_count = 0
    if config.data.get("generated", ""):
        from certjax.data.sources import GeneratedNpzSource

        generated_count = len(
            GeneratedNpzSource(
                config.data.generated,
                exp.num_classes,
                limit=config.data.get("generated_limit", 0) or None,
                seed=config.seed,
            )
        )
    record = {
        "family": config.get("family", config.model.name),
        "threat_model": exp.family.threat_model,
        "variant": config.get("variant", ""),
        "dataset": config.data.dataset,
        "aux_amount": generated_count,
        "generated_path": config.data.get("generated", ""),
        "real_fraction": float(config.data.real_fraction) if generated_count else 1.0,
        "real_subset": int(config.data.get("real_subset", 0)),
        "epochs": int(config.train.epochs),
        "seed": int(config.seed),
        "eps": float(config.certify.eps),
        "checkpoint": which,
        "step": int(step),
        "epoch": int(saved_metrics.get("epoch", 0)),
        "best_epoch": best_epoch,
        "last_epoch": last_epoch,
        "clean_accuracy": clean,
        "certified_accuracy": certified,
        "train_clean_accuracy": train_eval["clean_accuracy"],
        "train_certified_accuracy": train_eval["certified_accuracy"],
        "train_accuracy_last_epoch": float(saved_metrics.get("train_accuracy", float("nan"))),
        "num_test": int(len(results["label"])),
        "certify_method": exp.certify_method,
        "certified_at": certified_accuracy_at(results["correct"], results["radius"], radii_of(config)),
        **by_method_records(exp, results, radii_of(config)),
        # Families with measured bounds (LOT, LiResNet): certified accuracy under the bound the architecture
        # promises (e.g. exactly orthogonal layers) next to the measured one above, and the measured figures.
        **(
            {"certified_accuracy_assumed": float(results["certified_assumed"].mean())}
            if "certified_assumed" in results
            else {}
        ),
        **({"lipschitz": bounds_report} if bounds_report else {}),
        "radii_path": radii_path,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if jax.process_index() == 0:
        append_record(os.path.join(workdir, "results.jsonl"), record)
    console(
        f"evaluate {which} checkpoint (step {step}, epoch {record['epoch']}): "
        f"clean accuracy {clean:.4f}, certified accuracy {certified:.4f} at eps "
        f"{config.certify.eps:.5f} ({record['num_test']} test images); train clean "
        f"{train_eval['clean_accuracy']:.4f}"
    )
    if "certified_accuracy_ibp" in record:
        console(
            f"  certified by the margin {record['certified_accuracy_margin']:.4f}, by interval bounds "
            f"{record['certified_accuracy_ibp']:.4f}, {exp.certify_method}: {certified:.4f}"
        )
    if "certified_accuracy_assumed" in record:
        console(
            f"  measured Lipschitz bound of the body {bounds_report['lipschitz_body_measured']:.6f}"
            f" (assumed {bounds_report['lipschitz_body_assumed']}); certified accuracy with the "
            f"assumed bound {record['certified_accuracy_assumed']:.4f}"
        )
    return record
