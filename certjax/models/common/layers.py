"""Lipschitz building blocks shared by the model families.

MeanShift is the normalisation of the l_inf-dist Net (Zhang et al., ICML'21, Sec. 5.1; reference
zbh2047/L_inf-dist-net-v2 model/norm_dist.py): subtract the per-neuron batch mean in training and a running
mean at evaluation. It has no scale, so at evaluation it is a constant shift and keeps every unit's Lipschitz
constant unchanged.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from certjax.certify.interval import Interval, shift_bounds
from certjax.certify.norms import l2_norm_per_example
from certjax.certify.rounding import FLOAT32_SPACING_AT_ONE

# 2 x float32 unit roundoff: one rounding of a result r is at most 2^-24 |r_exact|, and |r_exact| <=
# |r_computed| (1 + 2^-24); 2^-23 |r_computed| covers both with room to spare.


def check_certifying(module: nn.Module, certify: bool) -> bool:
    """certify, checked: a certifying forward must be able to sow its rounding bounds (run it through
    certjax.models.certified_logits, which asks for the "rounding" collection)."""
    if certify and not module.is_mutable_collection("rounding"):
        raise ValueError("certify=True needs mutable=['rounding']: use certjax.models.certified_logits")
    return certify and not module.is_initializing()


def sow_rounding_error(module: nn.Module, result, certify: bool):
    """Record an upper bound of the rounding error of one elementwise float32 op, per example.

    For l_inf-Lipschitz-1 networks the error of every unit's value propagates to the logits with factor <= 1
    (every later op is 1-Lipschitz in l_inf), so the sum of these per-op bounds bounds each logit's error.
    The certifying forward (certify=True, certjax.models.certified_logits) certifies with margins reduced by
    twice the sum; otherwise this is a no-op.
    """
    if certify and not module.is_initializing():
        bound = FLOAT32_SPACING_AT_ONE * jnp.max(jnp.abs(result).reshape(result.shape[0], -1), axis=1)
        module.sow("rounding", "abs_error", bound, init_fn=lambda: 0.0, reduce_fn=lambda a, b: a + b)


class MeanShift(nn.Module):
    """y = x - mean(x over the batch) in training, x - running_mean at evaluation (axis 0 is the batch).

    stat_mask [B, F] (0/1), when given, restricts each unit's batch mean to the samples marked 1: SortNet's
    dropout training computes a unit only for the samples whose next layer keeps it (zbh2047/SortNet
    MeanShiftDropout). A unit with no such sample keeps its running mean. The batch mean is also sown into
    "batch_means" when that collection is mutable, for recomputing running means exactly (SortNet).
    """

    momentum: float = 0.1  # PyTorch convention: running = (1 - momentum) * running + momentum * batch_mean

    @nn.compact
    def __call__(self, x, *, train: bool, stat_mask=None, interval: Interval | None = None, certify=False):
        """Returns (shifted x, shifted interval): the same mean (the batch mean of x in training, the running
        mean at evaluation) taken off x and off both ends of `interval` (the Interval of x, or None)."""
        running_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(x.shape[1:], jnp.float32))
        if not train:
            shifted = x - running_mean.value
            sow_rounding_error(self, shifted, certify)
            return shifted, _shifted(interval, -running_mean.value)
        if stat_mask is None:
            batch_mean = jnp.mean(x, axis=0)
        else:
            count = jnp.sum(stat_mask, axis=0)
            batch_mean = jnp.where(
                count > 0, jnp.sum(x * stat_mask, axis=0) / jnp.maximum(count, 1.0), running_mean.value
            )
        if self.is_mutable_collection("batch_means") and not self.is_initializing():
            self.sow("batch_means", "mean", batch_mean)
        if not self.is_initializing():
            running_mean.value = (1.0 - self.momentum) * running_mean.value + self.momentum * batch_mean
        return x - batch_mean, _shifted(interval, -batch_mean)


def _shifted(interval: Interval | None, shift) -> Interval | None:
    """The interval shifted by `shift` and rounded outward (None stays None)."""
    return None if interval is None else shift_bounds(*interval, shift)


# ---------------------------------------------------------------------------------------- l_2 building blocks


def max_min(x):
    """MaxMin (Anil et al., 2019; LOT's activation): channels split into halves a, b ->
    [max(a, b), min(a, b)].

    Per pair it is a sort of two numbers, a permutation of its inputs locally: 1-Lipschitz in l_2 and
    gradient-norm preserving.
    """
    half = x.shape[-1] // 2
    if 2 * half != x.shape[-1]:
        raise ValueError(f"MaxMin needs an even number of channels, got {x.shape[-1]}")
    a, b = x[..., :half], x[..., half:]
    return jnp.concatenate([jnp.maximum(a, b), jnp.minimum(a, b)], axis=-1)


def sow_l2_rounding_error(module: nn.Module, bound, certify: bool):
    """Record a per-example allowance for the l_2 norm of one layer's float32 rounding error.

    For l_2 networks whose later layers have spectral norm <= ~1 the allowances add up to a bound of the l_2
    error of the logit vector, hence of every logit. Only in the certifying forward (see the l_inf variant).
    """
    if certify and not module.is_initializing():
        module.sow("rounding", "l2_error", bound, init_fn=lambda: 0.0, reduce_fn=lambda a, b: a + b)


class NormalizedLinear(nn.Module):
    """Last linear layer with rows divided by their l_2 norm ("lln", LOT lip_convnets.py NormalizedLinear):
    the margin z_y - z_j is ||w_y/|w_y| - w_j/|w_j| ||-Lipschitz in l_2.

    certify: the certifying forward: the matmul at HIGHEST precision (no TF32 on GPUs: its error would exceed
    the allowance sown here) and the allowance sown."""

    features: int

    @nn.compact
    def __call__(self, x, *, certify: bool = False):
        x = x.reshape(x.shape[0], -1)
        fan_in = x.shape[-1]
        bound = 1.0 / jnp.sqrt(fan_in)
        kernel = self.param(
            "kernel",
            lambda k, s: jax.random.uniform(k, s, jnp.float32, -bound, bound),
            (self.features, fan_in),
        )
        bias = self.param(
            "bias", lambda k, s: jax.random.uniform(k, s, jnp.float32, -bound, bound), (self.features,)
        )
        rows = normalized_rows(kernel)
        y = jnp.matmul(x, rows.T, precision=jax.lax.Precision.HIGHEST if certify else None) + bias
        sow_l2_rounding_error(
            self,
            FLOAT32_SPACING_AT_ONE
            * (jnp.sqrt(float(fan_in)) * 8.0 * l2_norm_per_example(x) + l2_norm_per_example(y)),
            certify,
        )
        return y


def normalized_rows(kernel):
    return kernel / jnp.linalg.norm(kernel, axis=1, keepdims=True)


_COLLECTION_FUNCTIONS: dict = {}  # (model, input shape, collection) -> jitted computation, compiled once


def computed_collection(model: nn.Module, variables, input_shape, collection: str):
    """The `collection` a model's layers fill in one forward pass on zeros of `input_shape` (e.g. weights that
    depend on the parameters only, computed once per checkpoint for evaluation); jitted once per model."""
    variables = {k: v for k, v in variables.items() if k != collection}
    key = (repr(model), tuple(input_shape), collection)
    if key not in _COLLECTION_FUNCTIONS:

        @jax.jit
        def compute(variables):
            dummy = jnp.zeros(input_shape, jnp.float32)
            _, state = model.apply(variables, dummy, train=False, mutable=[collection])
            return state[collection]

        _COLLECTION_FUNCTIONS[key] = compute
    return _COLLECTION_FUNCTIONS[key](variables)
