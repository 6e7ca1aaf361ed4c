"""Labels of a generated file, scored by a model trained on the real data (issue 25, part 2).

A generated `.npz` (`image`, `label`) says nothing about what its labels mean: DM-Improves-AT's 1M generated
Tiny-ImageNet set, for one, documents no class mapping, and Tiny-ImageNet's label k is the rank of its wnid
in sorted order. Mixed into training with permuted labels, such a file ruins a run without any error.
`certjax check-labels` (certjax/cli.py) predicts the file's images with a model trained on the real data
(`certjax.restore`) and writes a report (`check_labels`); `check_training_labels` reads it before a run
trains on the file.

- agreement: the fraction of images whose predicted class is the file's label. For a correctly labelled file
  it is about the model's clean test accuracy (the reference, `reference_accuracy`); a wrong mapping of a
  fraction f of the classes brings it down to about (1 - f) times that.
- pass: agreement >= min_label_agreement x reference (config `data.min_label_agreement`, default 0.5: a run
  stops when about half the classes or more are mislabelled, while a generator whose images are harder for
  the model than the real test images still passes).
- best permutation: the assignment of file labels to predicted classes that maximises agreement (Kuhn 1955,
  the Hungarian method, on the confusion matrix: scipy.optimize.linear_sum_assignment). It "looks permuted"
  (a WARNING) when it agrees at least twice as often as the identity and at least 0.2 more
  (`looks_permuted`); the report's `best_permutation.relabel` maps an old label to the class it most
  likely is (new label = relabel[old label]).

A report belongs to one file by content: its fingerprint (`file_fingerprint`) hashes the CRC-32 and size
that the .npz's zip directory records for `image.npy` and `label.npy`, so a copied file keeps its report and a
relabelled one needs a new check, without reading gigabytes.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from certjax.data.sources import DataError, GeneratedNpzSource, dataset_info
from certjax.data.sources.npz import user_cache_dir

REPORT_VERSION = 1
DEFAULT_MIN_AGREEMENT = 0.5  # configs/common.py data.min_label_agreement; the module docstring says why
# The best permutation looks like the file's true mapping when it agrees at least this many times as often
# as the identity and at least this much more (a few noisy classes of a weak model move by less).
PERMUTED_RATIO, PERMUTED_GAIN = 2.0, 0.2
MIN_CLASS_IMAGES = 10  # a class with fewer images is never named as moved: its agreement is noise
SHOWN_CLASSES = 10  # the printout's lowest per-class agreements; the report holds every class
SUBSET_SEED = 0  # --limit's fixed random subset
CHUNK_BATCHES = 16  # images read from the file per call of the model, in batches


# ---------------------------------------------------------------------------------------------- the file


def file_fingerprint(path) -> str:
    """A content fingerprint of a generated .npz: sha256 of the CRC-32 and size its zip directory records for
    image.npy and label.npy (written by np.savez / savez_compressed alike; nothing is decompressed).

    Args:
      path: the .npz.
    Returns:
      "sha256:<hex>"; a DataError when the file is not a readable .npz with both arrays.
    """
    try:
        with zipfile.ZipFile(Path(path).expanduser()) as zf:
            members = {info.filename: info for info in zf.infolist()}
    except (OSError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: not a readable .npz ({e})") from e
    parts = []
    for name in ("image.npy", "label.npy"):
        if name not in members:
            raise DataError(f"{path}: no {name} in the file; a generated .npz holds image and label")
        parts.append(f"{name}:{members[name].CRC:08x}:{members[name].file_size}")
    return "sha256:" + hashlib.sha256(";".join(parts).encode()).hexdigest()


def default_report_path(npz) -> Path:
    """Where a report of `npz` goes: <file>.labels.json beside it when that folder is writable, else
    <name>-<hash of its path>.labels.json in the user's cache folder (certjax.data.sources.npz)."""
    npz = Path(npz).expanduser()
    if os.access(npz.parent, os.W_OK):
        return npz.with_name(npz.name + ".labels.json")
    key = hashlib.sha1(str(npz.resolve()).encode()).hexdigest()[:16]
    return user_cache_dir() / f"{npz.stem}-{key}.labels.json"


