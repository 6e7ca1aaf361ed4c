"""The l_inf-dist Net v1 optimiser: AdamW whose weight decay follows the current l_p norm
(zbh2047/L_inf-dist-net adamw.py, ICML'21 Sec. 5.1).

The original decays each row r of a parameter (axis 0: an output unit's weights; a bias row is one number)
by the gradient of (1/2) ||r||_p^2 at the layer's current p, decoupled from Adam and scaled by the current
learning rate:

    r_i <- r_i - lr * wd * r_i |r_i|^(p-2) / ||r||_p^(p-2)      (finite p; p = 2 is plain decay)
    r_k <- r_k - lr * wd * r_k   at k = argmax_i |r_i|          (p = inf; the other entries are untouched)

It writes |r_i|^2 as r_i^2 + eps (the optimiser's eps, 1e-10) before normalising by the row's largest
square, which keeps the powers finite at r_i = 0; this follows that. One-element rows (biases, the
logit scale) get plain decay for every p. The decay uses the parameters before the step, like the
original, which decays in place before its Adam update. p comes from the train step as the optimiser's
extra argument `p_norm` (the same traced value the model used), so a changing p never recompiles.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def lp_decay_direction(param, p, eps):
    """Gradient of (1/2) ||row||_p^2 for every row (axis 0) of param, in the original's numerics."""
    rows = param.reshape(param.shape[0], -1) if param.ndim else param.reshape(1, 1)

    def finite():
        squares = rows * rows + eps
        normalised = squares / jnp.max(squares, axis=1, keepdims=True)
        safe_p = jnp.where(jnp.isinf(p), 2.0, p)
        powers = normalised ** (safe_p / 2 - 1)
        total = jnp.sum(normalised * powers, axis=1, keepdims=True)
        return total ** (2 / safe_p - 1) * powers * rows

    def infinite():
        largest = jnp.argmax(jnp.abs(rows), axis=1)
        return jnp.where(jnp.arange(rows.shape[1])[None, :] == largest[:, None], rows, 0.0)

    return jax.lax.cond(jnp.isinf(p), infinite, finite).reshape(param.shape)


def add_lp_decayed_weights(weight_decay: float, eps: float) -> optax.GradientTransformationExtraArgs:
    """updates + weight_decay * lp_decay_direction(params, p_norm), p_norm an extra argument of update."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None, *, p_norm=jnp.inf, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("add_lp_decayed_weights needs the parameters")
        p = jnp.asarray(p_norm, jnp.float32)
        updates = jax.tree.map(lambda u, w: u + weight_decay * lp_decay_direction(w, p, eps), updates, params)
        return updates, state

    return optax.GradientTransformationExtraArgs(init, update)


def adamw_lp(learning_rate, b1: float, b2: float, eps: float, weight_decay: float):
    """Adam (the original's bias-corrected moments, eps outside the square root) plus the l_p weight decay,
    both scaled by the (scheduled) learning rate."""
    return optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        add_lp_decayed_weights(weight_decay, eps),
        optax.scale_by_learning_rate(learning_rate),
    )
