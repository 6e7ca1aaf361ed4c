"""`launch.py --mode=certify`: certify the images in a folder, zip, .npz or image file; one row per image.

Rows go to JSON Lines (`.jsonl`) or CSV (`.csv`), chosen by the --out extension (default
`<workdir>/certify/<images name>.jsonl`), with the API's words (certjax/inference/certificates.py): file,
prediction, radius (the certified radius of the prediction, pixel units), robust (the prediction provably
unchanged within eps), and label / correct / certified (correct and robust) when the images carry labels
(class folders, an .npz `label`). The file is written whole to a temporary file and renamed, so it is never
half-written; nothing is written when anything fails.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

import numpy as np

from certjax.config_checks import ConfigError
from certjax.data.sources import DATASETS
from certjax.data.user_images import read_user_images
from certjax.evaluate import atomic_write_bytes
from certjax.writers import console

FORMATS = (".jsonl", ".csv")


def output_path(workdir: str, images: str, out: str | None) -> str:
    if not out:
        name = Path(images).name.split(".")[0] or "images"
        return os.path.join(os.path.abspath(workdir), "certify", f"{name}.jsonl")
    if Path(out).suffix.lower() not in FORMATS:
        raise ConfigError(f"--out={out}: use a .jsonl (JSON Lines) or .csv file name")
    return out


def rows_payload(rows: list[dict], path: str) -> bytes:
    if Path(path).suffix.lower() == ".csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue().encode()
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def _checkpoint_dataset(workdir: str, checkpoint: str) -> str:
    """The dataset (`config.data.dataset`) the checkpoint was trained on, from the config saved with it."""
    from certjax import checkpoints

    manager = checkpoints.make_manager(workdir, read_only=True)
    try:
        step = checkpoints.select_step(manager, checkpoint)
        return checkpoints.restore_config(manager, step).data.dataset
    finally:
        manager.close()


def certify_files(
    workdir: str,
    images: str,
    checkpoint: str = "best",
    eps: float | None = None,
    out: str | None = None,
    skip_bad_images: bool = False,
    labels: str = "names",
) -> dict:
    """Certify every image at `images` with the checkpoint; write the rows; return a summary.

    Args:
      workdir: the run's directory (its checkpoints).
      images: a folder, zip, .npz or image file (certjax.data.user_images).
      checkpoint: "best", "last" or a step.
      eps: the budget in pixel units (default the checkpoint's).
      out: the .jsonl / .csv to write (default <workdir>/certify/<images name>.jsonl).
      skip_bad_images: skip unreadable images with a warning instead of stopping.
      labels: how class folders are labelled ("names": by the model's dataset's class names, "sorted" or
        a JSON mapping file; certjax/data/labels.py).
    Returns:
      {"images", "skipped", "eps", "robust" (fraction), "out"} and, with labels, "accuracy" and
      "certified_accuracy" (the fraction correct and robust).
    """
    if eps is not None and (not math.isfinite(eps) or eps < 0):
        raise ConfigError(
            f"--eps={eps}: the budget must be a number >= 0 (pixel units, e.g. 36/255 = 0.1412)"
        )
    path = output_path(workdir, images, out)
    from certjax.inference.restore import require_checkpoints, restore

    require_checkpoints(workdir)
    info = DATASETS[_checkpoint_dataset(workdir, checkpoint)]  # the saved config only: bad input fails fast
    data = read_user_images(images, skip_bad_images, info.image_shape, info.name, labels)
    model = restore(workdir, checkpoint)
    eps = model.info["eps"] if eps is None else float(eps)
    labels = data.labels
    if labels is not None and labels.size and labels.max() >= model.info["num_classes"]:
        raise ConfigError(
            f"{images}: labels go up to {labels.max()} but the model has {model.info['num_classes']} classes"
        )
    result = model.certify(data.images, eps=eps, labels=labels, progress=True)
    rows = []
    for i, name in enumerate(data.names):
        row = {
            "file": name,
            "prediction": int(result["prediction"][i]),
            "radius": float(result["radius"][i]),
            "robust": bool(result["robust"][i]),
        }
        if labels is not None:
            row["label"] = int(labels[i])
            row["correct"] = bool(result["correct"][i])
            row["certified"] = bool(result["certified"][i])
        rows.append(row)
    atomic_write_bytes(path, rows_payload(rows, path))
    summary = {
        "images": len(rows),
        "skipped": len(data.skipped),
        "eps": eps,
        "robust": float(np.mean(result["robust"])),
        "out": path,
    }
    line = (
        f"certify {model.info['family']} step {model.info['step']} ({model.info['threat_model']}, "
        f"eps {eps:.5f}): {len(rows)} images, {summary['robust']:.4f} robust (prediction provably unchanged "
        "within eps)"
    )
    if labels is not None:
        summary["accuracy"] = float(np.mean(result["correct"]))
        summary["certified_accuracy"] = float(np.mean(result["certified"]))
        line += (
            f", accuracy {summary['accuracy']:.4f}, certified accuracy {summary['certified_accuracy']:.4f} "
            "(correct and robust)"
        )
    if data.skipped:
        line += f", {len(data.skipped)} unreadable skipped"
    console(f"{line}; rows in {path}")
    return summary