def find_report(npz) -> Path | None:
    """The report of `npz` where check-labels writes it by default: beside the file, then the cache."""
    npz = Path(npz).expanduser()
    key = hashlib.sha1(str(npz.resolve()).encode()).hexdigest()[:16]
    for path in (
        npz.with_name(npz.name + ".labels.json"),
        user_cache_dir() / f"{npz.stem}-{key}.labels.json",
    ):
        if path.is_file():
            return path
    return None


# -------------------------------------------------------------------------------------------- the scores


def looks_permuted(identity: float, permuted: float) -> bool:
    """Whether agreement `permuted` under the best permutation beats `identity` by a wide margin."""
    return permuted >= PERMUTED_RATIO * identity and permuted - identity >= PERMUTED_GAIN


def score_labels(labels, predictions, num_classes: int, class_names=None) -> dict:
    """Agreement of a file's labels with a model's predictions, per class and under the best permutation.

    Args:
      labels: [N] the file's labels in [0, num_classes).
      predictions: [N] the model's predicted classes.
      num_classes: C.
      class_names: C names, or None.
    Returns:
      {"images", "agreement", "confusion" (C x C counts, rows the file's label, columns the prediction),
      "per_class" (one dict per class), "best_permutation" ({"agreement", "relabel", "looks_permuted",
      "moved"})}.
    """
    from scipy.optimize import linear_sum_assignment

    labels, predictions = np.asarray(labels, np.int64), np.asarray(predictions, np.int64)
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    total = max(len(labels), 1)
    rows, relabel = linear_sum_assignment(confusion, maximize=True)  # rows come back as 0 .. C-1
    identity = float(np.trace(confusion)) / total
    permuted = float(confusion[rows, relabel].sum()) / total
    per_class, moved = [], []
    for k in range(num_classes):
        count = int(confusion[k].sum())
        own = confusion[k, k] / count if count else None
        to = confusion[k, relabel[k]] / count if count else None
        entry = {
            "label": k,
            "name": class_names[k] if class_names else str(k),
            "images": count,
            "agreement": None if own is None else float(own),
            "most_predicted": int(confusion[k].argmax()) if count else None,
            "most_predicted_share": float(confusion[k].max() / count) if count else None,
            "relabel_to": int(relabel[k]),
            "permuted_agreement": None if to is None else float(to),
        }
        per_class.append(entry)
        # moved: k's images go to another class, and most of that class's predictions are k's images (a
        # weak model that predicts one class for everything moves nothing)
        claimed = confusion[k, relabel[k]] >= 0.5 * confusion[:, relabel[k]].sum()
        if count >= MIN_CLASS_IMAGES and relabel[k] != k and claimed and looks_permuted(own, to):
            moved.append({"label": k, "to": int(relabel[k]), "agreement": float(own), "permuted": float(to)})
    return {
        "images": len(labels),
        "agreement": identity,
        "confusion": confusion.tolist(),
        "per_class": per_class,
        "best_permutation": {
            "agreement": permuted,
            "relabel": [int(r) for r in relabel],
            "looks_permuted": looks_permuted(identity, permuted),
            "moved": moved,
        },
    }


def reference_accuracy(model) -> tuple[float | None, str]:
    """The checking model's clean test accuracy and where it was read: the run's results.jsonl record of the
    same step (the whole test set), else the metrics saved with the checkpoint (train.eval_subset test
    images), else (None, why). Nothing is computed: the test set need not be at hand."""
    from certjax import checkpoints

    workdir, step = model.info["workdir"], model.info["step"]
    results = os.path.join(workdir, "results.jsonl")
    if os.path.isfile(results):
        with open(results) as f:
            records = [_json_or_none(line) for line in f]
        records = [
            r for r in records if isinstance(r, dict) and r.get("step") == step and "clean_accuracy" in r
        ]
        if records:
            count = records[-1].get("num_test", "all")
            return float(records[-1]["clean_accuracy"]), f"{results}, step {step}, {count} test images"
    manager = checkpoints.make_manager(workdir, read_only=True)
    try:
        metrics = dict(manager.metrics(step) or {})
    finally:
        manager.close()
    if "clean_accuracy" in metrics:
        subset = int(model.config.train.get("eval_subset", 0))
        images = f"{subset} test images" if subset else "all test images"
        return float(metrics["clean_accuracy"]), f"metrics of checkpoint step {step}, {images}"
    return None, f"no clean accuracy recorded in {workdir} for step {step}"


