"""Use a trained model from Python: certified predictions for any images.

    import certjax
    model = certjax.restore("runs/lot_s", checkpoint="best")        # any family
    out = model.certify(images)           # uint8 [N, 32, 32, 3] in [0, 255] or float in [0, 1]
    out["prediction"], out["radius"], out["certified"]               # + "correct" with labels=...
    logits = model.logits(images)

`certify` runs exactly the code `launch.py --mode=evaluate` runs (`Experiment.certify_batches`: the same
jitted certifying forward, the same per-checkpoint bounds computed once at restore: guaranteed K for LiResNet,
measured sigma for LOT, the rounding bounds), in batches of the checkpoint's `train.eval_batch_size` (the
last one padded), so its numbers equal evaluation's bit for bit (tests/test_api.py).

`radius` is the certified radius of the *predicted* class in pixel units ([0, 1] scale): no perturbation of
l_p norm (the family's threat model) <= radius changes the prediction. `certified` = radius > eps (eps in
pixel units, the checkpoint's `certify.eps` by default), or, for the l_inf families with
`certify.method = both | ibp`, the interval-bound certificate of the predicted class at eps as evaluation
computes it (then `certified_margin` and `certified_ibp` are returned as well). With labels, `correct` =
prediction == label; a point counts for certified accuracy when correct and certified (evaluation's
`certified`); evaluation's `radius` (of the true class) is radius on correct points and 0 on the others.
"""

from __future__ import annotations

import math
import os

import numpy as np

from certjax.certify.rounding import round_up_float32

IMAGE_SHAPE = (32, 32, 3)


