"""Pallas kernels (Triton backend) for the l_p-dist operation out[b, o] = ||(x[b] - w[o]) * mask[b]||_p.

The op (Zhang et al., ICML'21, eq. 1; SortNet's dropout layers add the 0/1 mask) is a matmul with
(sub, abs, max) in place of (mul, add), so no tensor core helps: its limit is the FP32 vector rate. The
kernels follow the original CUDA code (zbh2047/L_inf-dist-net-v2 core/cuda/inf_dist_cuda.cu: 16 x 16
threads with 4 x 4 register tiles, i.e. a 64 x 64 output tile, and an outer-product loop over the inputs):
each program owns a [block_b, block_o] tile of the output and walks over the input coordinates i one at a
time, loading row i of x^T and of w^T (contiguous) and updating the whole tile from their outer difference.
The CUDA code stages the rows through shared memory by hand; here Triton keeps them in L1.

* l_inf forward: a running max; when the backward needs it, also the arg-max index (a strict `>` while i
  increases keeps the lowest index on ties). The sign of x - w at the arg-max is read back in the backward
  from x and w (one gather of B*O values) rather than carried through the loop (one more select per element).
* l_p forward (p schedule phase, p up to ~1000): per chunk of `unroll` coordinates, first the chunk's max
  updates the running max m, the partial sum is rescaled by (m_old / m_new)^p, then the chunk adds
  (|d| / m_new)^p. Every term is <= 1, so nothing overflows for any p; y = m * s^(1/p).
* l_p backward: dy/dx_i = sign(d_i) (|d_i| / y)^(p - 1) (0 where y = 0). Two dense kernels, no atomics:
  grad_x tiles [B, I] and loops over O, grad_w tiles [O, I] and loops over B. Each recomputes the powers
  (twice the transcendental work of one fused pass, which would need an atomic reduction over one axis).
* l_inf backward: no kernel. The gradient goes to one coordinate per (b, o), so it is a scatter-add of B*O
  values (`linf_dist_jnp.scatter_to_argmax`, shared with the jnp path; XLA scatters with atomics on GPU, as
  the CUDA code's backward does), O(B*O); a dense atomic-free kernel would compare every (b, o, i), O(B*I*O),
  as much work as the forward.

Shapes that are not multiples of the tiles are zero-padded: a padded coordinate has |d| = 0, which changes
neither the max (nor, by the strict `>`, the arg-max) nor the sum of p-th powers; padded rows and units are
sliced off, and get zero output gradient in the backward.

Lowering: `pallas_call` with `plgpu.CompilerParams` (jax.experimental.pallas.triton) selects the Triton
backend, and all four kernels lower for CUDA from a CPU-only machine (tests/test_kernels.py). Mosaic GPU,
jax's default, does not take these kernels (tried with jax 0.10.2): it stages every block in shared memory
(the whole I extent of x^T and w^T, 328 KB > 227 KB already at I = 256 with 128-wide tiles) and, at small I,
rejects the row-vector broadcast (unsupported WGStridedFragLayout); a port would pipeline I explicitly.
`interpret=True` runs the same kernels on any backend (the CPU tests). `lp_distance_reference` (from
`linf_dist_jnp`) and `linf_argmax_reference` are the pure-jnp definitions the tests compare against.

Not here: the sort neuron's top-K (K <= 10). A running top-K per output element costs ~K compare-selects
per element where the arg-max costs two, and 2K registers per output element (values, indices) do not fit a
64 x 64 tile; without a GPU to measure it against `jax.lax.top_k`, it was not built.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from certjax.kernels.linf_dist_jnp import check_shapes, lp_distance_reference, scatter_to_argmax
from certjax.kernels.pallas_common import DEFAULT_BLOCKS, BlockSizes, compiler_params, pad_to, tile_grid

__all__ = [
    "BlockSizes",
    "linf_argmax_reference",
    "linf_forward",
    "lp_backward",
    "lp_distance_pallas",
    "lp_distance_reference",
    "lp_forward",
]

# smallest ratio |d| / y raised to a power in the backward: keeps log(0) out (0^(p-1) would be nan at p = 1)
_TINY = float(jnp.finfo(jnp.float32).tiny)


def linf_argmax_reference(x, w, mask=None):
    """(max_i |x[b,i] - w[o,i]| * mask[b,i], lowest arg-max) by materialising [B, O, I]: the definition."""
    d = jnp.abs(x[:, None, :] - w[None, :, :])
    if mask is not None:
        d = d * mask[:, None, :]
    return jnp.max(d, axis=-1), jnp.argmax(d, axis=-1).astype(jnp.int32)  # argmax: first on ties


# --------------------------------------------------------------------------------------------- forward


def _forward_kernel(*refs, unroll: int, lp: bool, with_argmax: bool, has_mask: bool):
    """One [block_b, block_o] output tile; loop over all (padded) input coordinates.

    refs: [p_ref] (lp), xt_ref [I, block_b], wt_ref [I, block_o], [mask_t_ref [I, block_b]],
    y_ref [block_b, block_o], [idx_ref [block_b, block_o]] (with_argmax).
    """
    refs = list(refs)
    p = refs.pop(0)[0] if lp else None
    xt_ref, wt_ref = refs.pop(0), refs.pop(0)
    mask_ref = refs.pop(0) if has_mask else None
    y_ref = refs.pop(0)
    idx_ref = refs.pop(0) if with_argmax else None
    size = xt_ref.shape[0]
    tile = (xt_ref.shape[1], wt_ref.shape[1])

    def abs_diff(i):
        d = jnp.abs(xt_ref[i, :][:, None] - wt_ref[i, :][None, :])
        return d * mask_ref[i, :][:, None] if has_mask else d

    def linf_step(step, carry):
        best, idx = carry
        for k in range(unroll):
            i = step * unroll + k
            d = abs_diff(i)
            if with_argmax:
                take = d > best  # strict: an equal value later never replaces the first arg-max
                best = jnp.where(take, d, best)
                idx = jnp.where(take, i, idx)
            else:
                best = jnp.maximum(best, d)
        return best, idx

    def lp_step(step, carry):
        m, s = carry
        m_new = m
        for k in range(unroll):
            m_new = jnp.maximum(m_new, abs_diff(step * unroll + k))
        inv_m = 1.0 / jnp.where(m_new > 0, m_new, 1.0)
        # (m / m_new)^p: 1 if the max did not move, 0 while everything so far was 0 (then s = 0 too)
        s = s * jnp.exp(p * jnp.log(m * inv_m))
        for k in range(unroll):  # recomputing |d| is cheaper than keeping `unroll` tiles in registers
            s = s + jnp.exp(p * jnp.log(abs_diff(step * unroll + k) * inv_m))
        return m_new, s

    steps = size // unroll
    if lp:
        zeros = jnp.zeros(tile, jnp.float32)
        m, s = jax.lax.fori_loop(0, steps, lp_step, (zeros, zeros))
        safe_s = jnp.where(m > 0, s, 1.0)
        y_ref[...] = jnp.where(m > 0, m * jnp.exp(jnp.log(safe_s) / p), 0.0)
    else:
        init = (jnp.full(tile, -1.0, jnp.float32), jnp.zeros(tile, jnp.int32))
        best, idx = jax.lax.fori_loop(0, steps, linf_step, init)
        y_ref[...] = best
        if with_argmax:
            idx_ref[...] = idx


def _forward_call(x, w, p, mask, *, lp: bool, with_argmax: bool, blocks: BlockSizes, interpret: bool):
    check_shapes(x, w, mask)
    (batch, size), out = x.shape, w.shape[0]
    bb, bo, padded_b, padded_o, padded_i = tile_grid(batch, out, size, blocks, blocks.unroll)
    operands = [pad_to(x, (padded_b, padded_i)).T, pad_to(w, (padded_o, padded_i)).T]
    in_specs = [
        pl.BlockSpec((padded_i, bb), lambda b, o: (0, b)),
        pl.BlockSpec((padded_i, bo), lambda b, o: (0, o)),
    ]
    if mask is not None:
        operands.append(pad_to(mask.astype(jnp.float32), (padded_b, padded_i)).T)
        in_specs.append(pl.BlockSpec((padded_i, bb), lambda b, o: (0, b)))
    if lp:
        operands.insert(0, jnp.reshape(jnp.asarray(p, jnp.float32), (1,)))
        in_specs.insert(0, pl.BlockSpec((1,), lambda b, o: (0,)))
    out_spec = pl.BlockSpec((bb, bo), lambda b, o: (b, o))
    out_shape = [jax.ShapeDtypeStruct((padded_b, padded_o), jnp.float32)]
    if with_argmax:
        out_shape.append(jax.ShapeDtypeStruct((padded_b, padded_o), jnp.int32))
    results = pl.pallas_call(
        functools.partial(
            _forward_kernel, unroll=blocks.unroll, lp=lp, with_argmax=with_argmax, has_mask=mask is not None
        ),
        out_shape=out_shape,
        grid=(padded_b // bb, padded_o // bo),
        in_specs=in_specs,
        out_specs=[out_spec] * len(out_shape),
        compiler_params=compiler_params(blocks),
        interpret=interpret,
        name="lp_distance_forward" if lp else "linf_distance_forward",
    )(*operands)
    return [r[:batch, :out] for r in results]


@functools.partial(jax.jit, static_argnames=("with_argmax", "blocks", "interpret"))
def linf_forward(
    x, w, mask=None, *, with_argmax: bool = True, blocks=DEFAULT_BLOCKS, interpret: bool = False
):
    """l_inf distances y [B, O] and (with_argmax) the lowest arg-max index [B, O] int32."""
    results = _forward_call(
        x, w, None, mask, lp=False, with_argmax=with_argmax, blocks=blocks, interpret=interpret
    )
    return tuple(results) if with_argmax else results[0]


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def lp_forward(x, w, p, mask=None, *, blocks=DEFAULT_BLOCKS, interpret: bool = False):
    """l_p distances y [B, O] for a finite traced p >= 1, by running-max rescaling."""
    return _forward_call(x, w, p, mask, lp=True, with_argmax=False, blocks=blocks, interpret=interpret)[0]


# -------------------------------------------------------------------------------------------- backward


def _lp_grad_kernel(p_ref, tile_ref, rows_ref, coef_ref, inv_y_ref, *refs, unroll: int, has_mask, of_x):
    """grad_x (of_x) or grad_w tile [rows, block_i], looping over the other operand's rows.

    of_x: tile_ref = x [block_b, block_i], rows_ref = w [O, block_i], coef/inv_y = (g/y)^T, (1/y)^T
          [O, block_b], mask_ref [block_b, block_i].
    else: tile_ref = w [block_o, block_i], rows_ref = x [B, block_i], coef/inv_y = g/y, 1/y [B, block_o],
          mask_ref [B, block_i] (one row per loop step).
    """
    mask_ref, out_ref = refs if has_mask else (None, refs[0])
    p = p_ref[0]
    tile = tile_ref[...]
    tile_mask = mask_ref[...] if has_mask and of_x else None

    def term(r):
        row = rows_ref[r, :][None, :]
        d = tile - row if of_x else row - tile  # x - w in both cases
        if has_mask:
            d = d * (tile_mask if of_x else mask_ref[r, :][None, :])
        ratio = jnp.maximum(jnp.abs(d) * inv_y_ref[r, :][:, None], _TINY)
        return coef_ref[r, :][:, None] * jnp.sign(d) * jnp.exp((p - 1.0) * jnp.log(ratio))

    def step(index, acc):
        for k in range(unroll):
            acc = acc + term(index * unroll + k)
        return acc

    acc = jax.lax.fori_loop(0, rows_ref.shape[0] // unroll, step, jnp.zeros(tile.shape, jnp.float32))
    out_ref[...] = acc if of_x else -acc


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def lp_backward(x, w, p, y, g, mask=None, *, blocks=DEFAULT_BLOCKS, interpret: bool = False):
    """(grad_x, grad_w) of sum(g * y) for y = ||(x - w) * mask||_p (finite p), two dense kernels."""
    check_shapes(x, w, mask)
    (batch, size), out = x.shape, w.shape[0]
    bi = min(blocks.block_i, pl.next_power_of_2(size))
    bb, bo, padded_b, padded_o, padded_i = tile_grid(batch, out, size, blocks, bi)
    unroll = min(blocks.unroll, bb, bo)
    positive = y > 0
    coef = pad_to(jnp.where(positive, g, 0.0), (padded_b, padded_o))  # padded rows / units: no gradient
    inv_y = pad_to(1.0 / jnp.where(positive, y, 1.0), (padded_b, padded_o))
    x_p, w_p = pad_to(x, (padded_b, padded_i)), pad_to(w, (padded_o, padded_i))
    p_arr = jnp.reshape(jnp.asarray(p, jnp.float32), (1,))
    mask_p = None if mask is None else pad_to(mask.astype(jnp.float32), (padded_b, padded_i))
    p_spec = pl.BlockSpec((1,), lambda r, c: (0,))

    def call(of_x: bool):
        rows, cols = (padded_b, bb) if of_x else (padded_o, bo)
        loop_rows, loop_tile = (padded_o, bb) if of_x else (padded_b, bo)
        in_specs = [
            p_spec,
            pl.BlockSpec((cols, bi), lambda r, c: (r, c)),
            pl.BlockSpec((loop_rows, bi), lambda r, c: (0, c)),
            pl.BlockSpec((loop_rows, loop_tile), lambda r, c: (0, r)),
            pl.BlockSpec((loop_rows, loop_tile), lambda r, c: (0, r)),
        ]
        operands = [p_arr, x_p if of_x else w_p, w_p if of_x else x_p]
        operands += [coef.T, inv_y.T] if of_x else [coef, inv_y]
        if mask_p is not None:
            in_specs.append(
                pl.BlockSpec((bb, bi), lambda r, c: (r, c))
                if of_x
                else pl.BlockSpec((padded_b, bi), lambda r, c: (0, c))
            )
            operands.append(mask_p)
        return pl.pallas_call(
            functools.partial(_lp_grad_kernel, unroll=unroll, has_mask=mask_p is not None, of_x=of_x),
            out_shape=jax.ShapeDtypeStruct((rows, padded_i), jnp.float32),
            grid=(rows // cols, padded_i // bi),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((cols, bi), lambda r, c: (r, c)),
            compiler_params=compiler_params(blocks),
            interpret=interpret,
            name="lp_distance_grad_x" if of_x else "lp_distance_grad_w",
        )(*operands)

    return call(True)[:batch, :size], call(False)[:out, :size]


# ---------------------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def lp_distance_pallas(x, w, mask, p, blocks: BlockSizes = DEFAULT_BLOCKS, interpret: bool = False):
    """||(x[b] - w[o]) * mask[b]||_p [B, O] (mask None: all kept); p a traced scalar, jnp.inf for l_inf.

    Without differentiation only y is computed (no arg-max). `lax.cond` on isinf(p) picks the kernel at
    run time, so a p schedule never recompiles.
    """
    p = jnp.asarray(p, jnp.float32)
    return jax.lax.cond(
        jnp.isinf(p),
        lambda: linf_forward(x, w, mask, with_argmax=False, blocks=blocks, interpret=interpret),
        lambda: lp_forward(x, w, p, mask, blocks=blocks, interpret=interpret),
    )


def _pallas_fwd(x, w, mask, p, blocks, interpret):
    p = jnp.asarray(p, jnp.float32)

    def lp_branch():
        y = lp_forward(x, w, p, mask, blocks=blocks, interpret=interpret)
        return y, jnp.zeros(y.shape, jnp.int32)

    y, idx = jax.lax.cond(
        jnp.isinf(p),
        lambda: linf_forward(x, w, mask, with_argmax=True, blocks=blocks, interpret=interpret),
        lp_branch,
    )
    return y, (x, w, mask, p, y, idx)


def _pallas_bwd(blocks, interpret, residuals, g):
    x, w, mask, p, y, idx = residuals
    grad_x, grad_w = jax.lax.cond(
        jnp.isinf(p),
        lambda: scatter_to_argmax(x, w, idx, g, mask),
        lambda: lp_backward(x, w, p, y, g, mask, blocks=blocks, interpret=interpret),
    )
    grad_mask = None if mask is None else jnp.zeros_like(mask)
    return grad_x, grad_w, grad_mask, jnp.zeros_like(p)


lp_distance_pallas.defvjp(_pallas_fwd, _pallas_bwd)
