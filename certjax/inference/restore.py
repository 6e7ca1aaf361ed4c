"""Use a trained model from Python: certified predictions for any images.

    import certjax
    model = certjax.restore("runs/lot_s", checkpoint="best")        # any family
    out = model.certify(images)           # uint8 [N, 32, 32, 3] in [0, 255] or float in [0, 1]
    out["prediction"], out["radius"], out["robust"]       # + "correct", "certified" with labels=...
    logits = model.logits(images)

`certify` runs exactly the code `launch.py --mode=evaluate` runs (`Certifier.certify_batches`: the same
jitted certifying forward, the same per-checkpoint bounds computed once at restore: guaranteed K for LiResNet,
measured sigma for LOT, the rounding bounds), in batches of the checkpoint's `train.eval_batch_size` (the
last one padded), so its numbers equal evaluation's bit for bit (tests/test_api.py).

The fields and their meaning are certjax/inference/certificates.py's (the export returns the same):
`radius` is the certified radius of the *predicted* class in pixel units ([0, 1] scale): no perturbation of
l_p norm (the family's threat model) <= radius changes the prediction. `robust` = radius > eps (eps in pixel
units, the checkpoint's `certify.eps` by default), or, for the l_inf families with
`certify.method = both | ibp`, the interval-bound certificate of the predicted class at eps as evaluation
computes it (then `robust_margin` and `robust_ibp` are returned as well). With labels, `correct` =
prediction == label and `certified` = correct and robust (evaluation's `certified`: certified accuracy is its
mean); `certified_radius` is evaluation's convention, radius on correct points and 0 on the others.

A float64 image is certified as the float32 image it rounds to (certjax/inference/images.py): its `radius`
is that image's radius minus their distance in the threat model's norm (rounded up), and its interval
bounds are taken over the eps box widened by that distance, so no certificate claims more for the image
given than is proved for the image certified. uint8 and float32 images are certified as they are.
"""

from __future__ import annotations

import math
import os

import numpy as np

from certjax.certify.certifier import pad_rows
from certjax.certify.rounding import round_up_float32
from certjax.certify.threat_models import get_threat_model
from certjax.inference.certificates import NO_IMAGES, certify_outputs
from certjax.inference.images import as_eps, as_images, as_labels, float32_input


