"""Guaranteed largest singular values, fast: a Cholesky certificate of the Gram matrix, with every rounding
error carried as a proven allowance (issue 23; certify.bound_method = "fast").

The l_2 families bound each layer by sigma_max over a set of matrices: the frequency blocks M(f) of a
convolution on the smallest torus without wrap-around (certjax/certify/norms.py), or one dense matrix. The
exact method ("exact", norms.py) takes a float64 SVD of every block. This one proves an upper bound instead,
at the cost of one Cholesky factorisation per block, from three facts:

1. **The Gram matrix, with its error.** M(f) = sum_t T_t w_t(f) for the kernel taps T_t [a, b] (a <= b) at
   torus positions p_t, w_t(f) = exp(-2 pi i f.p_t / N). Its Gram matrix is
   H(f) = M M^H = sum_d C_d exp(-2 pi i f.d / N), C_d = sum_{p_s - p_t = d} T_s T_t^T (real, a x a),
   computed once per layer for all frequencies instead of per frequency.
   Every entry of the computed H~ is a sum of products evaluated in floating point; with u the float64 unit
   roundoff (certjax.certify.rounding.FLOAT64_UNIT_ROUNDOFF) and Higham's gamma (Lemma 3.1):
     |H~ - H| <= kappa_H (A A^T) entrywise, A = sum_t |T_t|, so ||H~ - H||_2 <= kappa_H ||A||_F^2, with
     kappa_H = 2 gamma(m (b + 1)) + TWIDDLE_ERROR + 2 gamma(2 D + 2)
   (m: the most tap pairs sharing one offset d, summed after their b-term dot products; D offsets summed per
   frequency in complex arithmetic, each real or imaginary part a real dot product of 2 D terms; |w~ - w| <=
   TWIDDLE_ERROR for the computed twiddles, whose angles are reduced to [-pi, pi]). A given stack of complex
   blocks G (LOT) uses H = G^H G by complex GEMM: kappa_H = sqrt(2) gamma(2 m + 2), ||.|| <= kappa_H
   ||G||_F^2.
2. **The Cholesky certificate.** For mu > 0 let A~ = fl(mu I - H~) (the off-diagonal is exact, each diagonal
   entry errs by <= u |a~_ii|, taken as 2 u |a~_ii|). If a Cholesky factorisation of A~ (LAPACK potrf, real or
   complex Hermitian, lower triangle) runs to completion, its factor satisfies R^H R = A~ + E with
   |E| <= kappa_C |R^H| |R|, kappa_C = 2 gamma(2 n + 4) for order n (Higham, Thm. 10.3, for real matrices
   with gamma(n + 1); a complex inner product of k terms is, in real and imaginary part, a real one of 2k
   terms, each pair bounded by |z1||z2| (Cauchy-Schwarz), hence gamma(2 n + 4) and the factor sqrt(2) <= 2).
   By Cauchy-Schwarz on R's columns r_i, ||E||_2 <= kappa_C sum_i ||r_i||^2 and ||r_i||^2 <= a~_ii /
   (1 - kappa_C), so A~ >= -rho I with rho = kappa_C / (1 - kappa_C) trace(A~). Hence
     lambda_max(H~) <= mu + rho + 2 u max_i a~_ii.
   The factorisation needs no exact arithmetic of its own: only that it runs to completion (no Strassen-like
   products; OpenBLAS / LAPACK use conventional GEMMs).
3. **The singular value.** sigma_max(M)^2 = lambda_max(H) <= lambda_max(H~) + ||H~ - H||_2; the final square
   root and the few scalar operations round up by SCALAR_SLACK.

mu is chosen per block (certjax/certify/certificate.py, which holds point 2): the blocks are certified in the
order of their Lanczos estimates (LANCZOS_STEPS steps on each formed block); each at the layer's bound so far
when its estimate is below it (the layer's bound does not grow), else at REFINED_STEPS more steps' value times
1 + 10 DELTA or 1 + 100 DELTA, and only if both fail at its eigvalsh value plus DELTA. The bound exceeds the
exact sigma_max by about DELTA / 2 to 50 DELTA (relative 5e-8 to 5e-6; RELATIVE_EXCESS, 1e-4, is what the
tests hold it to). A block whose certificates all fail (never seen) falls back to the exact SVD
(norms.SVD_SAFETY), counted in the report. Kernels with a tap outside SCALED_RANGE are scaled by a power of
two (exact) to keep them clear of underflow and overflow, which is excluded as in every bound of certjax
(certjax/certify/rounding.py).

The cost per block is one Cholesky factorisation of its lower triangle (about a tenth of an SVD's at width
512), formed by one GEMM for all the layer's frequencies from its C_d (C_{-d} = C_d^T: half of the tap
products; C_0 by SYRK), into buffers kept between layers (on these machines a fresh buffer's page faults
cost more than the GEMM); the exact method's FFT of a grid-sized tap array is not needed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import scipy.linalg.blas as blas

from certjax.certify.certificate import (
    SCALAR_SLACK,
    LayerBound,
    lanczos_top,
    start_vectors,
)
from certjax.certify.norms import conv_norm_bound, conv_taps, largest_singular_value
from certjax.certify.rounding import FLOAT64_UNIT_ROUNDOFF, gamma

RELATIVE_EXCESS = 1e-4  # the stated tolerance of the fast bound over the exact sigma_max (tests check it)
TWIDDLE_ERROR = 32 * FLOAT64_UNIT_ROUNDOFF  # |exp(i theta~) - exp(i theta)| for |theta| <= pi, 2 pi k / N
LANCZOS_STEPS = 8  # Lanczos steps per block: estimates that order the blocks (no proof rests on them)
LAYER_BYTES = 1 << 30  # Gram matrices formed at once (a layer that fits is formed once)
SCALED_RANGE = (2.0**-64, 2.0**64)  # kernels whose largest tap is outside are scaled by a power of two
PER_BLOCK_BYTES = 1 << 20  # blocks at least this large are estimated one at a time (cache)


_SCRATCH: dict[str, np.ndarray] = {}  # buffers kept between layers: fresh memory is dearer than the GEMMs


def _scratch(name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised array of `shape` in the kept buffer `name` (grown when too small). Fresh memory costs
    a page fault per 4 KiB on first touch: at width 512 that is more than forming the 145 blocks itself."""
    size = math.prod(shape)
    kept = _SCRATCH.get(name)
    if kept is None or kept.size < size or kept.dtype != dtype:
        kept = _SCRATCH[name] = np.empty(size, dtype)
    return kept[:size].reshape(shape)


