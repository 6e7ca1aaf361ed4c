"""Evaluate a checkpoint: clean and certified accuracy on the full test set, radii, a results record.

Reads the config saved beside the checkpoint, so evaluation certifies exactly the trained model (same family,
normalisation and eps). Every evaluation writes one JSON line to `<workdir>/results.jsonl`, replacing the
line of an earlier evaluation of the same checkpoint kind and step (certjax.outputs.append_record: the whole
file goes to a temporary file renamed over the old one, so it is never half-written). Per-example arrays go
to `<workdir>/eval/radii_step<step>.npz` (input to the radius-distribution figures; its names and their
meaning: certjax/radii_file.py): `radius`, the certified radius of the prediction, `certified_radius`, the
same on correct points and 0 on the others, `certified`, correct and robust at eps. The record's certified
accuracy is the fraction of test points certified (correct and robust); it holds that at a list of radii too
(`config.certify.radii`, default eps * (0, 0.5, 1, 1.5, 2); radius 0 = clean accuracy). With interval bounds
(`certify.method` ibp | both, the l_inf families) it also holds the certified accuracy by the margin alone and
by IBP alone, at eps and at every radius, next to the method's own (`certify_method`).
"""

from __future__ import annotations

import datetime
import os

import jax
import numpy as np

from certjax.certify.certifier import radii_of
from certjax.data import pipeline
from certjax.data.sources import SubsetSource, subset_indices
from certjax.experiment import Experiment
from certjax.outputs import append_record, atomic_write_bytes
from certjax.radii_file import radii_arrays
from certjax.writers import console


def save_radii(path: str, results: dict[str, np.ndarray]) -> None:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **results)
    atomic_write_bytes(path, buffer.getvalue())


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


def by_method_records(certifier, results, radii) -> dict:
    """With interval bounds (certify.method ibp | both): certified accuracy by the margin alone, by IBP alone
    and combined, at certify.eps and at every radius; `certified_at` then holds the method's own figures
    (combined for both: correct and margin radius > r, or IBP-certified at r)."""
    if "ibp_certified_at" not in results:
        return {}
    correct = np.asarray(results["correct"], bool)
    ibp_radii = certifier.ibp_radii()
    ibp_at = {}
    for r in radii:
        r = float(r)
        key = f"{r:.6g}"
        ibp_at[key] = correct if r == 0.0 else np.asarray(results["ibp_certified_at"])[:, ibp_radii.index(r)]
    margin_at = certified_accuracy_at(correct, results["radius"], radii)
    margin_hit = {f"{float(r):.6g}": correct & (np.asarray(results["radius"]) > float(r)) for r in radii}
    combined = {
        key: float(
            np.mean(ibp_at[key] if certifier.certify_method == "ibp" else margin_hit[key] | ibp_at[key])
        )
        for key in ibp_at
    }
    return {
        "certified_accuracy_margin": float(np.mean(results["certified_margin"])),
        "certified_accuracy_ibp": float(np.mean(results["certified_ibp"])),
        "certified_at_margin": margin_at,
        "certified_at_ibp": {key: float(np.mean(hit)) for key, hit in ibp_at.items()},
        "certified_at": combined,
    }