class CertifiedModel:
    """A restored checkpoint with its certificate bounds, ready to certify images (see module docstring)."""

    def __init__(self, experiment, state, step: int, checkpoint: str, workdir: str):
        self._exp = experiment
        self._params, self._model_state = state.params, state.model_state
        self._bounds = experiment.certifier.certificate_bounds(state.params, state.model_state)
        self._threat = get_threat_model(experiment.family.threat_model)
        config = experiment.config
        self.config = config
        self.batch_size = int(config.train.eval_batch_size)
        self.info = {
            "family": config.get("family", config.model.name),
            "variant": config.get("variant", ""),
            "threat_model": experiment.family.threat_model,
            "eps": float(config.certify.eps),
            "mean": [float(m) for m in config.data.mean],
            "std": [float(s) for s in config.data.std],
            "dataset": config.data.dataset,
            "num_classes": int(experiment.num_classes),
            "input_shape": list(experiment.image_shape),
            "workdir": str(workdir),
            "checkpoint": checkpoint,
            "step": int(step),
            "pair_lipschitz": _pair_lipschitz(self._bounds, experiment),
            "lipschitz": dict(self._bounds["report"]),
        }

    @property
    def family(self) -> str:
        return self.info["family"]

    def _run(self, images: np.ndarray, labels: np.ndarray, progress: bool) -> dict[str, np.ndarray]:
        n = len(images)
        if n == 0:
            raise ValueError(NO_IMAGES)
        batches = math.ceil(n / self.batch_size)

        def padded_batches():
            for start in range(0, n, self.batch_size):
                image, label = (
                    images[start : start + self.batch_size],
                    labels[start : start + self.batch_size],
                )
                pad = self.batch_size - len(image)
                if pad:  # one batch shape, one compilation; padded rows are dropped below
                    image = np.concatenate([image, np.repeat(image[:1], pad, 0)])
                    label = np.concatenate([label, np.repeat(label[:1], pad, 0)])
                yield {"image": image, "label": label}

        certifier = self._exp.certifier
        results = certifier.certify_batches(
            self._params,
            self._model_state,
            padded_batches(),
            bounds=self._bounds,
            what="certify" if progress else None,  # a library call reports only when asked
            total=batches,
        )
        return {k: np.asarray(v)[:n] for k, v in results.items()}

    def certify(self, images, eps: float | None = None, labels=None, *, progress: bool = False) -> dict:
        """Certify images (the fields of certjax/inference/certificates.py, numpy arrays [N]).

        Args:
          images: uint8 [N, H, W, C] in [0, 255] or float in [0, 1] (numpy or jax; one image [H, W, C] too).
          eps: pixel units ([0, 1] scale, l_p of the family's threat model); default the checkpoint's.
          labels: optional [N] integer classes; then `correct`, `certified` and `certified_radius` too.
          progress: report progress on stderr (certjax/progress.py: a bar on a terminal, else a line
            every ~30 s).
        Returns:
          {"prediction", "radius", "robust", ...}; bad input raises ValueError naming the fix.
        """
        images, distance = float32_input(as_images(images, self._exp.image_shape), self._threat)
        eps = as_eps(eps, self.info["eps"])
        labels = as_labels(labels, len(images), self.info["num_classes"])
        # any class when unlabelled: only the prediction and its radius are used below
        results = self._run(images, np.zeros(len(images), np.int32) if labels is None else labels, progress)
        prediction = results["prediction"].astype(np.int32)
        return certify_outputs(
            prediction,
            results["prediction_radius"],
            eps,
            method=self._exp.certify_method,
            interval_robust=lambda box_eps: self._ibp_certified(images, prediction, box_eps),
            distance=distance,
            labels=labels,
        )

    def _ibp_certified(self, images, prediction, eps: float) -> np.ndarray:
        """Interval-bound certificates of the predicted class over the l_inf box of radius eps (pixel units),
        by the step evaluation uses (Certifier.ibp_step)."""
        exp, flags = self._exp, []
        variables = {**self._model_state, **self._bounds["variables"]}
        radius = round_up_float32(eps * exp.input_scale)
        for start in range(0, len(images), self.batch_size):
            image, label = (
                images[start : start + self.batch_size],
                prediction[start : start + self.batch_size],
            )
            batch, n = pad_rows({"image": image, "label": label}, self.batch_size)
            flag = exp.certifier.ibp_step(self._params, variables, exp.sharded_copy(batch), radius)
            flags.append(np.asarray(flag)[:n])
        return np.concatenate(flags) if flags else np.zeros(0, bool)

    def logits(self, images) -> np.ndarray:
        """The certifying forward's logits [N, num_classes] (float32), those `certify` compares (float64
        images: of their float32 rounding)."""
        images, _ = float32_input(as_images(images, self._exp.image_shape), self._threat)
        exp, outputs = self._exp, []
        variables = {**self._model_state, **self._bounds["variables"]}
        gain = np.float32(self._bounds.get("input_error_gain", 1.0))
        for start in range(0, len(images), self.batch_size):
            image = images[start : start + self.batch_size]
            batch, n = pad_rows({"image": image, "label": np.zeros(len(image), np.int32)}, self.batch_size)
            logits, _ = exp.certifier.eval_step(self._params, variables, exp.sharded_copy(batch), gain)
            outputs.append(np.asarray(logits)[:n])
        return np.concatenate(outputs) if outputs else np.zeros((0, self.info["num_classes"]), np.float32)

    def __repr__(self) -> str:
        info = self.info
        return (
            f"CertifiedModel({info['family']}:{info['variant']}, {info['threat_model']}, "
            f"eps {info['eps']:.5f}, step {info['step']})"
        )


def _pair_lipschitz(bounds: dict, experiment):
    """The [C, C] margin bounds the certifier uses (l_2), or None (l_inf: the constant 2)."""
    pair = bounds.get("pair_lipschitz")
    return None if pair is None else np.asarray(pair, np.float32).tolist()


def require_checkpoints(workdir: str) -> None:
    """FileNotFoundError naming the fix unless workdir/checkpoints holds a finished checkpoint (a cheap look,
    before any model is built)."""
    from certjax.checkpoints import checkpoint_dir

    directory = checkpoint_dir(workdir)
    steps = [p for p in os.listdir(directory) if p.isdigit()] if os.path.isdir(directory) else []
    if not steps:
        raise FileNotFoundError(
            f"no checkpoints in {directory}: pass the --workdir of a trained run "
            "(launch.py --mode=train writes them there)"
        )


def restore(workdir: str, checkpoint: str = "best") -> CertifiedModel:
    """Load a checkpoint of any family with the config saved beside it; no dataset is read.

    checkpoint: "best" (by test certified accuracy), "last" or a step. Raises FileNotFoundError when the
    workdir holds no checkpoint and ValueError for an unknown checkpoint name."""
    from certjax.experiment import Experiment

    require_checkpoints(workdir)
    experiment, state, info = Experiment.from_checkpoint(
        workdir, str(checkpoint), data="none", announce=False
    )
    return CertifiedModel(experiment, state, info.step, str(checkpoint), workdir)