def as_images(images) -> np.ndarray:
    """numpy/jax uint8 [N, 32, 32, 3] in [0, 255] or float in [0, 1] (one image [32, 32, 3] too) -> a numpy
    batch, uint8 or float32; anything else raises ValueError naming the fix."""
    array = np.asarray(images)
    if array.shape == IMAGE_SHAPE:
        array = array[None]
    if array.ndim != 4 or array.shape[1:] != IMAGE_SHAPE:
        hint = " (channels first? use images.transpose(0, 2, 3, 1))" if array.shape[1:2] == (3,) else ""
        raise ValueError(f"images must be [N, 32, 32, 3] (NHWC, RGB), got shape {array.shape}{hint}")
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool or not (
        np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
    ):
        raise ValueError(f"images must be uint8 in [0, 255] or float in [0, 1], got dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.integer):
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError("integer images must lie in [0, 255]")
        return array.astype(np.uint8)
    array = array.astype(np.float32)
    if array.size and not (np.all(np.isfinite(array)) and array.min() >= 0.0 and array.max() <= 1.0):
        raise ValueError(
            "float images must lie in [0, 1] (pixels / 255); for values in [0, 255] pass them as uint8"
        )
    return array


class CertifiedModel:
    """A restored checkpoint with its certificate bounds, ready to certify images (see module docstring)."""

    def __init__(self, experiment, state, step: int, checkpoint: str, workdir: str):
        self._exp = experiment
        self._params, self._model_state = state.params, state.model_state
        self._bounds = experiment.certificate_bounds(state.params, state.model_state)
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
            "input_shape": list(IMAGE_SHAPE),
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
            raise ValueError("no images to certify (an empty batch)")
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

        iterator = padded_batches()
        if progress and batches > 3:
            from tqdm import tqdm

            iterator = tqdm(iterator, total=batches, unit="batch", desc="certify", leave=False)
        results = self._exp.certify_batches(self._params, self._model_state, iterator, bounds=self._bounds)
        return {k: np.asarray(v)[:n] for k, v in results.items()}

    def certify(self, images, eps: float | None = None, labels=None, *, progress: bool = False) -> dict:
        """{"prediction", "radius", "certified"} (+ "correct", "label" with labels) as numpy arrays [N].

        eps: pixel units ([0, 1] scale, l_p of the family's threat model); default the checkpoint's.
        progress: a tqdm bar on stderr when there are more than a few batches."""
        images = as_images(images)
        eps = self.info["eps"] if eps is None else float(eps)
        if not eps >= 0.0 or not math.isfinite(eps):
            raise ValueError(f"eps must be a finite number >= 0 (pixel units), got {eps}")
        given = labels is not None
        if given:
            labels = np.asarray(labels)
            if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
                raise ValueError(f"labels must be integers of shape ({len(images)},), got {labels.shape}")
            if labels.size and (labels.min() < 0 or labels.max() >= self.info["num_classes"]):
                raise ValueError(f"labels must lie in [0, {self.info['num_classes']})")
            labels = labels.astype(np.int32)
        else:
            labels = np.zeros(len(images), np.int32)  # any class: only prediction_radius is used below
        results = self._run(images, labels, progress)
        radius = results["prediction_radius"]
        prediction = results["prediction"].astype(np.int32)
        out = {
            "prediction": prediction,
            "radius": radius,
            # the comparison certify_from_margins makes: float32 radius > eps rounded up to float32
            "certified": radius > round_up_float32(eps),
        }
        method = self._exp.certify_method
        if method != "margin":  # l_inf families: interval bounds at eps too, as evaluation certifies
            out["certified_margin"] = out["certified"]
            out["certified_ibp"] = self._ibp_certified(images, prediction, eps)
            out["certified"] = (
                out["certified_ibp"] if method == "ibp" else out["certified_margin"] | out["certified_ibp"]
            )
        if given:
            out["label"] = labels
            out["correct"] = results["correct"]
        return out

    def _ibp_certified(self, images, prediction, eps: float) -> np.ndarray:
        """Interval-bound certificates of the predicted class over the l_inf box of radius eps (pixel units),
        by the step evaluation uses (Experiment.ibp_step)."""
        exp, flags = self._exp, []
        variables = {**self._model_state, **self._bounds["variables"]}
        radius = round_up_float32(eps * exp.input_scale)
        for start in range(0, len(images), self.batch_size):
            image, label = (
                images[start : start + self.batch_size],
                prediction[start : start + self.batch_size],
            )
            n, pad = len(image), self.batch_size - len(image)
            if pad:
                image = np.concatenate([image, np.repeat(image[:1], pad, 0)])
                label = np.concatenate([label, np.repeat(label[:1], pad, 0)])
            batch = exp.sharded_copy({"image": image, "label": label})
            flags.append(np.asarray(exp.ibp_step(self._params, variables, batch, radius))[:n])
        return np.concatenate(flags) if flags else np.zeros(0, bool)

    def logits(self, images) -> np.ndarray:
        """The certifying forward's logits [N, num_classes] (float32), those `certify` compares."""
        images = as_images(images)
        exp, outputs = self._exp, []
        variables = {**self._model_state, **self._bounds["variables"]}
        gain = np.float32(self._bounds.get("input_error_gain", 1.0))
        for start in range(0, len(images), self.batch_size):
            image = images[start : start + self.batch_size]
            n, pad = len(image), self.batch_size - len(image)
            if pad:
                image = np.concatenate([image, np.repeat(image[:1], pad, 0)])
            batch = {"image": image, "label": np.zeros(self.batch_size, np.int32)}
            logits, _ = exp.eval_step(self._params, variables, exp.sharded_copy(batch), gain)
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
    from certjax import checkpoints
    from certjax.train import Experiment

    require_checkpoints(workdir)
    manager = checkpoints.make_manager(workdir, read_only=True)
    try:
        step = checkpoints.select_step(manager, str(checkpoint))
        config = checkpoints.restore_config(manager, step)
        experiment = Experiment(config, need_train_data=False, need_test_data=False)
        state = checkpoints.restore_state(manager, step, experiment.abstract_restore_target(), announce=False)
    finally:
        manager.close()
    return CertifiedModel(experiment, state, step, str(checkpoint), workdir)
