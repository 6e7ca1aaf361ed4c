"""The one certification path: eval step (logits and their rounding bound), IBP step, the family's
per-checkpoint bounds, and the certify loop over batches (shared/DESIGN.md, "Certification").

The trainer's per-epoch evaluation, `--mode=evaluate` (certjax/evaluate.py), the API (certjax.restore), the
export and the audit all certify through a `Certifier`, so they give the same numbers by construction.

Rounding (certjax/certify/rounding.py): the logits are float32, so the eval step returns with them a
per-example bound of their error: the normalisation's (`normalisation_error_linf` / `_l2`) times the
network's gain for input errors (the family's `input_error_gain`, 1 for 1-Lipschitz bodies), plus every
per-op bound the family sows in its "rounding" collection. The IBP box is widened by the same normalisation
bound, so both certificates hold for the exact normalised image.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from certjax.certify import interval as interval_bounds
from certjax.certify import spectral
from certjax.certify.rounding import normalisation_error_linf, round_up_float32
from certjax.certify.threat_models import get_threat_model
from certjax.models import certified_logits
from certjax.progress import tracked

DEFAULT_RADIUS_FACTORS = (0.0, 0.5, 1.0, 1.5, 2.0)


def radii_of(config) -> list[float]:
    """config.certify.radii if given, else eps times DEFAULT_RADIUS_FACTORS (pixel units)."""
    radii = config.certify.get("radii", None)
    if radii:
        return [float(r) for r in radii]
    return [float(config.certify.eps) * f for f in DEFAULT_RADIUS_FACTORS]


def pad_rows(batch: dict, multiple: int) -> tuple[dict, int]:
    """(batch padded by repeating its first row to a multiple of `multiple` rows, the number of real rows):
    the one padded batcher; callers slice results with [:n_valid]."""
    n = len(next(iter(batch.values())))
    pad = (-n) % multiple
    if pad:
        batch = {k: np.concatenate([v, v[:1].repeat(pad, 0)]) for k, v in batch.items()}
    return batch, n


class Certifier:
    """Certification of one Experiment's model (certjax.experiment): see the module docstring."""

    def __init__(self, experiment):
        self.exp = experiment
        self.config = experiment.config
        self.threat_model = get_threat_model(experiment.family.threat_model)
        self.certify_fn = self.threat_model.certify
        self.certify_method = experiment.certify_method
        self.eval_step = jax.jit(self._eval_step, out_shardings=experiment.replicated)
        self.ibp_step = jax.jit(self._ibp_step, out_shardings=experiment.replicated)
        self.last_bounds_report: dict = {}
        self._bounds_cache = None  # (key, the keyed objects, bounds) of the last certificate_bounds call

    # -- steps

    def input_error(self, images):
        """Per example: the bound of the float32 normalisation's error in the threat model's norm."""
        return self.threat_model.normalisation_error(images, self.config.data.std)

    def _eval_step(self, params, model_state, batch, input_error_gain=1.0):
        """Logits at p = inf and a per-example bound of their float32 rounding error (0 if not tracked).

        input_error_gain: how much the network can amplify an error of its (normalised) input, from the
        family's certificate_bounds (1 for 1-Lipschitz bodies)."""
        images = self.exp.inputs(batch["image"])
        logits, op_error = certified_logits(self.exp.model, {"params": params, **model_state}, images)
        return logits, input_error_gain * self.input_error(images) + op_error

    def _ibp_step(self, params, model_state, batch, eps_normalised):
        """Certified flags by interval bounds at p = inf over the eps ball (normalised units) around the exact
        normalised images: the box is widened by the normalisation's rounding bound."""
        images = self.exp.inputs(batch["image"])
        box = self.exp.input_box(
            images, eps_normalised, normalisation_error_linf(images, self.config.data.std)
        )
        output = self.exp.model.apply(
            {"params": params, **model_state}, images, jnp.float32(jnp.inf), train=False, interval=box
        )
        return interval_bounds.ibp_certified(output.logits, *output.logit_bounds, batch["label"])

    def ibp_radii(self) -> list[float]:
        """Pixel radii certified by interval bounds: certify.eps and every nonzero radius of certify.radii
        (radius 0 is clean accuracy)."""
        return sorted({float(self.config.certify.eps)} | {r for r in radii_of(self.config) if r > 0})

    @property
    def bound_method(self) -> str:
        """certify.bound_method: how the final evaluation bounds every layer (spectral.BOUND_METHODS)."""
        return self.config.certify.get("bound_method", "exact")

    def certificate_bounds(self, params, model_state, bound_method=None, assumed: bool = True) -> dict:
        """The family's per-checkpoint bounds (cached evaluation variables, pair Lipschitz constants), or the
        defaults of a family without the hook (nothing cached, the threat model's constant bound).

        Computed once per checkpoint: the last call's result is kept for the same params and model state
        (the final evaluation certifies the test and the training images of one checkpoint).

        Args:
          params, model_state: the checkpoint's.
          bound_method: certify.bound_method when None (the evaluations during training pass "fast").
          assumed: whether the family computes its assumed figure (skipped during training: not reported).
        """
        method = bound_method or self.bound_method
        key = (id(params), id(model_state), method, assumed)
        if self._bounds_cache is not None and self._bounds_cache[0] == key:
            return self._bounds_cache[2]
        variables = {"params": params, **model_state}
        bounds = self.exp.family.certificate_bounds(
            self.exp.model, variables, (1, *self.exp.image_shape), bound_method=method, assumed=assumed
        )
        # the objects themselves are kept so that their ids cannot be reused by other arrays
        self._bounds_cache = (key, (params, model_state), bounds)
        return bounds

    # -- the certify loop

    def certify_batches(
        self,
        params,
        model_state,
        batches,
        bounds=None,
        every_radius: bool = False,
        what: str = "evaluate",
        total: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Per-example results over an iterable of batches (numpy "image" uint8 / "label").

        Args:
          params, model_state: the state's parameters and model collections.
          batches: iterable of {"image", "label"} numpy batches.
          bounds: `certificate_bounds(params, model_state)` computed once by the caller (the API), or None.
          every_radius: IBP flags at every radius of the record, not only at certify.eps.
          what, total: the work and its number of batches, for the progress report (certjax/progress.py).
        Returns:
          prediction / correct / radius / certified / prediction_radius / logit_error / label, and with a
          family's measured bounds `certified_assumed` / `radius_assumed` (the bound the architecture
          promises); with interval bounds `certified_margin` / `certified_ibp` / `ibp_certified_at`. The
          bounds' report is kept in `last_bounds_report`. These are the certifier's own names: its `radius`
          is the label's (0 on a wrong point), which the radii file and the API call `certified_radius`,
          giving the prediction's as `radius` (certjax/radii_file.py, certjax/inference/certificates.py).
        """
        if bounds is None:
            bounds = self.certificate_bounds(params, model_state)
        model_state = {**model_state, **bounds["variables"]}
        gain = np.float32(bounds.get("input_error_gain", 1.0))
        outputs = []
        for batch in tracked(batches, what, total):
            batch, n = pad_rows(batch, jax.device_count())  # shard evenly; padded rows are dropped below
            logits, logit_error = self.eval_step(params, model_state, self.exp.sharded_copy(batch), gain)
            result = self._margin_results(logits, logit_error, batch["label"], bounds)
            if self.certify_method != "margin":
                # one IBP pass per radius: all of them for the results record, eps alone for the per-epoch
                # evaluation in training
                radii = self.ibp_radii() if every_radius else [float(self.config.certify.eps)]
                self._add_ibp(result, params, model_state, batch, radii)
            outputs.append(jax.tree.map(lambda a, n=n: np.asarray(a)[:n], result))
        results = {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}
        self.last_bounds_report = bounds["report"]
        return results

    def _margin_results(self, logits, logit_error, labels, bounds) -> dict:
        certify = functools.partial(
            self.certify_fn,
            logits,
            eps=self.config.certify.eps,
            std=self.config.data.std,
            logit_error=logit_error,
        )
        result = certify(labels, pair_lipschitz=bounds["pair_lipschitz"])
        # The certified radius of the *predicted* class (= radius on correct points; on incorrect ones,
        # how robustly the model is wrong: the seed paper's Fig. 5), from the same logits.
        predicted = certify(result["prediction"].astype(jnp.int32), pair_lipschitz=bounds["pair_lipschitz"])
        result["prediction_radius"] = predicted["radius"]
        if bounds["assumed_pair_lipschitz"] is not None:
            assumed = certify(labels, pair_lipschitz=bounds["assumed_pair_lipschitz"])
            result["certified_assumed"] = assumed["certified"]
            result["radius_assumed"] = assumed["radius"]
        result["logit_error"] = logit_error
        result["label"] = labels
        return result

    def _add_ibp(self, result, params, model_state, batch, radii):
        """IBP flags at every radius of `radii` ([B, R] `ibp_certified_at`), `certified_margin` /
        `certified_ibp` at certify.eps, and `certified` by the configured method (both: either)."""
        sharded = self.exp.sharded_copy(batch)
        scale = self.exp.input_scale
        flags = [self.ibp_step(params, model_state, sharded, round_up_float32(r * scale)) for r in radii]
        result["ibp_certified_at"] = jnp.stack(flags, axis=1)
        result["certified_ibp"] = flags[radii.index(float(self.config.certify.eps))]
        result["certified_margin"] = result["certified"]
        if self.certify_method == "ibp":
            result["certified"] = result["certified_ibp"]
        else:
            result["certified"] = result["certified_margin"] | result["certified_ibp"]

    def evaluate_source(
        self, state, source, limit: int = 0, what: str = "evaluate", during_training: bool = False
    ) -> dict[str, float]:
        """Clean and certified accuracy of `state` on (the first `limit` of) a source, at certify.eps;
        `what` names the work in progress reports. during_training: bound every layer by
        spectral.TRAINING_BOUND_METHOD and skip the assumed figure (not reported per epoch)."""
        from certjax.data import pipeline

        batch_size = self.config.train.eval_batch_size
        batches = pipeline.eval_batches(source, batch_size, limit, seed=self.config.seed)
        count = min(limit or len(source), len(source))
        bounds = None
        if during_training:
            bounds = self.certificate_bounds(
                state.params, state.model_state, spectral.TRAINING_BOUND_METHOD, assumed=False
            )
        results = self.certify_batches(
            state.params, state.model_state, batches, bounds, what=what, total=-(-count // batch_size)
        )
        return {
            "clean_accuracy": float(results["correct"].mean()),
            "certified_accuracy": float(results["certified"].mean()),
        }
