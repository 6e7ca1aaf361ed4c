"""Certify with an exported model (certjax/inference/export.py) using jax and numpy only: no flax, no model
code.

    model = certjax.load_exported("model_dir")
    out = model.certify(images, eps=None, labels=None)  # certjax.restore's fields: prediction, radius, robust
    logits = model.logits(images)

Loading checks the manifest's own hash and the SHA-256 of every file before anything is deserialised, and
refuses a changed file with ExportError naming it. Certification is the margin math of
certjax/certify/margins.py (jax and numpy) on the artifact's logits and rounding bound, with the manifest's
pairwise Lipschitz bounds, and for the l_inf families with certify.method both | ibp the exported interval
bound step on the predicted class: the fields, checks and numbers `certjax.restore` gives for the same
checkpoint (certjax/inference/certificates.py builds both; tests/test_export.py compares them), float64
images included (certified as their float32 rounding, minus the distance; inference/images.py).
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np

from certjax.certify.rounding import round_up_float32
from certjax.certify.threat_models import get_threat_model
from certjax.inference.certificates import NO_IMAGES, certify_outputs
from certjax.inference.images import as_eps, as_images, as_labels, float32_input

# 2: the interval bound programs and certify_method / input_scale in the manifest (format 1 certified the
# l_inf families by the margin only)
FORMAT_VERSION = 2


class ExportError(ValueError):
    """An export directory that is incomplete, changed or from an incompatible version."""


def manifest_bytes(manifest: dict) -> bytes:
    """The one serialisation of a manifest body: what its hash covers and what the file must hold (used by
    certjax.inference.export to write it)."""
    return json.dumps(manifest, sort_keys=True, indent=1).encode()


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(directory: str) -> dict:
    """The manifest, after checking its own hash and every listed file's SHA-256."""
    path = os.path.join(directory, "manifest.json")
    if not os.path.isfile(path):
        raise ExportError(
            f"{directory}: no manifest.json; pass a directory written by python -m certjax.export"
        )
    raw = open(path, "rb").read()
    try:
        sealed = json.loads(raw)
        manifest, expected = sealed["manifest"], sealed["manifest_sha256"]
    except (ValueError, KeyError, TypeError) as error:
        raise ExportError(
            f"{path}: damaged or changed (not a certjax manifest: {error}); export again"
        ) from None
    if raw != manifest_bytes(sealed) or hashlib.sha256(manifest_bytes(manifest)).hexdigest() != expected:
        raise ExportError(f"{path}: changed after export (its SHA-256 does not match); export again")
    if manifest.get("format") != FORMAT_VERSION:
        raise ExportError(
            f"{path}: export format {manifest.get('format')}, this certjax reads {FORMAT_VERSION}: export "
            "again with python -m certjax.export"
        )
    for name, digest in manifest["sha256"].items():
        file = os.path.join(directory, name)
        if not os.path.isfile(file):
            raise ExportError(f"{file}: missing from the export; copy the whole directory again")
        if sha256_file(file) != digest:
            raise ExportError(
                f"{file}: changed after export (SHA-256 differs from the manifest); export again"
            )
    return manifest


