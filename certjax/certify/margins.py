"""Certified radii from logit margins and Lipschitz bounds (shared/DESIGN.md, "Certification").

For logits z(x) and true class y, the margins m_j = z_y - z_j (j != y).

* l_inf families (l_inf-dist Net, SortNet): every logit is 1-Lipschitz w.r.t. l_inf of the *normalised*
  input, so each m_j is 2-Lipschitz and the input-space radius is min_j m_j / 2 (ICML'21, Prop. 3.5).
* l_2 families (LOT, LiResNet): the family measures K_yj >= Lipschitz constant of m_j w.r.t. l_2 (body bound
  times ||w_y - w_j|| of the last layer) and the radius is min_j m_j / K_yj (LOT: K = sqrt(2) L_body).

Input normalisation x' = (x - mean) / std scales a pixel-space perturbation delta to delta / std per channel,
whose norm is at most ||delta|| / min(std) (l_inf and l_2 alike). So a radius r' in normalised space is a
radius r' * min(std) in pixel space. `pixel_radius_scale` is the one place this is folded in.

Rounding: logits are computed in float32, so the computed margin can exceed the exact one by accumulated
rounding error. Families that can bound it (the l_inf-dist layers sow a per-op bound, see
`models.common.layers.sow_rounding_error`) pass `logit_error`, a per-example bound of every logit's absolute
error, and margins are reduced by 2 * logit_error; on top of that every margin is reduced by
`rounding_slack(...)`, and the comparison is strict: a point on the boundary (or any tie, e.g. all-zero
logits) is never certified.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from certjax.certify.rounding import round_up_float32, round_up_float32_array

# Margin slack for float32 rounding of the logits: RELATIVE * (|z_y| + |z_j|) + ABSOLUTE. A float32 distance
# layer adds a few ulps (2^-24 relative) of its operand magnitudes per layer; for the depths used here
# (<= ~40 layers) and magnitudes < 1e3, 1e-5 relative + 1e-5 absolute bounds this with a wide safety factor.
RELATIVE_ROUNDING = 1e-5
ABSOLUTE_ROUNDING = 1e-5


def true_class_logit(logits, labels):
    """z_y per example, [B, 1] (picked by index)."""
    return jnp.take_along_axis(logits, labels[:, None], axis=1)


def mask_true_class(values, labels, fill):
    """values [B, C] with the true class's entry replaced by `fill`: masked by index, never by value, so that
    a tie between the true logit and another (or a diagonal that is not exactly 0) cannot move it. The one
    mask that margins, bounds, losses, attacks and the audit use."""
    is_true = jax.nn.one_hot(labels, values.shape[-1], dtype=bool)
    return jnp.where(is_true, fill, values)


def margins(logits, labels):
    """m[b, j] = z_y - z_j, with +inf at j = y."""
    return mask_true_class(true_class_logit(logits, labels) - logits, labels, jnp.inf)


def smallest_margin(logits, labels):
    """z_y - max_{j != y} z_j, [B] (negative: misclassified)."""
    best_other = jnp.max(mask_true_class(logits, labels, -jnp.inf), axis=-1)
    return true_class_logit(logits, labels)[:, 0] - best_other


def pixel_radius_scale(std) -> float:
    """Normalised-space radius -> pixel-space radius: multiply by min(std) (rounded down)."""
    scale = float(np.min(np.asarray(std, np.float64)))
    return float(np.nextafter(np.float32(scale), np.float32(0)))


def pair_lipschitz_matrix(pair_bounds) -> np.ndarray:
    """K_yj for the l_2 certifier from float64 per-pair bounds (body bound x head row distance): rounded up to
    float32, diagonal 1 (the true class has no margin with itself; the value is never used)."""
    pair_bounds = np.array(pair_bounds, np.float64)
    np.fill_diagonal(pair_bounds, 1.0)
    return round_up_float32_array(pair_bounds)


def rounding_slack(true_logit, other_logits):
    return RELATIVE_ROUNDING * (jnp.abs(true_logit) + jnp.abs(other_logits)) + ABSOLUTE_ROUNDING


def margin_lipschitz_linf(logits):
    """Lipschitz constant of each margin z_y - z_j w.r.t. l_inf when every logit is 1-Lipschitz: 2."""
    return jnp.full(logits.shape, 2.0, logits.dtype)


@functools.partial(jax.jit, static_argnames=("pixel_scale",))
def certify_from_margins(logits, labels, margin_lipschitz, eps, logit_error, *, pixel_scale: float):
    """Per-example prediction, certified radius (pixel units) and certified flag at eps (pixel units).

    margin_lipschitz[b, j] bounds the Lipschitz constant of z_y - z_j in normalised input space (the entry at
    j = y is ignored). radius = min_j (m_j - slack_j) / margin_lipschitz_j, clipped at 0; a misclassified
    point has radius 0 (its smallest margin is <= 0). certified = prediction correct and radius > eps.
    """
    logits = logits.astype(jnp.float32)
    true_logit = true_class_logit(logits, labels)
    slack = rounding_slack(true_logit, logits) + 2.0 * logit_error[:, None]
    ratio = (true_logit - logits - slack) / margin_lipschitz
    # A NaN proves nothing (inf / inf where a family claims no bound and its error is infinite, or a NaN
    # logit): it must never reach the min below, which XLA:CPU computes by dropping NaNs (found issue 25).
    ratio = jnp.where(jnp.isnan(ratio), -jnp.inf, ratio)
    per_class = mask_true_class(ratio, labels, jnp.inf)
    radius_normalised = jnp.maximum(jnp.min(per_class, axis=-1), 0.0)
    # Round the pixel radius down so that it never exceeds the normalised one times min(std).
    radius = jnp.nextafter(radius_normalised * pixel_scale, jnp.float32(0))
    radius = jnp.maximum(radius, 0.0)
    prediction = jnp.argmax(logits, axis=-1)
    correct = prediction == labels
    certified = correct & (radius > eps)
    return {"prediction": prediction, "correct": correct, "radius": radius, "certified": certified}


def linf_certify(logits, labels, eps: float, std, logit_error=None, pair_lipschitz=None):
    """l_inf certificate for networks whose every logit is 1-Lipschitz in l_inf (normalised space).

    logit_error: optional [B] bound of the absolute float32 error of every logit of each example.
    pair_lipschitz: None (every margin is 2-Lipschitz: the 1-Lipschitz families), or the family's own [C, C]
    bound of every margin (inf where it claims none: sortnet_hybrid's tanh head).
    """
    if logit_error is None:
        logit_error = jnp.zeros(logits.shape[:1], jnp.float32)
    if pair_lipschitz is None:
        lipschitz = margin_lipschitz_linf(logits)
    else:  # the row of the class each margin is taken against: [B, C]
        lipschitz = jnp.asarray(pair_lipschitz, logits.dtype)[labels]
    return certify_from_margins(
        logits,
        labels,
        lipschitz,
        round_up_float32(eps),
        logit_error,
        pixel_scale=pixel_radius_scale(std),
    )


def l2_certify(logits, labels, eps: float, std, logit_error=None, pair_lipschitz=None):
    """l_2 certificate (LOT, LiResNet): pair_lipschitz[y, j] bounds the l_2 Lipschitz constant of z_y - z_j
    w.r.t. the normalised input (e.g. L_body * ||w_y - w_j|| of the last layer; sqrt(2) for an orthogonal
    network). Certified iff correct and min_j (m_j - slack) / K_yj > eps, i.e. m_j > eps K_yj for every j.

    logit_error: optional [B] bound of the l_2 norm of the float32 error of the logit vector.
    """
    if pair_lipschitz is None:
        raise ValueError("l_2 certification needs pair_lipschitz (the family's certificate_bounds)")
    if logit_error is None:
        logit_error = jnp.zeros(logits.shape[:1], jnp.float32)
    margin_lipschitz = jnp.asarray(pair_lipschitz, jnp.float32)[labels]
    return certify_from_margins(
        logits,
        labels,
        margin_lipschitz,
        round_up_float32(eps),
        logit_error,
        pixel_scale=pixel_radius_scale(std),
    )


CERTIFY_METHODS = ("margin", "ibp", "both")


def certify_method(config, family) -> str:
    """config.certify.method checked against the family: "margin" (the Lipschitz margin), "ibp" (interval
    bounds over the input box, certjax.certify.interval) or "both" (certified if either proves it).

    Args:
      config: the run's config (certify.method, model.name).
      family: its certjax.models.Family; `interval_bounds` says whether it has interval bounds (the l_inf
        families).

    Returns:
      The method; a config saved before the switch has none: "both" where the family has interval bounds,
      else "margin". Bad values raise ValueError naming the fix."""
    supports = family.interval_bounds
    method = config.certify.get("method", None)
    if method is None:
        return "both" if supports else "margin"
    if method not in CERTIFY_METHODS:
        raise ValueError(f"certify.method {method!r}; use one of {', '.join(CERTIFY_METHODS)}")
    if method != "margin" and not supports:
        raise ValueError(
            f"certify.method {method!r}: interval bounds exist only for the l_inf families (linf_dist, "
            f"sortnet); model.name {config.model.name!r} is certified by its {family.threat_model} Lipschitz "
            "margin: use --config.certify.method=margin"
        )
    return method
