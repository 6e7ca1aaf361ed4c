"""The optimisers by name (`OPTIMIZERS`), and the two that optax does not have in the original code's form.

Moved from certjax/optimizers.py (the two optimisers) and certjax/train.py make_optimizer (the per-name
branches, now the registry). Lookahead, which wraps any of them, is in certjax/optim/lookahead.py.

* `adamw_lp`: the l_inf-dist Net v1 AdamW whose weight decay follows the current l_p norm.
* `torch_nadam` (`scale_by_torch_nadam`): torch.optim.NAdam, with its momentum-decay schedule (LiResNet++).

adamw_lp (zbh2047/L_inf-dist-net adamw.py, ICML'21 Sec. 5.1). The original decays each row r of a parameter
(axis 0: an output unit's weights; a bias row is one number) by the gradient of (1/2) ||r||_p^2 at the
layer's current p, decoupled from Adam and scaled by the current learning rate:

    r_i <- r_i - lr * wd * r_i |r_i|^(p-2) / ||r||_p^(p-2)      (finite p; p = 2 is plain decay)
    r_k <- r_k - lr * wd * r_k   at k = argmax_i |r_i|          (p = inf; the other entries are untouched)

It writes |r_i|^2 as r_i^2 + eps (the optimiser's eps, 1e-10) before normalising by the row's largest
square, which keeps the powers finite at r_i = 0; this follows that. One-element rows (biases, the
logit scale) get plain decay for every p. The decay uses the parameters before the step, like the
original, which decays in place before its Adam update. p comes from the train step as the optimiser's
extra argument `p_norm` (the same traced value the model used), so a changing p never recompiles.

NAdam (hukkai/liresnet train.py: `torch.optim.NAdam(lr, weight_decay)`): see `scale_by_torch_nadam`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


def lp_decay_direction(param, p, eps):
    """Gradient of (1/2) ||row||_p^2 for every row (axis 0) of param, in the original's numerics.

    Args:
      param: one parameter array (a scalar counts as one row of one element).
      p: traced float32 scalar >= 1, or inf.
      eps: added to every square before normalising (the optimiser's eps).

    Returns:
      An array of param's shape.
    """
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
    both scaled by the (scheduled) learning rate.

    Args:
      learning_rate: a float or an optax schedule.
      b1, b2, eps: Adam's.
      weight_decay: the l_p decay's rate (0 = none).

    Returns:
      An optax chain whose update takes the extra argument p_norm.
    """
    return optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        add_lp_decayed_weights(weight_decay, eps),
        optax.scale_by_learning_rate(learning_rate),
    )


# ------------------------------------------------------------------------------------------------- NAdam


class TorchNadamState(NamedTuple):
    count: jax.Array  # steps taken (torch: state["step"])
    mu_product: jax.Array  # prod_{i <= count} mu_i, float32 like torch's state["mu_product"]
    mu: optax.Updates  # first moment m_t
    nu: optax.Updates  # second moment v_t


