"""Training losses, found by name (`config.loss.name`).

Every loss has the signature `loss(logits, logit_scale, labels, schedule, loss_config) -> [B]` (per example;
the trainer averages); `logit_scale` is the model's second output (LiResNet: its pair bound K ||w_i - w_j||).
`schedule` holds the traced per-step values (`lam`, `eps_train` in normalised input units, ...), so changing
them never recompiles.
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


def emma(logits, pair_bound, labels, schedule, loss_config):
    """EMMA-style margin loss of LiResNet (hu23 snapshot, margin_layer_v2): every other logit raised by what
    an eps_train perturbation can gain on it, z'_i = z_i + eps_train * K_yi (K_yi = K ||w_y - w_i||, the
    model's second output; K_yy = 0), then CE(z', y).

    pair_bound [C, C] comes from the model (power-iteration K, differentiable w.r.t. the kernels); eps_train
    is in normalised input units (the trainer converts it, with any eps ramp applied, see schedules.py).
    """
    del loss_config
    raised = logits + schedule["eps_train"] * pair_bound[labels]
    return optax.softmax_cross_entropy_with_integer_labels(raised, labels)


def gloro_trades(logits, pair_bound, labels, schedule, loss_config):
    """GloRo TRADES loss (hu23 snapshot, margin_layer; klasleino/gloro training/losses.py Trades):
    CE(z, y) + lambda * KL(softmax(z) with a 0 bottom class || softmax([z, z_bot])), where the bottom logit
    z_bot = max_{i != p} z_i + eps_train * K_pi is the best logit an eps_train perturbation can reach against
    the prediction p = argmax z.

    The KL has a closed form: for every real class the log-ratio is logsumexp([z, z_bot]) - logsumexp(z),
    so KL = logsumexp([z, z_bot]) - logsumexp(z) = softplus(z_bot - logsumexp(z)). (The snapshot writes it as
    log_softmax(z)[:, 0] - log_softmax([z, z_bot])[:, 0]: the same number, class 0 being any real class.)
    loss_config.trades_lambda weighs it (the snapshot's lambda_kl, default 1).
    """
    prediction = jnp.argmax(logits, axis=-1)
    is_prediction = jax.nn.one_hot(prediction, logits.shape[-1], dtype=bool)
    reachable = logits + schedule["eps_train"] * pair_bound[prediction]
    bottom = jnp.max(jnp.where(is_prediction, -jnp.inf, reachable), axis=-1)
    log_partition = jax.nn.logsumexp(logits, axis=-1)
    kl = jax.nn.softplus(bottom - log_partition)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return ce + loss_config.get("trades_lambda", 1.0) * kl


LOSSES = {"cross_entropy": cross_entropy, "mixture": mixture, "emma": emma, "gloro_trades": gloro_trades}


def get_loss(name: str):
    if name not in LOSSES:
        raise ValueError(f"Unknown loss {name!r}; valid: {sorted(LOSSES)}")
    return LOSSES[name]