def _json_or_none(line: str):
    try:
        return json.loads(line)
    except ValueError:
        return None


# ----------------------------------------------------------------------------------------------- the check


def open_generated(path, model, limit: int = 0) -> GeneratedNpzSource:
    """The generated file as the model sees it: its image shape and class count, a DataError naming both."""
    info = model.info
    try:
        return GeneratedNpzSource(
            path, info["num_classes"], limit=limit or None, seed=SUBSET_SEED, image_shape=info["input_shape"]
        )
    except DataError as e:
        shape = " x ".join(map(str, info["input_shape"]))
        raise DataError(
            f"{e} (the checking model, {info['workdir']}, takes {info['dataset']} images of {shape} in "
            f"{info['num_classes']} classes: check the file with a model trained on its dataset)"
        ) from None


def predict_source(model, source) -> np.ndarray:
    """The model's predicted class of every image of `source`, read a chunk at a time (never whole).
    The argmax of `model.logits`: the certifying forward whose argmax `certify` reports as its prediction,
    without the certificates' extra work."""
    from certjax.progress import Progress

    chunk, predictions = CHUNK_BATCHES * model.batch_size, []
    with Progress("check-labels", len(source), unit="images") as progress:
        for start in range(0, len(source), chunk):
            images, _ = source.read(np.arange(start, min(start + chunk, len(source))))
            predictions.append(np.argmax(model.logits(images), axis=-1))
            progress.update(len(images))
    return np.concatenate(predictions).astype(np.int32)


def check_labels(
    workdir: str,
    generated: str,
    checkpoint: str = "best",
    limit: int = 0,
    batch_size: int = 0,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
) -> dict:
    """Score the labels of a generated file with a model trained on the real data.

    Args:
      workdir: the checking run (its checkpoints; certjax.restore).
      generated: the .npz (image uint8 [N, H, W, C] of the model's shape, label [N] of its classes).
      checkpoint: "best", "last" or a step of workdir.
      limit: check a fixed random subset of this many images (seed SUBSET_SEED); 0 = all.
      batch_size: images per forward (0: the checkpoint's train.eval_batch_size).
      min_agreement: the pass threshold, a fraction of the reference accuracy.
    Returns:
      The report (README, "Train": its fields); write it with `write_report`.
    """
    import certjax

    model = certjax.restore(workdir, checkpoint)
    if batch_size:
        model.batch_size = int(batch_size)
    source = open_generated(generated, model, limit)
    info = model.info
    names = dataset_info(info["dataset"]).class_names
    scores = score_labels(source.labels, predict_source(model, source), info["num_classes"], names)
    clean, clean_source = reference_accuracy(model)
    reference = clean if clean is not None else scores["best_permutation"]["agreement"]
    required = min_agreement * reference
    path = Path(generated).expanduser()
    stat = path.stat()
    return {
        "version": REPORT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "file": {
            "path": str(path.resolve()),
            "size": stat.st_size,
            "mtime": stat.st_mtime,
            "fingerprint": file_fingerprint(path),
            "images_in_file": int(source.file_images.shape[0]),
            "limit": int(limit),
            "seed": SUBSET_SEED,
        },
        "model": {k: info[k] for k in ("workdir", "checkpoint", "step", "family", "variant", "dataset")}
        | {
            "num_classes": info["num_classes"],
            "clean_accuracy": clean,
            "clean_accuracy_source": clean_source,
        },
        "reference_accuracy": reference,
        "reference": "clean_accuracy" if clean is not None else "best_permutation",
        "min_label_agreement": float(min_agreement),
        "required_agreement": required,
        "passed": scores["agreement"] >= required,
        **scores,
    }


