"""Pallas kernel (Triton backend) for interval bounds of the l_p-dist layer: both ends in one pass.

For an input box [l, u] (per example) and weight rows w, every output unit o of the l_p-dist layer
y = ||(x - w[o]) * mask||_p (certjax.kernels.linf_dist) lies in [N(lo_terms), N(hi_terms)] with, per input
coordinate i (the math of certjax.certify.interval `_term_bounds`, zbh2047/L_inf-dist-net model/norm_dist.py
`inf_dist_bound`):

    lo_i = max(l_i - w_i, w_i - u_i, 0),    hi_i = max(|l_i - w_i|, |u_i - w_i|)    (times mask_i)

and N = ||.||_p (monotone in every term). The kernel tiles B and O as the forward kernel does
(certjax.kernels.linf_dist_pallas: a [block_b, block_o] output tile per program, rows i of l^T, u^T, w^T
loaded one coordinate at a time) and keeps the lower and the upper end of the tile in registers at once: one
pass over the inputs gives both, and no [B, O, I] tensor exists anywhere.

* p = inf: two running maxima. The ops are those of the jnp path (one float32 subtraction per term, then
  exact abs / max / negation, a 0/1 mask multiply), so the values are bitwise the jnp path's raw ends.
* finite p: the jnp path's formula exactly, m (sum_i (d_i / m)^p)^(1/p) with m the largest term. The tile
  walks the inputs twice: first the two maxima, then the two sums of (d_i / m)^p as exp2(p log2(.)). A term
  with d_i = 0 adds exactly 0 (the jnp path floors the ratio at the smallest normal float for its gradient;
  this path has no gradient), so the zero-padded coordinates change nothing.

Forward only: certjax.certify.interval wraps this kernel in a custom_vjp whose backward is the jnp path's
blocked backward, so any gradient through bounds (loss.bound=ibp) is the jnp path's, whatever kernel computed
the values.

Rounding (what certjax.certify.interval adds around the raw ends this kernel returns; `KERNEL_ALLOWANCE`
there):
* p = inf: the jnp argument unchanged (one rounding per term, exact max): one `nextafter` outward, plus the
  smallest normal float for anything flushed to zero.
* finite p, p >= 1, n inputs, u = 2^-24, on Triton's ops (libdevice __nv_logf 1 ulp, __nv_exp2f 2 ulp, fp32
  division div.full 2 ulp, everything else IEEE round-to-nearest; 1 ulp <= 2u relative). Let r_i = d_i / m, S
  = sum_i r_i^p >= 1 (the largest term is 1). The ratio has relative error <= 4u, which p log2 turns into <=
  5.8 p u in the exponent; log2 = log / ln2 has relative error <= 8u and the product with p u, so the exponent
  of a term with x = -p log2(r_i) >= 0 is off by <= 5.8 p u + 9 u x, and exp2 adds 4u: each term is off by <=
  r_i^p (4.1 p u + 4u) + 6.3 u x 2^-x <= r_i^p (4.1 p u + 4u) + 3.4u (x 2^-x <= 1 / (e ln 2)). The sum in any
  order adds (n - 1) u relative; with S >= 1 the computed sum is S (1 + s) with s <= 4.1 p u + 4.4 n u + 4u.
  The root: log2 (8u relative, on a value <= log2 n + 0.1), division by p (4u), exp2 (4u), times m (u): y is
  off by <= (1.01 s + 8.5 u log2 n) / p + 5u relative, and the term rounding of d_i adds u. With 8.5 log2 n <=
  1.5 n + 16: <= ((6 n + 22) / p + 11) u. certjax.certify.interval widens by ((8 n + 32) / p + 32) u
  (first-order terms above, the rest well inside the difference).
The jnp path's own allowance (certjax.certify.interval module docstring) assumes XLA's ops; the kernel's is
wider. `certjax.kernels.autoselect` checks every configuration against the jnp path before "auto" uses it,
including that the kernel's rounded interval contains the jnp path's up to their allowances.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from certjax.kernels.linf_dist_jnp import check_shapes
from certjax.kernels.pallas_common import DEFAULT_BLOCKS, BlockSizes, compiler_params, pad_to, tile_grid

__all__ = ["BlockSizes", "lp_bounds_pallas"]


def _bounds_kernel(*refs, unroll: int, lp: bool, has_mask: bool):
    """One [block_b, block_o] tile of both ends; loops over all (padded) input coordinates.

    refs: [p_ref] (lp), lt_ref, ut_ref [I, block_b], wt_ref [I, block_o], [mask_t_ref [I, block_b]],
    lo_ref, hi_ref [block_b, block_o].
    """
    refs = list(refs)
    p = refs.pop(0)[0] if lp else None
    lt_ref, ut_ref, wt_ref = refs.pop(0), refs.pop(0), refs.pop(0)
    mask_ref = refs.pop(0) if has_mask else None
    lo_ref, hi_ref = refs
    size = lt_ref.shape[0]
    tile = (lt_ref.shape[1], wt_ref.shape[1])

    def term_bounds(i):
        w_row = wt_ref[i, :][None, :]
        below = lt_ref[i, :][:, None] - w_row  # l_i - w_i
        above = ut_ref[i, :][:, None] - w_row  # u_i - w_i
        lo = jnp.maximum(jnp.maximum(below, -above), 0.0)
        hi = jnp.maximum(jnp.abs(below), jnp.abs(above))
        if has_mask:
            keep = mask_ref[i, :][:, None]
            lo, hi = lo * keep, hi * keep
        return lo, hi

    def max_step(step, carry):
        m_lo, m_hi = carry
        for k in range(unroll):
            lo, hi = term_bounds(step * unroll + k)
            m_lo, m_hi = jnp.maximum(m_lo, lo), jnp.maximum(m_hi, hi)
        return m_lo, m_hi

    steps = size // unroll
    zeros = jnp.zeros(tile, jnp.float32)
    m_lo, m_hi = jax.lax.fori_loop(0, steps, max_step, (zeros, zeros))  # every term is >= 0
    if not lp:
        lo_ref[...], hi_ref[...] = m_lo, m_hi
        return
    safe_lo = jnp.where(m_lo > 0, m_lo, 1.0)
    safe_hi = jnp.where(m_hi > 0, m_hi, 1.0)

    def power(d, safe_m):  # (d / m)^p, exactly 0 for d = 0
        return jnp.where(d > 0, jnp.exp2(p * jnp.log2(d / safe_m)), 0.0)

    def sum_step(step, carry):
        s_lo, s_hi = carry
        for k in range(unroll):  # recomputing the terms is cheaper than keeping them
            lo, hi = term_bounds(step * unroll + k)
            s_lo, s_hi = s_lo + power(lo, safe_lo), s_hi + power(hi, safe_hi)
        return s_lo, s_hi

    s_lo, s_hi = jax.lax.fori_loop(0, steps, sum_step, (zeros, zeros))

    def norm(m, safe_m, s):  # s >= 1 wherever m > 0 (the largest term is 1)
        return jnp.where(m > 0, safe_m * jnp.exp2(jnp.log2(jnp.where(m > 0, s, 1.0)) / p), 0.0)

    lo_ref[...] = norm(m_lo, safe_lo, s_lo)
    hi_ref[...] = norm(m_hi, safe_hi, s_hi)


def _bounds_call(lower, upper, w, p, mask, *, lp: bool, blocks: BlockSizes, interpret: bool):
    (batch, size), out = lower.shape, w.shape[0]
    bb, bo, padded_b, padded_o, padded_i = tile_grid(batch, out, size, blocks, blocks.unroll)
    row_spec = pl.BlockSpec((padded_i, bb), lambda b, o: (0, b))
    operands = [pad_to(lower, (padded_b, padded_i)).T, pad_to(upper, (padded_b, padded_i)).T]
    operands.append(pad_to(w, (padded_o, padded_i)).T)
    in_specs = [row_spec, row_spec, pl.BlockSpec((padded_i, bo), lambda b, o: (0, o))]
    if mask is not None:
        operands.append(pad_to(mask.astype(jnp.float32), (padded_b, padded_i)).T)
        in_specs.append(row_spec)
    if lp:
        operands.insert(0, jnp.reshape(jnp.asarray(p, jnp.float32), (1,)))
        in_specs.insert(0, pl.BlockSpec((1,), lambda b, o: (0,)))
    out_shape = [jax.ShapeDtypeStruct((padded_b, padded_o), jnp.float32)] * 2
    out_spec = pl.BlockSpec((bb, bo), lambda b, o: (b, o))
    lo, hi = pl.pallas_call(
        functools.partial(_bounds_kernel, unroll=blocks.unroll, lp=lp, has_mask=mask is not None),
        out_shape=out_shape,
        grid=(padded_b // bb, padded_o // bo),
        in_specs=in_specs,
        out_specs=[out_spec, out_spec],
        compiler_params=compiler_params(blocks),
        interpret=interpret,
        name="lp_distance_bounds" if lp else "linf_distance_bounds",
    )(*operands)
    return lo[:batch, :out], hi[:batch, :out]


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def lp_bounds_pallas(lower, upper, w, mask, p, *, blocks=DEFAULT_BLOCKS, interpret: bool = False):
    """Raw (lo, hi) [B, O] of ||(x - w[o]) * mask||_p over x in [lower, upper], before
    certjax.certify.interval rounds
    them outward (module docstring). p: traced scalar >= 1, jnp.inf for l_inf (`lax.cond` picks the kernel at
    run time). No gradient of its own: use it through certjax.certify.interval.lp_distance_bounds."""
    check_shapes(lower, w, mask)
    if upper.shape != lower.shape:
        raise ValueError(f"lower and upper must have one shape, got {lower.shape} and {upper.shape}")
    p = jnp.asarray(p, jnp.float32)
    call = functools.partial(_bounds_call, lower, upper, w, p, mask, blocks=blocks, interpret=interpret)
    return jax.lax.cond(jnp.isinf(p), lambda: call(lp=False), lambda: call(lp=True))
