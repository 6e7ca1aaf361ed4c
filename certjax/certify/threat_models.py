"""Threat models as records: everything that differs between l_inf and l_2 in one place (shared/DESIGN.md,
"Layout": a new threat model adds its margins, attack norm and audit specifics here and in attack.py).

A `ThreatModel` holds
* the norm of a perturbation (per example) and its numpy order, for distances measured outside jax;
* the certificate (`certjax.certify.margins.linf_certify` / `l2_certify`);
* PGD's pieces (Madry et al., 2018; certjax/attack.py): the random start in the eps ball, the steepest-ascent
  direction of a unit step (l_inf: the gradient's sign; l_2: the normalised gradient) and the projection onto
  the eps ball around the clean images, then onto the pixel range [0, 1];
* the audit's Lipschitz probe (certjax/audit.py): the [C, C] bound of each margin z_a - z_b, the probed
  objective, a random unit direction and the empirical ratio to the bound.

`input_rounding_distance` and `radius_after_input_rounding` make the rounding of a float64 input to float32
part of the certificate: the certificate is proved for the float32 image x32, and the float64 image x64 the
user gave lies within ||x64 - x32|| of it, so a ball of radius r - ||x64 - x32|| around x64 lies inside the
certified ball of radius r around x32 (triangle inequality).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from certjax.certify.margins import (
    l2_certify,
    linf_certify,
    margin_lipschitz_linf,
    smallest_margin,
    true_class_logit,
)
from certjax.certify.norms import l2_norm_per_example
from certjax.certify.rounding import (
    gamma,
    normalisation_error_l2,
    normalisation_error_linf,
    round_up_float32_array,
)


def _per_example(values, like):
    """[B] -> [B, 1, ..., 1], broadcastable against `like` [B, ...]."""
    return values.reshape((-1,) + (1,) * (like.ndim - 1))


# ---------------------------------------------------------------------------------------------------- l_inf


def _linf_norm(delta):
    return jnp.max(jnp.abs(delta.reshape(delta.shape[0], -1)), axis=1)


def _linf_project(x, images, eps):
    return jnp.clip(jnp.clip(x, images - eps, images + eps), 0.0, 1.0)


def _linf_random_start(key, images, eps):
    return _linf_project(images + jax.random.uniform(key, images.shape, minval=-eps, maxval=eps), images, eps)


def _linf_pair_bound(num_classes, pair_lipschitz):
    """Every logit 1-Lipschitz: each margin 2-Lipschitz; or the family's own bound where it gives one (inf
    where it claims none)."""
    if pair_lipschitz is not None:
        return np.asarray(pair_lipschitz, np.float32)
    return np.asarray(margin_lipschitz_linf(jnp.zeros((num_classes, num_classes))))


def _linf_probe_objective(logits, labels):
    """z_y: every logit's own bound is probed."""
    return true_class_logit(logits, labels)


def _linf_lipschitz_ratio(dz, delta_norm, pair_bound):
    """max_k |dz_k| / ||dx||_inf (bound: every logit 1-Lipschitz, where every margin bound is 2); divided by
    half the largest margin bound otherwise, so a family claiming no Lipschitz bound (inf) is never flagged
    while the 1-Lipschitz families are checked exactly as before."""
    logit_bound = jnp.max(jnp.asarray(pair_bound)) / 2.0
    return jnp.max(jnp.abs(dz), axis=1) / delta_norm / logit_bound


# ------------------------------------------------------------------------------------------------------ l_2


def _l2_project(x, images, eps):
    """Onto the l_2 ball, then onto [0, 1] (clipping to the box after the ball can only shrink the step)."""
    delta = x - images
    delta = delta * jnp.minimum(
        1.0, eps / jnp.maximum(_per_example(l2_norm_per_example(delta), delta), 1e-12)
    )
    return jnp.clip(images + delta, 0.0, 1.0)


def _l2_random_start(key, images, eps):
    """A uniform radius in [0, eps) in a uniform direction."""
    direction = jax.random.normal(key, images.shape)
    radius = jax.random.uniform(jax.random.fold_in(key, 1), (images.shape[0],) + (1,) * (images.ndim - 1))
    norm = jnp.maximum(_per_example(l2_norm_per_example(direction), direction), 1e-12)
    return _l2_project(images + eps * radius * direction / norm, images, eps)


def _linf_ascent_step(g, step_size):
    return step_size * jnp.sign(g)


def _l2_ascent_direction(g):
    return g / jnp.maximum(_per_example(l2_norm_per_example(g), g), 1e-12)


def _l2_ascent_step(g, step_size):
    # step_size * g first, then the division: the order PGD has always used (bit-identical attacks)
    return step_size * g / jnp.maximum(_per_example(l2_norm_per_example(g), g), 1e-12)


def _l2_unit_direction(noise):
    return noise / _per_example(l2_norm_per_example(noise), noise)


def _l2_pair_bound(num_classes, pair_lipschitz):
    """K_ab of the family's certificate_bounds."""
    del num_classes
    return np.asarray(pair_lipschitz, np.float32)


def _l2_lipschitz_ratio(dz, delta_norm, pair_bound):
    """max over class pairs (a, b) of |dz_a - dz_b| / (||dx||_2 K_ab), per example."""
    diff = jnp.abs(dz[:, :, None] - dz[:, None, :]) / _per_example(delta_norm, dz[:, :, None])
    ratio = diff / pair_bound[None]
    eye = jnp.eye(dz.shape[1], dtype=bool)[None]
    return jnp.max(jnp.where(eye, 0.0, ratio), axis=(1, 2))


