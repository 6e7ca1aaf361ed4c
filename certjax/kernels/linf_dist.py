"""The l_inf-dist (and l_p-dist) operation: out[b, o] = ||x[b] - w[o]||_p, p in [1, inf].

This is the hot path of the l_inf-dist Net (Zhang et al., ICML'21, eq. 1) and SortNet's first layer. It is a
"matmul" with (sub, abs, max) in place of (mul, add). `lp_distance` is the one function models call; it is a
`jax.custom_vjp` so that

* the forward never materialises the [B, O, I] difference tensor (XLA fuses broadcast-sub-abs into the
  reduction; measured on a 2-core CPU: 0.1 s for B=512, O=1024, I=3072 at p = inf), and
* the backward of the l_inf case sends the gradient to the arg-max coordinate only (the lowest index on
  ties, as a Pallas kernel keeping the arg-max would), via a scatter of B*O values instead of an
  [B, O, I] mask.

`p` is a traced scalar: the l_p phase of the p schedule changes it every step, and `lax.cond` on `isinf(p)`
selects the branch at run time, so changing p never recompiles.

Numerics of the l_p branch (p up to ~1000): ||d||_p = m * (sum_i (|d_i|/m)^p)^(1/p) with m = max_i |d_i|,
so every term is <= 1 and nothing overflows. Powers are written as exp2(p * log2(.)): XLA's CPU `pow` is
~10x slower than exp2/log2, which vectorise.

The Pallas kernels of a later issue plug in behind `lp_distance`; the functions here stay the reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def lp_distance_reference(x: jax.Array, w: jax.Array, p) -> jax.Array:
    """Plain autodiff-able definition, used as the reference in tests (materialises [B, O, I])."""
    d = jnp.abs(x[:, None, :] - w[None, :, :])
    p = jnp.asarray(p, x.dtype)
    m = jnp.max(d, axis=-1)
    safe_m = jnp.where(m > 0, m, 1.0)
    finite_p = jnp.where(jnp.isinf(p), 2.0, p)  # keeps the unused branch's gradient finite
    lp = safe_m * jnp.sum((d / safe_m[..., None]) ** finite_p, axis=-1) ** (1.0 / finite_p)
    return jnp.where(jnp.isinf(p), m, jnp.where(m > 0, lp, 0.0))


def _abs_diff(x, w, mask):
    """|x[b, i] - w[o, i]| as a fusable [B, O, I] expression, times mask[b, i] when given (dropout)."""
    d = jnp.abs(x[:, None, :] - w[None, :, :])
    return d if mask is None else d * mask[:, None, :]


def _linf_forward(x, w, mask=None):
    return jnp.max(_abs_diff(x, w, mask), axis=-1)


def _first_argmax(x, w, y, mask=None):
    """Lowest i with |x[b,i] - w[o,i]| (* mask) == y[b,o], as int32 [B, O].

    Written with arithmetic only (sign instead of compare/select): XLA's CPU backend vectorises this form
    (0.5 s at B=512, O=1024, I=3072) but not jnp.argmax over a fused operand (3.5 s).
    sign(|d| - y) is 0 at the maximum and -1 elsewhere, so the min picks the first maximal index.
    """
    size = x.shape[-1]
    iota = jax.lax.broadcasted_iota(jnp.float32, (1, 1, size), 2)
    gap = jnp.sign(_abs_diff(x, w, mask) - y[..., None])
    return jnp.min(iota - size * gap, axis=-1).astype(jnp.int32)


def _lp_forward(x, w, p, m, mask=None):
    safe_m = jnp.where(m > 0, m, 1.0)
    ratio = _abs_diff(x, w, mask) / safe_m[..., None]
    total = jnp.sum(jnp.exp2(p * jnp.log2(ratio)), axis=-1)
    return jnp.where(m > 0, safe_m * jnp.exp2(jnp.log2(total) / p), 0.0)


# Elements of one [B, O_chunk, I] block in the l_p backward. XLA materialises the broadcast difference there
# (it is used twice per element); unchunked, width 5120 at batch 512 asked for 53.7 GB (measured).
_BACKWARD_BLOCK_ELEMENTS = 1 << 27


def _lp_backward(x, w, p, y, g, mask=None):
    """The l_p backward over blocks of output units, so that no [B, O, I] buffer is ever allocated."""
    batch, size = x.shape
    out = w.shape[0]
    block = int(max(1, min(out, _BACKWARD_BLOCK_ELEMENTS // max(batch * size, 1))))
    pad = (-out) % block
    # padded units get g = 0, so they contribute nothing to grad_x
    w_blocks = jnp.pad(w, ((0, pad), (0, 0))).reshape(-1, block, size)
    y_blocks = jnp.pad(y, ((0, 0), (0, pad)), constant_values=1.0).T.reshape(-1, block, batch)
    g_blocks = jnp.pad(g, ((0, 0), (0, pad))).T.reshape(-1, block, batch)

    def one_block(args):
        w_b, y_b, g_b = args
        return _lp_backward_block(x, w_b, p, y_b.T, g_b.T, mask)

    grad_x_parts, grad_w = jax.lax.map(one_block, (w_blocks, y_blocks, g_blocks))
    return grad_x_parts.sum(0), grad_w.reshape(-1, size)[:out]


def _lp_backward_block(x, w, p, y, g, mask=None):
    # d||d||_p / d d_i = sign(d_i) (|d_i| / y)^(p-1) = (d_i / y) (|d_i| / y)^(p-2).
    # Each gradient is a reduction over the minor axis of its own layout ([B, I, O] for x, [O, I, B] for w):
    # XLA vectorises minor-axis reductions, one fused pass each, no [B, O, I] buffer.
    # A dropped coordinate (mask 0) has |d| = 0 in the forward, so its gradient is 0 as well.
    safe_y = jnp.where(y > 0, y, 1.0)
    scale = jnp.where(y > 0, g / safe_y, 0.0)  # [B, O]
    inv_y = 1.0 / safe_y
    d_bio = x[:, :, None] - w.T[None, :, :]
    if mask is not None:
        d_bio = d_bio * mask[:, :, None]
    grad_x = jnp.sum(
        scale[:, None, :] * d_bio * jnp.exp2((p - 2) * jnp.log2(jnp.abs(d_bio) * inv_y[:, None, :])),
        axis=-1,
    )
    d_oib = x.T[None, :, :] - w[:, :, None]
    if mask is not None:
        d_oib = d_oib * mask.T[None, :, :]
    grad_w = -jnp.sum(
        scale.T[:, None, :] * d_oib * jnp.exp2((p - 2) * jnp.log2(jnp.abs(d_oib) * inv_y.T[:, None, :])),
        axis=-1,
    )
    return grad_x, grad_w


def _linf_backward(x, w, y, g, mask=None):
    idx = _first_argmax(x, w, y, mask)  # [B, O]
    batch, out = idx.shape
    rows = jnp.arange(batch)[:, None]
    cols = jnp.arange(out)[None, :]
    x_at = jnp.take_along_axis(x, idx, axis=1)
    w_at = w[cols, idx]
    contribution = g * jnp.sign(x_at - w_at)
    if mask is not None:  # an all-dropped row has y = 0 and no gradient
        contribution = contribution * jnp.take_along_axis(mask, idx, axis=1)
    grad_x = jnp.zeros_like(x).at[rows, idx].add(contribution)
    grad_w = jnp.zeros_like(w).at[cols, idx].add(-contribution)
    return grad_x, grad_w


def _check_shapes(x, w):
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"lp_distance expects x [B, I] and w [O, I], got {x.shape} and {w.shape}")


def _forward(x, w, p, mask):
    """Blockwise over output units: when p is a compile-time constant the cond folds away and XLA shares
    |x - w| between the max and the l_p sum by materialising it (55 GB at width 5120, batch 512, measured);
    blocks bound any such buffer to _BACKWARD_BLOCK_ELEMENTS."""
    p = jnp.asarray(p, jnp.float32)
    batch, size = x.shape
    out = w.shape[0]
    block = int(max(1, min(out, _BACKWARD_BLOCK_ELEMENTS // max(batch * size, 1))))
    pad = (-out) % block
    w_blocks = jnp.pad(w, ((0, pad), (0, 0))).reshape(-1, block, size)

    def one_block(w_b):
        m = _linf_forward(x, w_b, mask)
        return jax.lax.cond(jnp.isinf(p), lambda: m, functools.partial(_lp_forward, x, w_b, p, m, mask))

    y = jax.lax.map(one_block, w_blocks)  # [blocks, B, block]
    return y.transpose(1, 0, 2).reshape(batch, -1)[:, :out], p


def _backward(x, w, p, y, g, mask):
    return jax.lax.cond(
        jnp.isinf(p),
        lambda: _linf_backward(x, w, y, g, mask),
        lambda: _lp_backward(x, w, p, y, g, mask),
    )


@jax.custom_vjp
def lp_distance(x: jax.Array, w: jax.Array, p: jax.Array) -> jax.Array:
    """||x[b] - w[o]||_p for x [B, I], w [O, I], p a scalar (jnp.inf for l_inf). Returns [B, O]."""
    return _lp_distance_fwd(x, w, p)[0]


def _lp_distance_fwd(x, w, p):
    _check_shapes(x, w)
    y, p = _forward(x, w, p, None)
    return y, (x, w, p, y)


def _lp_distance_bwd(residuals, g):
    x, w, p, y = residuals
    grad_x, grad_w = _backward(x, w, p, y, g, None)
    return grad_x, grad_w, jnp.zeros_like(p)


lp_distance.defvjp(_lp_distance_fwd, _lp_distance_bwd)


@jax.custom_vjp
def masked_lp_distance(x: jax.Array, w: jax.Array, mask: jax.Array, p: jax.Array) -> jax.Array:
    """||(x[b] - w[o]) * mask[b]||_p: the distance over the coordinates kept in mask [B, I] (0/1 floats).

    SortNet's dropout training (zbh2047/SortNet core/models/norm_dist.py) evaluates each neuron on a random
    subset of its inputs; a dropped coordinate contributes |d| * 0 = 0, which changes neither the max nor
    the sum of p-th powers.
    """
    return _masked_fwd(x, w, mask, p)[0]


def _masked_fwd(x, w, mask, p):
    _check_shapes(x, w)
    if mask.shape != x.shape:
        raise ValueError(f"mask must have the shape of x {x.shape}, got {mask.shape}")
    y, p = _forward(x, w, p, mask)
    return y, (x, w, mask, p, y)


def _masked_bwd(residuals, g):
    x, w, mask, p, y = residuals
    grad_x, grad_w = _backward(x, w, p, y, g, mask)
    return grad_x, grad_w, jnp.zeros_like(mask), jnp.zeros_like(p)


masked_lp_distance.defvjp(_masked_fwd, _masked_bwd)
