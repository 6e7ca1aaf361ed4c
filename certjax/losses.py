"""Training losses, found by name (`config.loss.name`).

Every loss has the signature `loss(logits, logit_scale, labels, schedule, loss_config) -> [B]` (per example;
the trainer averages). `schedule` holds the traced per-step values (`lam`, `eps_train` in normalised input
units, ...), so changing them never recompiles.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def margins(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """m[b, j] = z_y - z_j, with +inf at j = y (masked by index, never by value)."""
    true_logit = jnp.take_along_axis(logits, labels[:, None], axis=1)
    is_true = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
    return jnp.where(is_true, jnp.inf, true_logit - logits)


def cross_entropy(logits, logit_scale, labels, schedule, loss_config):
    del schedule, loss_config
    return optax.softmax_cross_entropy_with_integer_labels(logit_scale * logits, labels)


def mixture(logits, logit_scale, labels, schedule, loss_config):
    """l_inf-dist Net v2 loss (zbh2047/L_inf-dist-net-v2, train.py, loss "mixture"):

    clip(1 - min_j (z_y - z_j) / theta, 0, 1) + lam * CE(s * z, y),  theta = 2 * eps_train,

    on raw logits z (each 1-Lipschitz in l_inf, so the margin is 2-Lipschitz and theta is the margin needed to
    certify eps_train). max_j clip(1 - m_j/theta, 0, 1) equals the clip of the smallest margin.
    """
    del loss_config
    theta = 2.0 * schedule["eps_train"]
    smallest_margin = jnp.min(margins(logits, labels), axis=-1)
    hinge = jnp.clip(1.0 - smallest_margin / theta, 0.0, 1.0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logit_scale * logits, labels)
    return hinge + schedule["lam"] * ce


LOSSES = {"cross_entropy": cross_entropy, "mixture": mixture}


def get_loss(name: str):
    if name not in LOSSES:
        raise ValueError(f"Unknown loss {name!r}; valid: {sorted(LOSSES)}")
    return LOSSES[name]
