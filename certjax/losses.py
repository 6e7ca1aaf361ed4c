"""Training losses, found by name (`config.loss.name`).

Every loss has the signature `loss(logits, logit_scale, labels, schedule, loss_config) -> [B]` (per example;
the trainer averages; with `loss.bound = "ibp"` the trainer also passes `logit_bounds=(lower, upper)`,
interval bounds of the logits over the eps_train ball); `logit_scale` is the model's second output
(LiResNet: its pair bound K ||w_i - w_j||).
`schedule` holds the traced per-step values (`lam`, `eps_train` in normalised input units, ...), so changing
them never recompiles.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from certjax.certify.margins import margins, mask_true_class, true_class_logit


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


def hinge(logits, logit_scale, labels, schedule, loss_config, logit_bounds=None):
    """l_inf-dist Net v1 loss (zbh2047/L_inf-dist-net main.py `hinge(mix)` with kappa 1, on the worst-case
    margins of model/model.py + bound_module.py BoundFinalIdentity):

    u_j >= z_j - z_y over the l_inf ball of radius eps_train, u_y = 0;
    loss = mix * max_j relu(u_j) + (1 - mix) * mean_j relu(u_j)   (the mean over all C classes, u_y included).

    loss_config.bound says where u comes from:
    * "lipschitz" (the original's training): every raw logit is 1-Lipschitz in l_inf, so
      u_j = (z_j + eps_train) - (z_y - eps_train) = z_j - z_y + 2 eps_train (the original passes no input
      bounds in training, and its Model then takes logit +- eps as the bounds);
    * "ibp": u_j = upper(z_j) - lower(z_y) from interval bounds through every layer (logit_bounds, given by
      the trainer; certjax.certify.interval.margin_upper_bounds).
    """
    del logit_scale
    mix = loss_config.get("mix", 0.75)
    if loss_config.get("bound", "lipschitz") == "ibp":
        if logit_bounds is None:
            raise ValueError(
                "loss.bound='ibp' needs the logit bounds from the model (certjax.certify.interval)"
            )
        from certjax.certify.interval import margin_upper_bounds

        upper = margin_upper_bounds(*logit_bounds, labels)
    else:
        gap = logits - true_class_logit(logits, labels) + 2.0 * schedule["eps_train"]
        upper = mask_true_class(gap, labels, 0.0)
    positive = jax.nn.relu(upper)
    return mix * jnp.max(positive, axis=-1) + (1.0 - mix) * jnp.mean(positive, axis=-1)


LOSS_BOUNDS = ("lipschitz", "ibp")


def ce_hinge(logits, logit_scale, labels, schedule, loss_config, logit_bounds=None):
    """SortNet's hybrid-model loss (zbh2047/SortNet main.py `ce_hinge`, with `SortHybridModel`'s bounds):

    correct_b * max(0, max_{j != y} s u_j + 1) + lam * CE(s z, y),

    u_j >= z_j - z_y the interval bound over the eps_train box (logit_bounds, the trainer's with
    loss.bound = "ibp"; certjax.certify.interval.margin_upper_bounds), s the logit scale, correct_b whether
    the clean prediction argmax z is y (no gradient), lam = schedule["lam"] (geometric from loss.lam0 to
    loss.lam_end with the p schedule's progress, certjax.optim.schedules). The original's max over all
    classes of (s u_j + 1) with 0 at j = y is the max(0, ...) above.
    """
    del loss_config
    if logit_bounds is None:
        raise ValueError("ce_hinge needs interval bounds of the logits: set loss.bound='ibp'")
    from certjax.certify.interval import margin_upper_bounds

    worst = mask_true_class(logit_scale * margin_upper_bounds(*logit_bounds, labels) + 1.0, labels, 0.0)
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(logits.dtype)
    ce = optax.softmax_cross_entropy_with_integer_labels(logit_scale * logits, labels)
    return correct * jnp.max(worst, axis=-1) + schedule["lam"] * ce


def ibp_cross_entropy(logits, logit_scale, labels, schedule, loss_config, logit_bounds=None):
    """l_inf-dist Net+MLP loss (zbh2047/L_inf-dist-net main.py `Loss` around `cross_entropy`, with the
    worst-case margins of model/bound_module.py `BoundFinalLinear`):

    kappa * CE(u, y) + (1 - kappa) * CE(z, y),

    u_j >= z_j - z_y the interval bound over the eps_train box (logit_bounds, the trainer's with
    loss.bound = "ibp"; certjax.certify.interval.margin_upper_bounds), u_y = 0; z the raw logits (the
    original feeds CE the margins z - z_y, the same CE: it is shift invariant). kappa = loss.kappa, fixed
    (the original sets it to --kappa at every step). No logit scale: the original has none.
    """
    del logit_scale, schedule
    if logit_bounds is None:
        raise ValueError("ibp_cross_entropy needs interval bounds of the logits: set loss.bound='ibp'")
    from certjax.certify.interval import margin_upper_bounds

    kappa = loss_config.get("kappa", 1.0)
    worst = optax.softmax_cross_entropy_with_integer_labels(
        margin_upper_bounds(*logit_bounds, labels), labels
    )
    clean = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return kappa * worst + (1.0 - kappa) * clean


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


def emma_exact(logits, pair_bound, labels, schedule, loss_config):
    """Exact EMMA of LiResNet++ (hukkai/liresnet HEAD, models/margin_layer.py `emma_loss`): each wrong class
    is raised only as far as an eps-perturbation needs to overtake the true class, at least 1 % and at most
    all of eps_train:

        d_i = z_i - z_y,  m_i = K_yi = pair_bound[y, i],
        eps_i = clip(-d_i / max(m_i eps, 1e-8), 0.01, 1)      detached (the original's eps_ji.detach()),
        z'_i = d_i + eps_i eps m_i,  loss = CE(z', y).

    Only eps_i is detached: the gradient flows through d_i and through m_i (K and the head rows), as in the
    original. The true class gets z'_y = 0 (d_y = 0 and m_y = 0 there; set by index so a family whose
    diagonal is not exactly 0 cannot move it). eps is schedule["eps_train"] in normalised input units with
    the eps ramp applied (LiResNet++: 0.1 -> 3.0 x 36/255 over the first half, config.loss.eps_ramp).
    """
    del loss_config
    return optax.softmax_cross_entropy_with_integer_labels(
        emma_logits(logits, pair_bound, labels, schedule), labels
    )


def emma_logits(logits, pair_bound, labels, schedule):
    """z' of emma_exact [B, C] (z'_y = 0), which the LA loss also takes."""
    eps = schedule["eps_train"]
    gap = logits - true_class_logit(logits, labels)  # d_i
    margin_bound = pair_bound[labels]  # m_i, [B, C]
    needed = -gap / jnp.maximum(margin_bound * eps, 1e-8)
    fraction = jax.lax.stop_gradient(jnp.clip(needed, 0.01, 1.0))  # eps_i
    raised = gap + fraction * eps * margin_bound
    return mask_true_class(raised, labels, 0.0)


def logit_annealing(logits, pair_bound, labels, schedule, loss_config):
    """Logit annealing on the exact-EMMA logits (BRONet, bronet/models/margin_layer.py LA loss with EMMA):

        u = (z' - xi onehot(y)) / T,  CE = -log softmax(u)_y,  p = exp(-CE) (not detached),
        loss = T (1 - p)^beta CE,

    z' as emma_exact (the eps ramp in schedule["eps_train"]); beta = loss.la_beta (5), T =
    loss.la_temperature (0.75), xi = loss.la_offset (2), every BRONet config's values. 1 - p is computed as
    -expm1(-CE): exact where p is close to 1, which is where the factor anneals the loss away."""
    raised = emma_logits(logits, pair_bound, labels, schedule)
    temperature = loss_config.get("la_temperature", 0.75)
    offset = loss_config.get("la_offset", 2.0)
    shifted = (raised - offset * jax.nn.one_hot(labels, logits.shape[-1], dtype=raised.dtype)) / temperature
    ce = optax.softmax_cross_entropy_with_integer_labels(shifted, labels)
    return temperature * jnp.power(-jnp.expm1(-ce), loss_config.get("la_beta", 5.0)) * ce


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
    reachable = logits + schedule["eps_train"] * pair_bound[prediction]
    bottom = jnp.max(mask_true_class(reachable, prediction, -jnp.inf), axis=-1)  # the prediction masked
    log_partition = jax.nn.logsumexp(logits, axis=-1)
    kl = jax.nn.softplus(bottom - log_partition)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return ce + loss_config.get("trades_lambda", 1.0) * kl


LOSSES = {
    "cross_entropy": cross_entropy,
    "mixture": mixture,
    "hinge": hinge,
    "ce_hinge": ce_hinge,
    "ibp_cross_entropy": ibp_cross_entropy,
    "emma": emma,
    "emma_exact": emma_exact,
    "gloro_trades": gloro_trades,
    "logit_annealing": logit_annealing,
}


def get_loss(name: str):
    if name not in LOSSES:
        raise ValueError(f"Unknown loss {name!r}; valid: {sorted(LOSSES)}")
    return LOSSES[name]
