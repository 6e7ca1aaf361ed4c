"""Certify with an exported model (certjax/inference/export.py) using jax and numpy only: no flax, no model
code.

    model = certjax.load_exported("model_dir")
    out = model.certify(images, eps=None, labels=None)   # as certjax.restore's: prediction, radius, certified
    logits = model.logits(images)

Loading checks the manifest's own hash and the SHA-256 of every file before anything is deserialised, and
refuses a changed file with ExportError naming it. Certification is the margin math of
certjax/certify/margins.py (jax and numpy) on the artifact's logits and rounding bound, with the manifest's
pairwise Lipschitz bounds: the numbers `certjax.restore` gives for the same checkpoint (tests/test_export.py),
float64 images included (certified as their float32 rounding, minus the distance; inference/images.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import os

import jax
import numpy as np

from certjax.certify.rounding import round_up_float32
from certjax.certify.threat_models import get_threat_model, radius_after_input_rounding
from certjax.inference.images import as_images, float32_input

FORMAT_VERSION = 1


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
            f"{path}: export format {manifest.get('format')}, this certjax reads {FORMAT_VERSION}"
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
        self._forward = {}
        for dtype, name in self.info["artifacts"].items():
            with open(os.path.join(self.directory, name), "rb") as f:
                try:
                    self._forward[dtype] = jax.export.deserialize(bytearray(f.read()))
                except Exception as error:
                    raise ExportError(
                        f"{name}: cannot be deserialised by jax {jax.__version__} (exported with jax "
                        f"{self.info['jax_version']}): {type(error).__name__}: {error}"
                    ) from error
        pair = self.info["pair_lipschitz"]
        self._pair_lipschitz = None if pair is None else np.asarray(pair, np.float32)
        self._threat = get_threat_model(self.info["threat_model"])
        self._certifier = self._threat.certify
        self.batch_size = int(self.info["batch_size"])

    def _input(self, images):
        """uint8 or float32 images for the artifacts, and the distance of float64 ones from them (or None)."""
        return float32_input(as_images(images, self.info["input_shape"]), self._threat)

    def _batches(self, images):
        kind = images.dtype.name  # the artifact of that dtype
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            n, pad = len(batch), self.batch_size - len(batch)
            if pad:  # the artifact's one batch shape; padded rows are dropped
                batch = np.concatenate([batch, np.repeat(batch[:1], pad, 0)])
            logits, error = self._forward[kind].call(self._weights, batch)
            yield n, logits, error

    def logits(self, images) -> np.ndarray:
        """The artifact's logits [N, num_classes] (float64 images: of their float32 rounding)."""
        images, _ = self._input(images)
        parts = [np.asarray(logits)[:n] for n, logits, _ in self._batches(images)]
        return np.concatenate(parts) if parts else np.zeros((0, self.info["num_classes"]), np.float32)

    def certify(self, images, eps: float | None = None, labels=None) -> dict:
        """{"prediction", "radius", "certified"} (+ "correct", "label"), as certjax.restore's certify."""
        eps = self.info["eps"] if eps is None else float(eps)
        if not (math.isfinite(eps) and eps >= 0):
            raise ValueError(f"eps must be a finite number >= 0 (pixel units), got {eps}")
        images, distance = self._input(images)
        parts = []
        for n, logits, error in self._batches(images):
            prediction = np.asarray(logits).argmax(-1).astype(np.int32)
            result = self._certifier(
                logits,
                prediction,
                eps=self.info["eps"],
                std=self.info["std"],
                logit_error=error,
                pair_lipschitz=self._pair_lipschitz,
            )
            parts.append((prediction[:n], np.asarray(result["radius"])[:n]))
        if not parts:
            raise ValueError("no images to certify (an empty batch)")
        prediction = np.concatenate([p for p, _ in parts])
        radius = np.concatenate([r for _, r in parts])
        if distance is not None:  # float64 input: certified around its float32 rounding, minus the distance
            radius = radius_after_input_rounding(radius, distance)
        # the margin certificate (the l_inf families' interval bounds need the model code: certjax.restore)
        out = {"prediction": prediction, "radius": radius, "certified": radius > round_up_float32(eps)}
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != prediction.shape:
                raise ValueError(f"labels must have shape {prediction.shape}, got {labels.shape}")
            out["label"] = labels.astype(np.int32)
            out["correct"] = prediction == labels
        return out

    def __repr__(self) -> str:
        info = self.info
        name = f"{info['family']}:{info['variant']}"
        return f"ExportedModel({name}, {info['threat_model']}, eps {info['eps']:.5f})"


def load_exported(directory: str) -> ExportedModel:
    """Load (and verify) an export written by `python -m certjax.export`."""
    return ExportedModel(directory)