def evaluate_checkpoint(workdir: str, which: str = "best", train_subset: int = 10_000) -> dict:
    """Certify the test set with the chosen checkpoint; print and record the results.

    Args:
      workdir: the training workdir.
      which: "best", "last" or a step.
      train_subset: size of the fixed random subset of real training images for the train accuracy (0: all).
    Returns:
      the results record (also written to <workdir>/results.jsonl, replacing one of the same checkpoint
      kind and step).
    """
    exp, state, info = Experiment.from_checkpoint(workdir, which, data="test")
    config, certifier = exp.config, exp.certifier
    batch_size = config.train.eval_batch_size
    test_batches = pipeline.eval_batches(exp.sources.test, batch_size)
    results = certifier.certify_batches(
        state.params,
        state.model_state,
        test_batches,
        every_radius=True,
        total=-(-len(exp.sources.test) // batch_size),
    )
    bounds_report = dict(certifier.last_bounds_report)

    # Training accuracy (for the generalisation gap) on a fixed random subset of the real training images:
    # image-folder sources are ordered by class, so their first N would be a few classes only.
    train = pipeline.make_sources(config, need_train=True, need_generated=False).train
    if train_subset and train_subset < len(train):
        train = SubsetSource(train, subset_indices(len(train), train_subset, "random", config.seed))
    train_eval = certifier.evaluate_source(state, train, what="evaluate (training images)")

    radii_path = os.path.join(os.path.abspath(workdir), "eval", f"radii_step{info.step}.npz")
    if jax.process_index() == 0:
        save_radii(radii_path, radii_arrays(results))
    record = results_record(exp, which, info, results, train_eval, bounds_report)
    record["radii_path"] = radii_path
    record["time"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if jax.process_index() == 0:
        append_record(os.path.join(workdir, "results.jsonl"), record)
    _print_record(record, which, bounds_report)
    return record


def _generated_count(exp) -> int:
    config = exp.config
    if not config.data.get("generated", ""):
        return 0
    from certjax.data.sources import GeneratedNpzSource

    limit = config.data.get("generated_limit", 0) or None
    cache_dir = config.data.get("cache_dir", "")
    source = GeneratedNpzSource(
        config.data.generated,
        exp.num_classes,
        limit=limit,
        seed=config.seed,
        image_shape=exp.image_shape,  # the model's (64 x 64 for Tiny-ImageNet), not CIFAR's default
        cache_dir=cache_dir,
    )
    return len(source)


def results_record(exp, which: str, info, results: dict, train_eval: dict, bounds_report: dict) -> dict:
    """The results record of one evaluation (without its radii path and time)."""
    config = exp.config
    generated_count = _generated_count(exp)
    radii = radii_of(config)
    return {
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
        "step": int(info.step),
        "epoch": int(info.metrics.get("epoch", 0)),
        "best_epoch": info.best_epoch,
        "last_epoch": info.last_epoch,
        "clean_accuracy": float(results["correct"].mean()),
        "certified_accuracy": float(results["certified"].mean()),
        "train_clean_accuracy": train_eval["clean_accuracy"],
        "train_certified_accuracy": train_eval["certified_accuracy"],
        "train_accuracy_last_epoch": float(info.metrics.get("train_accuracy", float("nan"))),
        "num_test": int(len(results["label"])),
        "certify_method": exp.certify_method,
        # how the layers were bounded (certify.bound_method), for families with measured bounds
        **({"bound_method": bounds_report["bound_method"]} if "bound_method" in bounds_report else {}),
        "certified_at": certified_accuracy_at(results["correct"], results["radius"], radii),
        **by_method_records(exp.certifier, results, radii),
        # Families with measured bounds (LOT, LiResNet): certified accuracy under the bound the architecture
        # promises (e.g. exactly orthogonal layers) next to the measured one above, and the measured figures.
        **(
            {"certified_accuracy_assumed": float(results["certified_assumed"].mean())}
            if "certified_assumed" in results
            else {}
        ),
        **({"lipschitz": bounds_report} if bounds_report else {}),
    }


def _print_record(record: dict, which: str, bounds_report: dict) -> None:
    clean, certified = record["clean_accuracy"], record["certified_accuracy"]
    console(
        f"evaluate {which} checkpoint (step {record['step']}, epoch {record['epoch']}): "
        f"clean accuracy {clean:.4f}, certified accuracy {certified:.4f} at eps "
        f"{record['eps']:.5f} ({record['num_test']} test images); train clean "
        f"{record['train_clean_accuracy']:.4f}"
    )
    if "certified_accuracy_ibp" in record:
        console(
            f"  certified by the margin {record['certified_accuracy_margin']:.4f}, by interval bounds "
            f"{record['certified_accuracy_ibp']:.4f}, {record['certify_method']}: {certified:.4f}"
        )
    if "certified_accuracy_assumed" in record:
        console(
            f"  measured Lipschitz bound of the body {bounds_report['lipschitz_body_measured']:.6f}"
            f" (assumed {bounds_report['lipschitz_body_assumed']}); certified accuracy with the "
            f"assumed bound {record['certified_accuracy_assumed']:.4f}"
        )