class ExportedModel:
    """An exported certjax model: certify / logits as certjax.inference.restore.CertifiedModel; `info` is the
    manifest."""

    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)
        self.info = read_manifest(self.directory)
        with np.load(os.path.join(self.directory, "weights.npz"), allow_pickle=False) as weights:
            self._weights = [weights[f"arr_{i}"] for i in range(self.info["num_weights"])]
        self._programs = {
            program: {dtype: self._deserialize(name) for dtype, name in by_dtype.items()}
            for program, by_dtype in self.info["artifacts"].items()
        }
        pair = self.info["pair_lipschitz"]
        self._pair_lipschitz = None if pair is None else np.asarray(pair, np.float32)
        self._threat = get_threat_model(self.info["threat_model"])
        self._certifier = self._threat.certify
        self.batch_size = int(self.info["batch_size"])

    def _deserialize(self, name: str):
        with open(os.path.join(self.directory, name), "rb") as f:
            try:
                return jax.export.deserialize(bytearray(f.read()))
            except Exception as error:
                raise ExportError(
                    f"{name}: cannot be deserialised by jax {jax.__version__} (exported with jax "
                    f"{self.info['jax_version']}): {type(error).__name__}: {error}"
                ) from error

    def _input(self, images):
        """uint8 or float32 images for the artifacts, and the distance of float64 ones from them (or None)."""
        return float32_input(as_images(images, self.info["input_shape"]), self._threat)

    def _batches(self, program: str, images, *per_image, constants=()):
        """(rows, outputs) of the artifact of `program` for the images' dtype, batch by batch; per_image
        arrays are sliced and padded with the images, constants passed as they are."""
        artifact = self._programs[program][images.dtype.name]
        for start in range(0, len(images), self.batch_size):
            rows = [a[start : start + self.batch_size] for a in (images, *per_image)]
            n, pad = len(rows[0]), self.batch_size - len(rows[0])
            if pad:  # the artifact's one batch shape; padded rows are dropped
                rows = [np.concatenate([a, np.repeat(a[:1], pad, 0)]) for a in rows]
            yield n, artifact.call(self._weights, *rows, *constants)

    def logits(self, images) -> np.ndarray:
        """The artifact's logits [N, num_classes] (float64 images: of their float32 rounding)."""
        images, _ = self._input(images)
        parts = [np.asarray(logits)[:n] for n, (logits, _) in self._batches("forward", images)]
        return np.concatenate(parts) if parts else np.zeros((0, self.info["num_classes"]), np.float32)

    def certify(self, images, eps: float | None = None, labels=None) -> dict:
        """Certify images: certjax.restore's certify (the fields of certjax/inference/certificates.py).

        Args:
          images: uint8 [N, H, W, C] in [0, 255] or float in [0, 1] (numpy or jax; one image [H, W, C] too).
          eps: pixel units ([0, 1] scale, l_p of the family's threat model); default the manifest's.
          labels: optional [N] integer classes; then `correct`, `certified` and `certified_radius` too.
        Returns:
          {"prediction", "radius", "robust", ...} as numpy arrays [N]; bad input raises ValueError naming the
          fix (the API's checks, certjax/inference/images.py).
        """
        images, distance = self._input(images)
        eps = as_eps(eps, self.info["eps"])
        labels = as_labels(labels, len(images), self.info["num_classes"])
        if not len(images):
            raise ValueError(NO_IMAGES)
        predictions, radii = [], []
        for n, (logits, error) in self._batches("forward", images):
            prediction = np.asarray(logits).argmax(-1).astype(np.int32)
            result = self._certifier(
                logits,
                prediction,
                eps=self.info["eps"],
                std=self.info["std"],
                logit_error=error,
                pair_lipschitz=self._pair_lipschitz,
            )
            predictions.append(prediction[:n])
            radii.append(np.asarray(result["radius"])[:n])
        prediction = np.concatenate(predictions)
        return certify_outputs(
            prediction,
            np.concatenate(radii),
            eps,
            method=self.info["certify_method"],
            interval_robust=lambda box_eps: self._interval_robust(images, prediction, box_eps),
            distance=distance,
            labels=labels,
        )

    def _interval_robust(self, images, prediction, box_eps: float) -> np.ndarray:
        """The predicted classes certified by interval bounds over the l_inf box of radius box_eps (pixel
        units): the exported step, at the radius certjax.restore gives it."""
        radius = round_up_float32(box_eps * self.info["input_scale"])
        flags = [np.asarray(f)[:n] for n, f in self._batches("ibp", images, prediction, constants=(radius,))]
        return np.concatenate(flags)

    def __repr__(self) -> str:
        info = self.info
        name = f"{info['family']}:{info['variant']}"
        return f"ExportedModel({name}, {info['threat_model']}, eps {info['eps']:.5f})"


def load_exported(directory: str) -> ExportedModel:
    """Load (and verify) an export written by `python -m certjax.export`."""
    return ExportedModel(directory)