def _power_of_two(value: float) -> float:
    return 2.0 ** math.floor(math.log2(value)) if value > 0 else 1.0


# -------------------------------------------------------------------------------------- blocks from taps


def _frequencies(grid: int) -> np.ndarray:
    """One frequency of every pair {f, -f} of the grid x grid torus (H(-f) = conj(H(f)): same spectrum)."""
    f1, f2 = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    flat = np.stack([f1.ravel(), f2.ravel()], axis=1)
    index = f1.ravel() * grid + f2.ravel()
    mirror = ((-f1.ravel()) % grid) * grid + (-f2.ravel()) % grid
    return flat[index <= mirror]


def _twiddles(frequencies, positions, grid: int) -> np.ndarray:
    """exp(-2 pi i f.p / grid) [F, P] with the angle reduced to [-pi, pi] (TWIDDLE_ERROR)."""
    phase = (np.asarray(frequencies) @ np.asarray(positions).T) % grid
    phase = np.where(phase > grid // 2, phase - grid, phase)
    return np.exp(-2j * np.pi * phase / grid)


def _offset_grams(taps, positions, grid, transpose: bool):
    """{d: C_d} with C_d = sum_{p_s - p_t = d} T_s T_t^T (T_s^T T_t when `transpose`: the Gram matrix of the
    smaller side, whose spectrum is that of the other one's conjugate), and the most pairs of one offset;
    C_{-d} = C_d^T (exact)."""
    offsets: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for s, ps in enumerate(positions):
        for t, pt in enumerate(positions):
            offsets.setdefault(((ps[0] - pt[0]) % grid, (ps[1] - pt[1]) % grid), []).append((s, t))
    grams = {}
    for d in sorted(offsets):
        mirror = ((-d[0]) % grid, (-d[1]) % grid)
        if mirror in grams:
            grams[d] = grams[mirror].T
            continue
        # sum over the pairs inside one GEMM: [T_s1 | T_s2 | ...] [T_t1 | T_t2 | ...]^T (rows side), a dot
        # product of (pairs x b) terms per entry
        axis = 0 if transpose else 1
        left = (
            taps[offsets[d][0][0]]
            if len(offsets[d]) == 1
            else np.concatenate([taps[s] for s, _ in offsets[d]], axis=axis)
        )
        same = all(s == t for s, t in offsets[d])  # d = 0: the same operand, which numpy multiplies by SYRK
        right = left if same else np.concatenate([taps[t] for _, t in offsets[d]], axis=axis)
        grams[d] = left.T @ right if transpose else left @ right.T
    return grams, max(len(pairs) for pairs in offsets.values())


def taps_sigma_bound(taps: np.ndarray, positions: list[tuple[int, int]], grid: int) -> dict:
    """Upper bound of max_f sigma_max(sum_t taps[t] exp(-2 pi i f.p_t / grid)) over the grid x grid torus.

    Args:
      taps: [T, a, b] float64 matrices (any a, b; the smaller side is the Gram's).
      positions: (p1, p2) torus position of every tap (any integers; taken mod grid).
      grid: the torus side (1: one matrix, taps summed).
    Returns:
      {"sigma": the bound, "fallbacks": blocks that fell back to the exact SVD, "eigvalsh": eigvalsh calls,
       "blocks": blocks certified}.
    """
    taps = np.asarray(taps, np.float64)
    count, rows, cols = taps.shape
    size = max(float(np.max(taps)), -float(np.min(taps))) if taps.size else 0.0
    if size == 0.0:
        return {"sigma": 0.0, "fallbacks": 0, "eigvalsh": 0, "blocks": 0}
    scale = _power_of_two(size)
    if SCALED_RANGE[0] <= scale <= SCALED_RANGE[1]:
        scale = 1.0  # scaling by a power of two would change no bit of what follows: skip its copies
    else:
        taps = taps / scale  # exact: keeps tiny and huge kernels clear of underflow and overflow
    # ||A||_F^2, A = sum_t |T_t| (a dot product of rows * cols terms after the sum of count)
    summed = taps[0] if count == 1 else np.sum(np.abs(taps), axis=0)  # one tap: ||A||_F = ||T_0||_F
    frobenius_sq = float(np.vdot(summed, summed))
    frobenius_sq *= 1.0 + gamma(rows * cols + 2 * count + 4, np.float64)
    offset_grams, pairs = _offset_grams(taps, positions, grid, transpose=rows > cols)
    keys = list(offset_grams)
    a = min(rows, cols)
    kappa_h = (
        2 * gamma(pairs * (max(rows, cols) + 1), np.float64)
        + TWIDDLE_ERROR
        + 2 * gamma(2 * len(keys) + 2, np.float64)
    )
    frequencies = _frequencies(grid)

    def exact(i):  # the fallback: the exact SVD of block i
        block = np.einsum("t,tab->ab", _twiddles(frequencies[i : i + 1], positions, grid)[0], taps)
        return float(np.linalg.svd(block, compute_uv=False)[0])

    layer = LayerBound()
    if grid == 1:  # one real matrix: -H~ = -C_0 (the certificate factors mu I - H~)
        negated = -offset_grams[keys[0]]
        layer.add(negated, 0.0, lambda: exact(0), remake=lambda: -offset_grams[keys[0]])
    else:
        _certify_frequencies(layer, offset_grams, keys, frequencies, grid, a, exact)
    sigma = math.sqrt(layer.lam + kappa_h * frobenius_sq * SCALAR_SLACK) * SCALAR_SLACK * scale
    return {
        "sigma": sigma,
        "fallbacks": layer.fallbacks,
        "eigvalsh": layer.eigvalsh,
        "blocks": len(frequencies),
    }


def _certify_frequencies(layer, offset_grams, keys, frequencies, grid, a, exact) -> None:
    """Every frequency's block into `layer`: -H~(f) = sum_d C_d (-w_d(f)) formed by one complex GEMM per batch
    of frequencies, estimated by Lanczos in a first pass, certified in the order of the estimates in a second
    (factored in place). A layer whose blocks fit in LAYER_BYTES is formed once; a larger one in batches of
    that size, formed again in the second pass."""
    negated_twiddles = -_twiddles(frequencies, keys, grid)  # [F, D]; negating a twiddle is exact
    flat = _scratch("offsets", (len(keys), a * a), np.complex128)  # [D, a^2]: the real C_d, one row each
    for j, d in enumerate(keys):
        flat[j].reshape(a, a).real[...] = offset_grams[d]
        flat[j].imag[...] = 0.0
    chunk = max(1, LAYER_BYTES // (16 * a * a))
    buffer = _scratch("blocks", (min(chunk, len(frequencies)), a * a), np.complex128)

    def form(rows, out=None, lapack_pool=True):
        # numpy and scipy each bring their own BLAS thread pool, which keeps spinning after a call; a pass
        # that alternates between them runs at half speed. So the first pass (numpy's Lanczos) forms with
        # numpy, the second (scipy's potrf) with scipy's BLAS, into out^T (Fortran order; out is C-ordered).
        out = np.empty((len(rows), a * a), np.complex128) if out is None else out[: len(rows)]
        if lapack_pool:
            blas.zgemm(1.0, flat.T, np.asfortranarray(negated_twiddles[rows].T), c=out.T, overwrite_c=1)
        else:
            np.matmul(negated_twiddles[rows], flat, out=out)
        return out.reshape(-1, a, a)

    batches = [np.arange(s, min(s + chunk, len(frequencies))) for s in range(0, len(frequencies), chunk)]
    estimates = np.empty(len(frequencies))
    for rows in batches:
        estimates[rows] = _lanczos_estimates(form(rows, buffer, lapack_pool=False))
    order = np.argsort(-estimates)
    if len(batches) == 1:  # the buffer holds every block: certify them there
        for i in order:
            layer.add(buffer[i].reshape(a, a), float(estimates[i]), lambda i=i: exact(i),
                      remake=lambda i=i: form(np.array([i]))[0])  # fmt: skip
        return
    for start in range(0, len(order), chunk):
        rows = order[start : start + chunk]
        blocks = form(rows, buffer)
        for j, i in enumerate(rows):
            layer.add(blocks[j], float(estimates[i]), lambda i=i: exact(i),
                      remake=lambda i=i: form(np.array([i]))[0])  # fmt: skip


def _lanczos_estimates(negated: np.ndarray) -> np.ndarray:
    """LANCZOS_STEPS-step estimates of lambda_max(-negated[i]) [F]: one block at a time where a block is large
    (it stays in cache over the steps: twice as fast at width 512), else all at once."""
    count, n, _ = negated.shape
    if 16 * n * n < PER_BLOCK_BYTES:
        return lanczos_top(
            lambda v: -np.matmul(negated, v[:, :, None])[:, :, 0],
            start_vectors(count, n, negated.dtype),
            LANCZOS_STEPS,
        )
    start = start_vectors(1, n, negated.dtype)
    return np.array([lanczos_top(lambda v, g=g: -(v @ g.T), start, LANCZOS_STEPS)[0] for g in negated])


def conv_sigma_bound(kernel, stride: int, padding: int, input_side: int) -> float:
    """The fast guaranteed counterpart of norms.conv_norm_bound (same operator, same torus)."""
    return taps_sigma_bound(*conv_taps(kernel, stride, padding, input_side))["sigma"]


def dense_sigma_bound(matrix) -> float:
    """The fast guaranteed sigma_max of one real matrix."""
    matrix = np.asarray(matrix, np.float64)
    return taps_sigma_bound(matrix[None], [(0, 0)], 1)["sigma"]


# ------------------------------------------------------------------------------------ stacks of blocks


def stack_sigma_bound(blocks) -> float:
    """Upper bound of the largest sigma_max over a stack of complex (or real) blocks [..., m, n] as given
    (LOT's frequency weights as applied): H = G^H G (or G G^H, the smaller side) by complex GEMM."""
    blocks = np.asarray(blocks).astype(np.complex128)
    blocks = blocks.reshape((-1,) + blocks.shape[-2:])
    if blocks.shape[1] < blocks.shape[2]:
        blocks = np.conj(np.swapaxes(blocks, 1, 2))  # same singular values
    m, n = blocks.shape[1:]
    size = float(np.max(np.abs(blocks))) if blocks.size else 0.0
    if size == 0.0:
        return 0.0
    scale = _power_of_two(size)
    blocks = blocks / scale
    kappa_h = math.sqrt(2.0) * gamma(2 * m + 2, np.float64)
    layer, worst = LayerBound(), 0.0
    chunk = max(1, LAYER_BYTES // (16 * n * n))
    for start in range(0, len(blocks), chunk):
        part = blocks[start : start + chunk]
        negated = -(np.conj(np.swapaxes(part, 1, 2)) @ part)
        frobenius_sq = float(np.max(np.sum(np.abs(part) ** 2, axis=(1, 2))))
        worst = max(worst, frobenius_sq * (1.0 + gamma(2 * m * n + 4, np.float64)))
        estimates = _lanczos_estimates(negated)
        for i in np.argsort(-estimates):
            layer.add(
                negated[i], float(estimates[i]),
                lambda i=i, p=part: float(np.linalg.svd(p[i], compute_uv=False)[0]),
            )  # fmt: skip
    return math.sqrt(layer.lam + kappa_h * worst * SCALAR_SLACK) * SCALAR_SLACK * scale


# ------------------------------------------------------------------------------------- the two methods


def _exact_dense(matrix) -> float:
    return float(np.linalg.svd(np.asarray(matrix, np.float64), compute_uv=False)[0])


@dataclasses.dataclass(frozen=True)
class BoundMethod:
    """How a family bounds its layers (certify.bound_method): conv(kernel, stride, padding, input side) and
    dense(matrix) before the families' BOUND_SAFETY, stack(blocks) with its own safety (LOT's blocks)."""

    conv: Callable[..., float]
    dense: Callable[..., float]
    stack: Callable[..., float]
    why: str  # why its figure is a proof (README's table of proofs)


BOUND_METHODS = {
    "exact": BoundMethod(
        conv=conv_norm_bound,
        dense=_exact_dense,
        stack=largest_singular_value,
        why="float64 SVD of every block (LAPACK's backward-stable SVD; factor SVD_SAFETY / BOUND_SAFETY)",
    ),
    "fast": BoundMethod(
        conv=conv_sigma_bound,
        dense=dense_sigma_bound,
        stack=stack_sigma_bound,
        why="a Cholesky factorisation of mu I - G^H G per block, every rounding error carried (this file)",
    ),
}
TRAINING_BOUND_METHOD = "fast"  # the evaluations during training (the final one uses certify.bound_method)


def bound_method(name: str) -> BoundMethod:
    """The registered method `name` (certify.bound_method), or a ValueError naming the valid ones."""
    if name not in BOUND_METHODS:
        raise ValueError(f"certify.bound_method {name!r}; use one of {sorted(BOUND_METHODS)}")
    return BOUND_METHODS[name]