def write_report(report: dict, out: str = "") -> Path:
    """Write `report` as JSON to `out` ("" = default_report_path of its file); returns the path."""
    from certjax.outputs import atomic_write_bytes

    path = Path(out).expanduser() if out else default_report_path(report["file"]["path"])
    try:
        atomic_write_bytes(str(path), (json.dumps(report, indent=1) + "\n").encode())
    except OSError as e:
        raise DataError(f"cannot write the label report to {path} ({e}); pass --out=PATH") from e
    return path


def report_lines(report: dict, path) -> list[str]:
    """The printout of a report: the verdict, the best permutation, the lowest classes, warnings."""
    file, model, best = report["file"], report["model"], report["best_permutation"]
    count, agreement, reference = report["images"], report["agreement"], report["reference_accuracy"]
    subset = f"a random {count:,} of {file['images_in_file']:,}" if file["limit"] else f"all {count:,}"
    if model["clean_accuracy"] is not None:
        scale = f"the model's clean test accuracy {reference:.3f} ({model['clean_accuracy_source']})"
    else:
        scale = (
            f"the model's clean test accuracy is unknown ({model['clean_accuracy_source']}): the best "
            f"permutation's agreement {reference:.3f} is the scale"
        )
    verdict = "PASS" if report["passed"] else "FAIL"
    lines = [
        f"labels of {file['path']} ({subset} images) against the predictions of {model['family']}:"
        f"{model['variant']} step {model['step']} of {model['workdir']} ({model['dataset']}, "
        f"{model['num_classes']} classes)",
        f"agreement {agreement:.3f} (predicted class == file label); {scale}",
        f"{verdict}: agreement {agreement:.3f} {'>=' if report['passed'] else '<'} "
        f"{report['required_agreement']:.3f} required (min_label_agreement {report['min_label_agreement']:g} "
        f"x {reference:.3f})"
        + (
            ""
            if report["passed"]
            else "; a run with this file stops unless --config.data.min_label_agreement=0"
        ),
    ]
    present = [c for c in report["per_class"] if c["images"]]
    changed = sum(c["relabel_to"] != c["label"] for c in present)
    lines.append(
        f"best permutation of the file's labels: agreement {best['agreement']:.3f} (identity "
        f"{agreement:.3f}); it relabels {changed} of the {len(present)} labels present"
    )
    lines.append(
        f"lowest per-class agreement ({min(SHOWN_CLASSES, len(present))} of {len(present)} classes; all in "
        "the report):"
    )
    for c in sorted(present, key=lambda c: (c["agreement"], c["label"]))[:SHOWN_CLASSES]:
        most = report["per_class"][c["most_predicted"]]["name"]
        lines.append(
            f"  {c['label']:>4} {c['name']}: {c['agreement']:.3f} of {c['images']:,} images; predicted "
            f"mostly as {c['most_predicted']} {most} ({c['most_predicted_share']:.2f})"
        )
    if best["looks_permuted"]:
        lines.append(
            f"WARNING: the labels look permuted: relabelled by the best permutation they agree "
            f"{best['agreement']:.3f}, as given {agreement:.3f}, so the file's label k is probably not the "
            "dataset's class k; relabel with the report's best_permutation.relabel (new label = relabel[old "
            "label]) and check again"
        )
    if best["moved"] and not best["looks_permuted"]:  # a few classes swapped, the rest right
        shown = ", ".join(
            f"{m['label']} -> {m['to']} ({m['agreement']:.2f} -> {m['permuted']:.2f})"
            for m in best["moved"][:8]
        )
        lines.append(
            f"WARNING: {len(best['moved'])} label(s) look moved to another class: {shown} "
            "(best_permutation.moved)"
        )
    if reference < 2 / model["num_classes"]:
        lines.append(
            f"note: the reference accuracy {reference:.3f} is near chance (1/{model['num_classes']}): the "
            "check cannot tell good labels from bad; check with a better-trained model"
        )
    lines.append(f"report: {path}")
    return lines


# ------------------------------------------------------------------------------------------- before a run


