"""Interval bounds (IBP) through the layers of the l_inf families, rounded outward in float32.

For an input box [l, u] (elementwise) and a weight row w, every term of an l_p-dist neuron ranges over

    |x_i - w_i|  in  [dist(w_i, [l_i, u_i]),  max(|l_i - w_i|, |u_i - w_i|)]
                      = [max(l_i - w_i, w_i - u_i, 0), ...]

and ||.||_p (any p, inf included) and the sort neuron (non-negative weights on order statistics) are
monotone in every |x_i - w_i|, so the neuron's output lies in [N(lo), N(hi)] (zbh2047/L_inf-dist-net
model/norm_dist.py `inf_dist_bound`; zbh2047/SortNet core/cuda/bound_inf_dist_cuda.cu; shared/RECIPES.md).
Mean shift and bias add the same number to both ends; the last layer's logits are z = -y, so
z in [-hi, -lo].

Both ends come from one pass over blocks of output units (`lax.map`), as in the l_p-dist forward
(certjax/kernels/linf_dist.py: an unblocked [B, O, I] difference asked for 55 GB at width 5120): no
[B, O, I] tensor is ever held, only [B, block, I] pieces bounded by `_BLOCK_ELEMENTS`. Gradients flow through
both ends (the v1 loss can train on them): a `jax.custom_vjp` whose backward recomputes each block under
`jax.vjp`, so the backward is blocked the same way.

Rounding. Every end is rounded outward so that it contains the exact real-number bound of the float32
inputs:
* p = inf: each term is one float32 subtraction (and an exact abs / max); round-to-nearest keeps the sign and
  is within half an ulp, and the max over i is exact, so one `nextafter` outward after the reduction covers it
  (lo: max_i fl(s_i) rounded down is <= max_i s_i; hi likewise upward).
* the sort neuron: order statistics are exact, the K-term weighted sum of non-negative values rounds at most
  2K + 2 times: a relative allowance of (2K + 4) u on each end (u = 2^-24), then `nextafter`.
* finite p (training only; certification is always at p = inf): ||d||_p = m (sum_i (d_i/m)^p)^(1/p) with
  exp2 / log2. With those accurate to 4 ulp each term's absolute error is below 4u (x 2^-x <= 1/e for
  x = p log2(m/d_i)), the sum is >= 1 (the term of the max is exactly 1), so its relative error is below
  (5 n + 8) u and the p-th root divides that by p: allowance ((5 n + 8) / p + 16) u. Tested against float64.
`_round_down` / `_round_up` also step by the smallest normal float, which covers results flushed to zero.

Kernels. `lp_distance_bounds(..., kernel=)` takes the distance op's choice (linf_dist.KERNELS): "auto" runs
the Pallas bounds kernel (certjax.kernels.lp_bounds_pallas: both ends per output tile in one pass) on a GPU
for each configuration where it passed its check against this jnp path (certjax.kernels.autoselect),
and this jnp path elsewhere; "pallas" / "interpret" run the kernel
unchecked. The kernel computes values only: its custom_vjp backward is this module's blocked jnp backward, so
gradients through bounds (loss.bound=ibp) are the jnp path's whatever the kernel. Its raw ends are rounded
outward here like the jnp path's, with the wider allowance of its own rounding argument (`KERNEL_ALLOWANCE`,
derived in the kernel's module docstring).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from certjax.certify.margins import mask_true_class, rounding_slack, true_class_logit
from certjax.certify.rounding import FLOAT32_UNIT_ROUNDOFF, gamma
from certjax.kernels.linf_dist import KERNELS

_TINY = float(np.finfo(np.float32).tiny)
# Elements of one [B, block, I] piece. The bound's backward keeps a few such buffers alive (differences,
# their abs, masks of the max): 2^24 float32 = 64 MB each keeps that well under a GB.
_BLOCK_ELEMENTS = 1 << 24
# Relative allowance of finite-p l_p-dist bounds, in units of u, as (per input, constant, over p, constant):
# ((a n + b) / p + c) u. jnp: this module's docstring; kernel: certjax.kernels.lp_bounds_pallas's.
JNP_ALLOWANCE = (5.0, 8.0, 16.0)
KERNEL_ALLOWANCE = (8.0, 32.0, 32.0)


class Interval(NamedTuple):
    """Elementwise bounds lower <= x <= upper of a tensor: the value interval bound propagation moves through
    the layers (each layer maps the Interval of its input to the Interval of its output)."""

    lower: jax.Array
    upper: jax.Array

    def per_example(self) -> Interval:
        """Both ends flattened to [B, -1] (the dense layers' view)."""
        return Interval(*(end.reshape(end.shape[0], -1) for end in self))

    def negated(self) -> Interval:
        """The interval of -x: [-upper, -lower] (exact)."""
        return Interval(-self.upper, -self.lower)


def _round_down(x):
    return jnp.minimum(jnp.nextafter(x, jnp.float32(-jnp.inf)), x - _TINY)


def _round_up(x):
    return jnp.maximum(jnp.nextafter(x, jnp.float32(jnp.inf)), x + _TINY)


def lp_rounding_allowance(size: int, p, *, kernel: bool = False):
    """Relative widening of the l_p-dist bounds over `size` inputs (0 at p = inf: one ulp and the smallest
    normal float are added by the rounding itself); p traced."""
    per_input, constant, fixed = KERNEL_ALLOWANCE if kernel else JNP_ALLOWANCE
    safe_p = jnp.where(jnp.isinf(p), 1.0, p)
    finite = ((per_input * size + constant) / safe_p + fixed) * FLOAT32_UNIT_ROUNDOFF
    return jnp.where(jnp.isinf(p), 0.0, finite)


def _outward(lower, upper, relative):
    """[lower, upper] widened by a relative allowance (traced scalar) and rounded outward; no gradient
    through the rounding itself (the allowance is a tiny multiple of the value)."""
    lo = lower - relative * jnp.abs(lower)
    hi = upper + relative * jnp.abs(upper)
    return _rounded(lo, _round_down), _rounded(hi, _round_up)


def _rounded(x, rounding):
    """rounding(x) with the gradient of x (nextafter has no derivative; the step is one ulp)."""
    frozen = jax.lax.stop_gradient(x)
    return x + (rounding(frozen) - frozen)


def round_outward(lower, upper):
    """One float32 operation's rounding covered: each end one ulp (and at least the smallest normal) out."""
    return _outward(lower, upper, 0.0)


def _term_bounds(lower, upper, w_block, mask):
    """[B, block, I] lower and upper bounds of |x_i - w_i| over x in [lower, upper] (times mask)."""
    below = lower[:, None, :] - w_block[None, :, :]  # l_i - w_i
    above = upper[:, None, :] - w_block[None, :, :]  # u_i - w_i
    lo = jnp.maximum(jnp.maximum(below, -above), 0.0)
    hi = jnp.maximum(jnp.abs(below), jnp.abs(above))
    if mask is not None:
        lo = lo * mask[:, None, :]
        hi = hi * mask[:, None, :]
    return lo, hi


def _lp_norm_of_terms(d, p):
    """||d||_p over the last axis for d >= 0, p a traced scalar (inf allowed); the numerics of the l_p-dist
    forward (largest term factored out, powers as exp2 / log2, ratios floored at the smallest normal so that
    the gradient stays finite at d = 0)."""
    m = jnp.max(d, axis=-1)

    def finite():
        safe_m = jnp.where(m > 0, m, 1.0)
        ratio = jnp.maximum(d / safe_m[..., None], _TINY)
        safe_p = jnp.where(jnp.isinf(p), 2.0, p)
        total = jnp.sum(jnp.exp2(safe_p * jnp.log2(ratio)), axis=-1)
        # total >= 1 where m > 0; where m = 0 it can underflow to 0, and log2(0) in the unused branch made
        # the gradient nan (a box containing a unit's weights: every lower-bound term 0)
        safe_total = jnp.where(m > 0, total, 1.0)
        return jnp.where(m > 0, safe_m * jnp.exp2(jnp.log2(safe_total) / safe_p), 0.0)

    return jax.lax.cond(jnp.isinf(p), lambda: m, finite)


def _sort_of_terms(d, weights):
    values, _ = jax.lax.top_k(d, weights.shape[0])
    return jnp.sum(values * weights, axis=-1)


def _unit_block(batch: int, size: int, out: int) -> int:
    largest = int(max(1, min(out, _BLOCK_ELEMENTS // max(batch * size, 1))))
    blocks = -(-out // largest)
    return -(-out // blocks)


def _blocked(block_fn, lower, upper, w, extra, values=None):
    """(lo, hi) [B, O] of block_fn(lower, upper, w_block, extra) over blocks of output units; differentiable
    in lower, upper and w with a backward blocked the same way. values(lower, upper, w, extra) -> (lo, hi),
    if given, computes the values instead (a kernel of the same function); the backward stays block_fn's."""
    batch, size = lower.shape
    out = w.shape[0]
    block = _unit_block(batch, size, out)
    pad = (-out) % block
    blocks = (out + pad) // block

    def split(w):
        return jnp.pad(w, ((0, pad), (0, 0))).reshape(blocks, block, size)

    def join(y):  # [blocks, B, block] -> [B, O]
        return y.transpose(1, 0, 2).reshape(batch, -1)[:, :out]

    def unjoin(g):  # [B, O] -> [blocks, B, block]
        return jnp.pad(g, ((0, 0), (0, pad))).reshape(batch, blocks, block).transpose(1, 0, 2)

    @jax.custom_vjp
    def run(lower, upper, w, extra):
        if values is not None:
            return values(lower, upper, w, extra)
        lo, hi = jax.lax.map(lambda w_b: block_fn(lower, upper, w_b, extra), split(w))
        return join(lo), join(hi)

    def forward(lower, upper, w, extra):
        return run(lower, upper, w, extra), (lower, upper, w, extra)

    def backward(residuals, cotangents):
        lower, upper, w, extra = residuals
        g_lo, g_hi = cotangents

        def one_block(args):
            w_b, g_lo_b, g_hi_b = args
            _, pullback = jax.vjp(lambda lo, hi, wb: block_fn(lo, hi, wb, extra), lower, upper, w_b)
            return pullback((g_lo_b, g_hi_b))

        g_l, g_u, g_w = jax.lax.map(one_block, (split(w), unjoin(g_lo), unjoin(g_hi)))
        zero_extra = jax.tree.map(jnp.zeros_like, extra)
        return g_l.sum(0), g_u.sum(0), g_w.reshape(-1, size)[:out], zero_extra

    run.defvjp(forward, backward)
    return run(lower, upper, w, extra)


def _check(lower, upper, w, mask=None):
    if lower.ndim != 2 or lower.shape != upper.shape or w.ndim != 2 or w.shape[1] != lower.shape[1]:
        raise ValueError(
            f"interval bounds expect lower, upper [B, I] and w [O, I]; got {lower.shape}, {upper.shape}, "
            f"{w.shape}"
        )
    if mask is not None and mask.shape != lower.shape:
        raise ValueError(f"mask must have the shape of the inputs {lower.shape}, got {mask.shape}")


def _lp_block(low, high, w_b, extra):
    p, mask = extra
    lo_terms, hi_terms = _term_bounds(low, high, w_b, mask)
    return _lp_norm_of_terms(lo_terms, p), _lp_norm_of_terms(hi_terms, p)


def jnp_raw_bounds(lower, upper, w, mask, p):
    """The jnp path's (lo, hi) before outward rounding, in the signature of a bounds kernel (the reference
    of certjax.kernels.autoselect's check and of the kernel tests)."""
    _check(lower, upper, w, mask)
    return _blocked(_lp_block, lower, upper, w, (jnp.asarray(p, jnp.float32), mask))


def lp_distance_bounds(lower, upper, w, p, mask=None, *, kernel: str = "auto"):
    """Bounds of ||x - w[o]||_p (times mask) over x in [lower, upper]: (lo, hi), each [B, O], rounded
    outward (module docstring). p: traced scalar >= 1, jnp.inf for l_inf. kernel: one of KERNELS, the
    implementation of the values (module docstring, "Kernels"); the gradient is always the jnp path's."""
    _check(lower, upper, w, mask)
    if kernel not in KERNELS:
        raise ValueError(f"unknown bounds kernel {kernel!r}; valid: {KERNELS}")
    raw_bounds = None  # None: the jnp path
    if kernel == "auto":
        from certjax.kernels import autoselect  # imported on first use: it imports Pallas (~0.4 s)

        op = autoselect.bounds_op(lp_distance_bounds_with, lp_rounding_allowance)
        raw_bounds = autoselect.select(op, lower, w, mask)  # None: off GPU, or the kernel failed its check
    elif kernel in ("pallas", "interpret"):
        from certjax.kernels import lp_bounds_pallas

        raw_bounds = functools.partial(lp_bounds_pallas.lp_bounds_pallas, interpret=kernel == "interpret")
    return lp_distance_bounds_with(raw_bounds, lower, upper, w, p, mask)


def lp_distance_bounds_with(raw_bounds, lower, upper, w, p, mask=None):
    """lp_distance_bounds with the values from raw_bounds(lower, upper, w, mask, p) -> (lo, hi) before
    rounding (a kernel; None: the jnp path), rounded outward with the kernel allowance. For
    certjax.kernels.autoselect, which checks a candidate kernel through exactly this function."""
    p = jnp.asarray(p, jnp.float32)

    def kernel_values(low, high, w, extra):
        p, mask = extra
        lo, hi = raw_bounds(low, high, w, mask, p)
        return lo.astype(jnp.float32), hi.astype(jnp.float32)

    values = None if raw_bounds is None else kernel_values
    lo, hi = _blocked(_lp_block, lower, upper, w, (p, mask), values=values)
    relative = lp_rounding_allowance(lower.shape[1], p, kernel=raw_bounds is not None)
    lo, hi = _outward(lo, hi, relative)
    return jnp.maximum(lo, 0.0), hi


def sort_distance_bounds(lower, upper, w, weights):
    """Bounds of the sort neuron sum_k weights[k] (k-th largest |x_i - w[o, i]|) over x in [lower, upper]:
    monotone in every |x_i - w_i| (weights >= 0), so it is the neuron of the term bounds. Rounded outward."""
    _check(lower, upper, w)
    weights = jnp.asarray(weights, jnp.float32)
    if weights.shape[0] > lower.shape[1]:
        raise ValueError(f"{weights.shape[0]} sort terms but only {lower.shape[1]} inputs")

    def block_fn(low, high, w_b, weights):
        lo_terms, hi_terms = _term_bounds(low, high, w_b, None)
        return _sort_of_terms(lo_terms, weights), _sort_of_terms(hi_terms, weights)

    lo, hi = _blocked(block_fn, lower, upper, w, weights)
    lo, hi = _outward(lo, hi, (2.0 * weights.shape[0] + 4.0) * FLOAT32_UNIT_ROUNDOFF)
    return jnp.maximum(lo, 0.0), hi


def shift_bounds(lower, upper, shift):
    """[lower + shift, upper + shift] (bias, or minus a mean-shift mean), rounded outward, as an Interval."""
    return Interval(*round_outward(lower + shift, upper + shift))


def input_box(images, eps, valid_lower, valid_upper, input_error=0.0):
    """The l_inf ball of radius eps (normalised units) around normalised images, widened by input_error (a
    bound of the float32 error of the normalisation, per example or scalar) and intersected with the valid
    pixel range [valid_lower, valid_upper] (per channel, the normalised images of 0 and 1, already rounded
    outward). Returns the Interval (lower, upper) of the images' shape, rounded outward."""
    error = jnp.reshape(jnp.asarray(input_error, jnp.float32), (-1,) + (1,) * (images.ndim - 1))
    radius = _round_up(eps + error)  # the sum rounds too: never below eps + input_error
    lower = _round_down(images - radius)
    upper = _round_up(images + radius)
    return Interval(jnp.maximum(lower, valid_lower), jnp.minimum(upper, valid_upper))


def valid_pixel_range(mean, std):
    """Normalised images of pixel values 0 and 1, per channel: float64, rounded outward to float32."""
    mean = np.asarray(mean, np.float64)
    std = np.asarray(std, np.float64)
    low = (0.0 - mean) / std
    high = (1.0 - mean) / std
    low32 = np.nextafter(low.astype(np.float32), np.float32(-np.inf))
    high32 = np.nextafter(high.astype(np.float32), np.float32(np.inf))
    return low32, high32


def margin_upper_bounds(logit_lower, logit_upper, labels):
    """u[b, j] >= z_j - z_y over the box: upper(z_j) - lower(z_y), with u[b, y] = 0 (the original's
    BoundFinalIdentity), rounded up."""
    gap = logit_upper - true_class_logit(logit_lower, labels)
    return mask_true_class(_rounded(gap, _round_up), labels, 0.0)


@jax.jit
def ibp_certified(logits, logit_lower, logit_upper, labels):
    """Certified by interval bounds: the clean prediction is correct and lower(z_y) - upper(z_j) exceeds the
    margin certifier's rounding slack for every j != y (strict, so ties are never certified).

    The bounds contain the exact-arithmetic network over the box; the slack
    (certjax.certify.margins.rounding_slack,
    the allowance the margin certificate makes for float32 logits) keeps the float32 network that an
    attacker evaluates inside them as well."""
    correct = jnp.argmax(logits, axis=-1) == labels
    true_lower = true_class_logit(logit_lower, labels)
    gap = true_lower - logit_upper - rounding_slack(true_lower, logit_upper)
    gap = mask_true_class(jnp.where(jnp.isnan(gap), -jnp.inf, gap), labels, jnp.inf)  # a NaN proves nothing
    return correct & (jnp.min(gap, axis=-1) > 0.0)


# ------------------------------------------------------------------------ dense layers and tanh (IBP head)
# SortNet's hybrid head (zbh2047/SortNet core/models/bound_basic_module.py BoundLinear, BoundTanh,
# BoundFinalLinear; certjax/models/sortnet_hybrid.py). Every rule below returns bounds that contain two things
# for every input in its box: the exact real-number layer, and the float32 forward of the network
# (matmuls at precision HIGHEST, jnp.tanh), so that the float32 network an attacker evaluates stays inside
# them as well. Higham's gamma_n (certjax.certify.rounding.gamma) bounds a float32 dot product of n terms,
# in any summation order, FMA or not: |fl(sum) - sum| <= gamma_n sum |terms|.

# |jnp.tanh(a) - tanh(a)| for every float32 a, as an absolute bound: XLA's float32 tanh is a rational
# approximation, not correctly rounded; measured on XLA:CPU its error is at most ~4.4 float32 ulps near 1
# (2.6e-7 at a = -5.75). 2^-16 (1.5e-5) is 58 times that, so that another backend's few-ulp tanh stays far
# inside it; tests/test_sortnet_hybrid.py measures the error against float64 on a dense sweep (run it on
# every backend that certifies) and asserts it stays below a sixteenth of this bound. An implementation bound,
# tested, not proved.
TANH_ABSOLUTE_ERROR = 2.0**-16


def dense(x, kernel):
    """x [B, I] times kernel [O, I] transposed, in float32 at HIGHEST precision (never TF32: the rounding
    bounds below are float32's). The forward of the head and its bounds use this one product."""
    return jnp.matmul(x, kernel.T, precision=jax.lax.Precision.HIGHEST)


def _magnitude(lower, upper):
    return jnp.maximum(jnp.abs(lower), jnp.abs(upper))


def linear_bounds(lower, upper, kernel, bias):
    """Interval of y = kernel x + bias over x in [lower, upper] ([B, I] -> [B, O]), split form.

    upper(y) = K+ upper + K- lower + b and lower(y) = K+ lower + K- upper + b (K+ = max(K, 0),
    K- = min(K, 0)): each a sum of 2 I + 1 terms whose absolute values add up to at most S = |K| m + |b|,
    m = max(|lower|, |upper|), so float32 errs by at most gamma_(2I+1) S; the forward fl(K x + b) of any
    float32 x in the box errs by at most gamma_(I+1) S; S computed errs by a factor <= 1 / (1 - gamma_(I+1)).
    Both ends move out by 2 gamma_(2I+2) S_computed (>= (gamma_(2I+1) + gamma_(I+1)) S, about
    1.5 gamma_(2I+2) S) and are then
    rounded outward (one more ulp for the subtraction itself).

    Args:
      lower, upper: [B, I] bounds of the input. kernel: [O, I]. bias: [O].
    Returns:
      The Interval of the output [B, O] (differentiable in every argument).
    """
    _check(lower, upper, kernel)
    positive, negative = jnp.maximum(kernel, 0.0), jnp.minimum(kernel, 0.0)
    hi = dense(upper, positive) + dense(lower, negative) + bias
    lo = dense(lower, positive) + dense(upper, negative) + bias
    size = dense(_magnitude(lower, upper), jnp.abs(kernel)) + jnp.abs(bias)
    allowance = 2.0 * gamma(2 * kernel.shape[1] + 2, np.float32) * size
    return Interval(*round_outward(lo - allowance, hi + allowance))


def tanh_bounds(lower, upper):
    """Interval of tanh(x) over x in [lower, upper]: tanh is increasing, so [tanh(lower), tanh(upper)].

    Each end moves out by 2 TANH_ABSOLUTE_ERROR: one for jnp.tanh of the end itself, one for jnp.tanh of the
    forward (its float32 tanh(a) is within TANH_ABSOLUTE_ERROR of tanh(a) >= tanh(lower)); then rounded
    outward.
    """
    widen = 2.0 * TANH_ABSOLUTE_ERROR
    return Interval(*round_outward(jnp.tanh(lower) - widen, jnp.tanh(upper) + widen))


def pair_linear_bounds(lower, upper, kernel, bias, classes):
    """Bounds of z_j - z_k for z = kernel t + bias over t in [lower, upper], k = classes[b]: rows w_j - w_k
    (the original's BoundFinalLinear; tighter than upper(z_j) - lower(z_k)).

    With c = fl((lower + upper) / 2) and r >= max(upper - c, c - lower) (rounded up, so the box lies in
    [c - r, c + r] exactly), z_j - z_k <= (w_j - w_k) c + |w_j - w_k| r + b_j - b_k. In float32: zc = fl(W c
    + b) errs by gamma_(I+1) S (S = |W| (|c| + r) + |b|, which also bounds the forward's error at any t of
    the box), R = fl(|fl(w_j - w_k)| r) by gamma_(I+2) R, and the three final additions by 3 u T, with T =
    |zc_j| + |zc_k| + S_j + S_k + R: 2 gamma_(I+1) (S_j + S_k) for zc and the forward, both classes, plus
    gamma_(I+2) R + 3 u T is below 2 gamma_(I+8) T; 3 gamma_(I+8) T (T itself is computed) is added outward,
    then rounded out.

    Args:
      lower, upper: [B, I] bounds of t. kernel: [C, I]. bias: [C]. classes: [B] int, the class k of each
        example (the certified one).
    Returns:
      Interval [B, C] of z_j - z_k, exactly 0 at j = k.
    """
    _check(lower, upper, kernel)
    center = (lower + upper) * 0.5
    radius = _rounded(jnp.maximum(upper - center, center - lower), _round_up)
    at_center = dense(center, kernel) + bias
    size = dense(jnp.abs(center) + radius, jnp.abs(kernel)) + jnp.abs(bias)
    rows = kernel[classes]  # [B, I]: w_k
    # |w_j - w_k| r, one example at a time in chunks: no [B, C, I] tensor of the whole batch is held
    chunk = max(1, _BLOCK_ELEMENTS // max(kernel.size, 1))
    spread = jax.lax.map(
        lambda args: jnp.sum(jnp.abs(kernel - args[0][None, :]) * args[1][None, :], axis=-1),
        (rows, radius),
        batch_size=min(chunk, lower.shape[0]),
    )
    gap = at_center - true_class_logit(at_center, classes)
    total = (
        jnp.abs(at_center)
        + jnp.abs(true_class_logit(at_center, classes))
        + size
        + true_class_logit(size, classes)
        + spread
    )
    allowance = 3.0 * gamma(kernel.shape[1] + 8, np.float32) * total
    lo, hi = round_outward(gap - spread - allowance, gap + spread + allowance)
    return Interval(mask_true_class(lo, classes, 0.0), mask_true_class(hi, classes, 0.0))