def scale_by_torch_nadam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, momentum_decay: float = 4e-3):
    """The direction of torch.optim.NAdam (torch/optim/nadam.py, its documented algorithm), to be scaled by
    -lr (optax.scale_by_learning_rate). At step t (from 1), with gradient g:

        mu_t = b1 (1 - 0.5 * 0.96^(t psi)),  mu_{t+1} likewise,  psi = momentum_decay
        m_t = b1 m_{t-1} + (1 - b1) g,  v_t = b2 v_{t-1} + (1 - b2) g^2
        direction = [(1 - mu_t) / (1 - prod_{i<=t} mu_i) g + mu_{t+1} / (1 - prod_{i<=t+1} mu_i) m_t]
                    / (sqrt(v_t / (1 - b2^t)) + eps)

    optax.nadam (scale_by_adam(nesterov=True)) is not this: it uses b1 itself where torch uses the warming
    mu_t (which starts near b1 / 2 and reaches b1 only after ~10^4 steps at psi 4e-3) and bias-corrects with
    powers of b1 instead of the product of the mu_i. torch's coupled weight decay (grad + wd * param) is
    optax.add_decayed_weights before this transformation.
    """
    log_b2 = math.log(b2)  # 1 - b2^t = -expm1(t log b2): no cancellation in float32 at small t
    log_decay = momentum_decay * math.log(0.96)

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return TorchNadamState(
            count=jnp.zeros((), jnp.int32), mu_product=jnp.ones((), jnp.float32), mu=zeros, nu=zeros
        )

    def update(updates, state, params=None):
        del params
        count = state.count + 1
        t = count.astype(jnp.float32)
        mu_t = b1 * (1.0 - 0.5 * jnp.exp(t * log_decay))
        mu_next = b1 * (1.0 - 0.5 * jnp.exp((t + 1.0) * log_decay))
        mu_product = state.mu_product * mu_t
        mu_product_next = mu_product * mu_next
        bias_correction2 = -jnp.expm1(t * log_b2)
        grad_coefficient = (1.0 - mu_t) / (1.0 - mu_product)
        moment_coefficient = mu_next / (1.0 - mu_product_next)
        mu = jax.tree.map(lambda m, g: b1 * m + (1.0 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1.0 - b2) * g * g, state.nu, updates)
        direction = jax.tree.map(
            lambda g, m, v: (
                (grad_coefficient * g + moment_coefficient * m) / (jnp.sqrt(v / bias_correction2) + eps)
            ),
            updates,
            mu,
            nu,
        )
        return direction, TorchNadamState(count=count, mu_product=mu_product, mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


def torch_nadam(learning_rate, b1: float, b2: float, eps: float, momentum_decay: float, weight_decay: float):
    """torch.optim.NAdam(lr, betas=(b1, b2), eps, weight_decay, momentum_decay): L2 weight decay added to
    the gradient (torch's default, not decoupled), then the NAdam direction times the scheduled lr.

    Args:
      learning_rate: a float or an optax schedule; the other arguments are torch's.

    Returns:
      An optax chain.
    """
    chain = [scale_by_torch_nadam(b1, b2, eps, momentum_decay), optax.scale_by_learning_rate(learning_rate)]
    if weight_decay:
        chain.insert(0, optax.add_decayed_weights(weight_decay))
    return optax.chain(*chain)


# ------------------------------------------------------------------------------------------- the registry
# Each factory: (optimizer config, learning rate schedule, decay) -> optax transformation. decay = False
# switches the weight decay off for the parameter group (SortNet's optimizer.decay_scale_only).


def _adam(opt_config, learning_rate, decay: bool):
    del decay  # plain Adam has no weight decay
    return optax.adam(learning_rate, b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps)


def _adamw(opt_config, learning_rate, decay: bool):
    return optax.adamw(
        learning_rate,
        b1=opt_config.b1,
        b2=opt_config.b2,
        eps=opt_config.eps,
        weight_decay=opt_config.weight_decay if decay else 0.0,
    )


def _adamw_lp(opt_config, learning_rate, decay: bool):
    decay_rate = opt_config.weight_decay if decay else 0.0
    return adamw_lp(learning_rate, opt_config.b1, opt_config.b2, opt_config.eps, decay_rate)


def _nadam(opt_config, learning_rate, decay: bool):
    # torch.optim.NAdam (LiResNet++); optax.nadam differs (scale_by_torch_nadam's docstring)
    decay_rate = opt_config.weight_decay if decay else 0.0
    momentum_decay = opt_config.get("momentum_decay", 4e-3)
    betas = (opt_config.b1, opt_config.b2)
    return torch_nadam(learning_rate, *betas, opt_config.eps, momentum_decay, decay_rate)


def _sgd(opt_config, learning_rate, decay: bool):
    del decay  # SGD decays every group by optimizer.weight_decay, as it always has
    chain = [optax.sgd(learning_rate, momentum=opt_config.get("momentum", 0.9))]
    if opt_config.weight_decay:
        chain.insert(0, optax.add_decayed_weights(opt_config.weight_decay))
    return optax.chain(*chain)


# config.optimizer.name -> factory; config_checks validates the name against these keys
OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adam": _adam,
    "adamw": _adamw,
    "adamw_lp": _adamw_lp,
    "nadam": _nadam,
    "sgd": _sgd,
}