def read_report(path) -> dict:
    """A check-labels report, or a DataError naming the file and the fix."""
    try:
        with open(path) as f:
            report = json.load(f)
        problem = "" if isinstance(report, dict) else "not a JSON object"
    except (OSError, ValueError) as e:
        report, problem = {}, f"{type(e).__name__}: {e}"
    missing = [k for k in ("agreement", "reference_accuracy", "file") if k not in report]
    if not problem and (
        missing or not isinstance(report["file"], dict) or "fingerprint" not in report["file"]
    ):
        problem = f"no {', '.join(missing) or 'file.fingerprint'}"
    if problem:
        raise DataError(
            f"{path}: not a readable certjax check-labels report ({problem}); delete it or write it again "
            "with certjax check-labels"
        )
    return report


def _mismatch(report: dict, generated, num_classes: int) -> str:
    """Why `report` is not a report of this file for this run ("" when it is)."""
    if report["file"]["fingerprint"] != file_fingerprint(generated):
        return f"it is of another file ({report['file'].get('path')}) or of an earlier version of {generated}"
    made = report.get("model", {}).get("num_classes")
    if made != num_classes:
        return f"it was made with a model of {made} classes, this run has {num_classes}"
    return ""


def _warn(message: str) -> None:
    """One line on stderr, from process 0 (the run's output stays one line per epoch on stdout)."""
    import sys

    import jax

    if jax.process_index() == 0:
        print(f"certjax: warning: {message}", file=sys.stderr, flush=True)


def check_training_labels(config, num_classes: int) -> None:
    """Before a run trains on `config.data.generated`: stop on a label report of that file below
    `data.min_label_agreement` (a DataError, one line naming the report, the agreement, the override and the
    relabel hint), or warn in one line recommending `certjax check-labels` when there is no report.

    Args:
      config: the run's config (data.generated, data.label_report, data.min_label_agreement).
      num_classes: the run's classes (a report made with a model of another dataset does not count).
    """
    from certjax.writers import console

    data = config.data
    generated = data.get("generated", "")
    if not generated:
        return
    threshold = float(data.get("min_label_agreement", DEFAULT_MIN_AGREEMENT))
    explicit = data.get("label_report", "")
    if explicit and not Path(explicit).expanduser().is_file():
        raise DataError(f"data.label_report={explicit}: no such file (a JSON report of certjax check-labels)")
    path = Path(explicit).expanduser() if explicit else find_report(generated)
    hint = (
        f"certjax check-labels --workdir=<a run trained on the real {data.dataset}> --generated={generated}"
    )
    if path is None:
        _warn(f"{generated}: no label report; check that its labels are the dataset's classes with {hint}")
        return
    report = read_report(path)
    mismatch = _mismatch(report, generated, num_classes)
    if mismatch and explicit:
        raise DataError(f"data.label_report={explicit}: {mismatch}; check the file again with {hint}")
    if mismatch:
        _warn(f"{path}: not a label report of this file ({mismatch}); check it again with {hint}")
        return
    agreement, reference = float(report["agreement"]), float(report["reference_accuracy"])
    required = threshold * reference
    said = f"agreement {agreement:.3f} with the model's predictions (report {path})"
    if agreement >= required and (threshold or report.get("passed", True)):
        console(f"{generated}: labels checked: {said}, >= {required:.3f} required")
        return
    if not threshold:  # the check is off: say that the report failed at its own threshold, and go on
        _warn(f"{generated}: labels failed their check ({said}); training anyway: data.min_label_agreement=0")
        return
    permuted = report.get("best_permutation", {})
    likely = (
        f"; its best permutation agrees {permuted['agreement']:.3f}: its label k is probably not class k"
        if permuted.get("looks_permuted")
        else ""
    )
    raise DataError(
        f"{generated}: its labels failed the label check: {said}, below the {required:.3f} required "
        f"(data.min_label_agreement={threshold:g} x reference accuracy {reference:.3f}){likely}. Relabel the "
        "file with the report's best_permutation.relabel (new label = relabel[old label]) and check it "
        "again, or train anyway with --config.data.min_label_agreement=0"
    )