# ---------------------------------------------------------------------------------------------- the record


@dataclasses.dataclass(frozen=True)
class ThreatModel:
    """One threat model: its norm, certificate, attack steps and audit probe (see the module docstring).

    Attributes:
      name: the config's name ("linf", "l2"). display: the norm as reports write it ("l_inf", "l_2").
      norm: per-example norm of perturbations [B, ...] -> [B] (jnp). norm_order: the same for numpy.
      certify: (logits, labels, eps, std, logit_error, pair_lipschitz) -> prediction / radius / certified.
      normalisation_error: (normalised images, std) -> [B] bound of the float32 normalisation's error in
        this norm (certjax.certify.rounding).
      random_start: (key, images, eps) -> a random point of the eps ball (projected).
      ascent_direction: gradient -> the steepest-ascent direction of a unit step (the audit's probe).
      ascent_step: (gradient, step size) -> PGD's step, that direction times the step size.
      project: (x, images, eps) -> x projected onto the eps ball around images, then onto [0, 1].
      unit_direction: noise -> a random direction of unit norm (the audit's random pairs).
      pair_bound: (num_classes, pair_lipschitz) -> [C, C] Lipschitz bounds of the margins z_a - z_b.
      probe_objective: (logits, labels) -> [B, ...] the output whose gradient the audit's probe follows.
      lipschitz_ratio: (dz, ||dx||, pair_bound) -> per example, empirical quotient / certified bound.
      bound_description: what the audit's Lipschitz bound is, in words.
    """

    name: str
    display: str
    norm: Callable
    norm_order: float
    certify: Callable
    normalisation_error: Callable
    random_start: Callable
    ascent_direction: Callable
    ascent_step: Callable
    project: Callable
    unit_direction: Callable
    pair_bound: Callable
    probe_objective: Callable
    lipschitz_ratio: Callable
    bound_description: str


LINF = ThreatModel(
    name="linf",
    display="l_inf",
    norm=_linf_norm,
    norm_order=np.inf,
    certify=linf_certify,
    normalisation_error=normalisation_error_linf,
    random_start=_linf_random_start,
    ascent_direction=jnp.sign,
    ascent_step=_linf_ascent_step,
    project=_linf_project,
    unit_direction=jnp.sign,
    pair_bound=_linf_pair_bound,
    probe_objective=_linf_probe_objective,
    lipschitz_ratio=_linf_lipschitz_ratio,
    bound_description="every logit 1-Lipschitz (l_inf, normalised input)",
)

L2 = ThreatModel(
    name="l2",
    display="l_2",
    norm=l2_norm_per_example,
    norm_order=2.0,
    certify=l2_certify,
    normalisation_error=normalisation_error_l2,
    random_start=_l2_random_start,
    ascent_direction=_l2_ascent_direction,
    ascent_step=_l2_ascent_step,
    project=_l2_project,
    unit_direction=_l2_unit_direction,
    pair_bound=_l2_pair_bound,
    probe_objective=smallest_margin,
    lipschitz_ratio=_l2_lipschitz_ratio,
    bound_description="K_ab = certificate_bounds pair_lipschitz for each margin z_a - z_b (l_2, normalised "
    "input)",
)

THREAT_MODELS = {model.name: model for model in (LINF, L2)}


def get_threat_model(name: str) -> ThreatModel:
    """The record of a threat model by its config name (a family's threat_model).

    Args:
      name: "linf" or "l2".
    Returns:
      Its ThreatModel; an unknown name raises ValueError listing the valid ones.
    """
    if name not in THREAT_MODELS:
        raise ValueError(f"Unknown threat model {name!r}; valid: {sorted(THREAT_MODELS)}")
    return THREAT_MODELS[name]


# ---------------------------------------------------------------------------- the input's own rounding


def input_rounding_distance(images64, images32, threat_model: ThreatModel) -> np.ndarray:
    """Per example, an upper bound of ||x64 - x32|| in the threat model's norm (pixel units), as float32.

    Args:
      images64: the images the user gave, float64 [N, ...] in [0, 1].
      images32: the float32 images they round to, [N, ...].
      threat_model: whose norm measures the distance.
    Returns:
      [N] float32, never below the exact distance: the float64 norm (a sum of D squares errs by at most
      gamma_D of it, Higham Lemma 3.1; a maximum is exact), widened by gamma_(D+1) and rounded up to float32.
    """
    delta = np.asarray(images64, np.float64) - np.asarray(images32, np.float64)  # exact: both in [0, 1]
    flat = delta.reshape(len(delta), -1)
    distance = np.linalg.norm(flat, ord=threat_model.norm_order, axis=1)
    return round_up_float32_array(distance * (1.0 + gamma(flat.shape[1] + 1, np.float64)))


def radius_after_input_rounding(radius, distance) -> np.ndarray:
    """The certified radius around x64 from the radius around x32 and an upper bound of their distance.

    Args:
      radius: [N] float32 certified radii of the float32 images (pixel units).
      distance: [N] float32 upper bounds of ||x64 - x32|| (input_rounding_distance).
    Returns:
      [N] float32 radius - distance, rounded down (one float32 step towards 0 after the subtraction, whose
      rounding is at most half a step), never below 0; unchanged where the distance is 0.
    """
    radius = np.asarray(radius, np.float32)
    distance = np.asarray(distance, np.float32)
    shrunk = np.nextafter(radius - distance, np.float32(0))
    return np.where(distance > 0, np.maximum(shrunk, np.float32(0)), radius).astype(np.float32)
