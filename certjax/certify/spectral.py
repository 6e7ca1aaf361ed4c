"""Guaranteed largest singular values, fast: a Cholesky certificate of the Gram matrix, with every rounding
error carried as a proven allowance (issue 23; certify.bound_method = "fast").

The l_2 families bound each layer by sigma_max over a set of matrices: the frequency blocks M(f) of a
convolution on the smallest torus without wrap-around (certjax/certify/norms.py), or one dense matrix. The
exact method ("exact", norms.py) takes a float64 SVD of every block. This one proves an upper bound instead,
at the cost of one Cholesky factorisation per block, from three facts:

1. **The Gram matrix, with its error.** M(f) = sum_t T_t w_t(f) for the kernel taps T_t [a, b] (a <= b) at
   torus positions p_t, w_t(f) = exp(-2 pi i f.p_t / N). Its Gram matrix is
   H(f) = M M^H = sum_d C_d exp(-2 pi i f.d / N), C_d = sum_{p_s - p_t = d} T_s T_t^T (real, a x a),
   computed once per layer for all frequencies (one GEMM of the stacked taps) instead of per frequency.
   Every entry of the computed H~ is a sum of products evaluated in floating point; with u the float64 unit
   roundoff (certjax.certify.rounding.FLOAT64_UNIT_ROUNDOFF) and Higham's gamma (Lemma 3.1):
     |H~ - H| <= kappa_H (A A^T) entrywise, A = sum_t |T_t|, so ||H~ - H||_2 <= kappa_H ||A||_F^2, with
     kappa_H = 2 gamma(m (b + 1)) + TWIDDLE_ERROR + 2 gamma(2 D + 2)
   (m: the most tap pairs sharing one offset d, summed after their b-term dot products; D offsets summed per
   frequency in complex arithmetic, each real or imaginary part a real dot product of 2 D terms; |w~ - w| <=
   TWIDDLE_ERROR for the computed twiddles, whose angles are reduced to [-pi, pi]). A given stack of complex
   blocks G (LOT) uses H = G^H G by complex GEMM: kappa_H = sqrt(2) gamma(2 m + 2), ||.|| <= kappa_H ||G||_F^2.
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

mu is chosen per block: the layer's largest proven value so far when a block's power-iteration estimate is
below it (the layer's bound does not grow), else the block's largest eigenvalue (eigvalsh) times 1 + DELTA.
The bound exceeds the exact sigma_max by about DELTA / 2 + kappa terms (relative ~5e-8: `RELATIVE_EXCESS`).
A block whose certificate fails five times (never seen) falls back to the exact SVD (norms.SVD_SAFETY),
counted in the report. Scaling by a power of two (exact) keeps tiny and huge kernels in range; underflow is
excluded as in every bound of certjax (certjax/certify/rounding.py).

The cost per block is one Cholesky (about a fifth of an SVD's), plus one eigvalsh per layer in the common case;
the Gram matrices of all frequencies come from one GEMM and one complex matmul per layer.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import scipy.linalg.lapack as lapack

from certjax.certify.norms import (
    SVD_SAFETY,
    conv_norm_bound,
    largest_singular_value,
    space_to_depth_kernel,
)
from certjax.certify.rounding import FLOAT64_UNIT_ROUNDOFF, gamma

DELTA = 1e-7  # relative margin of mu over the estimated lambda_max: the bound's excess is ~DELTA / 2
RELATIVE_EXCESS = 1e-4  # the stated tolerance of the fast bound over the exact sigma_max (tests check it)
TWIDDLE_ERROR = 32 * FLOAT64_UNIT_ROUNDOFF  # |exp(i theta~) - exp(i theta)| for |theta| <= pi, 2 pi k / N
SCALAR_SLACK = 1.0 + 64 * FLOAT64_UNIT_ROUNDOFF  # the handful of scalar float64 operations per bound
LANCZOS_STEPS = 8  # Lanczos steps per block: an estimate that orders the blocks (no proof rests on it)
REFINED_STEPS = 48  # Lanczos steps for the block of the highest estimate: its shift, tried before eigvalsh
CHUNK_BYTES = 64 << 20  # Gram matrices formed per batch of frequencies
_ATTEMPTS = 5


# ------------------------------------------------------------------------------------------ the certificate


def cholesky_bound(negated: np.ndarray, mu: float) -> float | None:
    """A proven upper bound of lambda_max(H~) from a Cholesky factorisation of mu I - H~, or None if it does
    not run to completion (point 2 of the module docstring).

    Args:
      negated: -H~ [n, n] for the computed Hermitian (or symmetric) H~, C-ordered; its lower triangle (the
        upper one of its transpose, which LAPACK reads: the conjugate matrix, same spectrum) is factored.
      mu: the shift, > 0.
    Returns:
      mu + rho + 2 u max a~_ii (rounded up), or None.
    """
    n = negated.shape[0]
    work = negated.copy()
    diagonal = mu + np.real(np.diagonal(negated))  # fl(mu - h~_ii)
    work[np.diag_indices(n)] = diagonal
    potrf = lapack.zpotrf if np.iscomplexobj(work) else lapack.dpotrf
    _, info = potrf(work.T, lower=0, clean=0, overwrite_a=1)  # work.T is Fortran-ordered: no copy
    if info != 0 or np.any(diagonal < 0):
        return None
    kappa = 2.0 * gamma(2 * n + 4, np.float64)
    rho = kappa / (1.0 - kappa) * float(np.sum(diagonal)) * (1.0 + gamma(n, np.float64))
    return (mu + rho + 2.0 * FLOAT64_UNIT_ROUNDOFF * float(np.max(diagonal))) * SCALAR_SLACK


def _estimates(negated: np.ndarray, steps: int = LANCZOS_STEPS) -> np.ndarray:
    """Lanczos estimates (from below) of lambda_max(H) for every H = -negated[f] of a stack [F, n, n]: the
    largest Ritz value after `steps` steps (an estimate that orders the blocks; no proof rests on it)."""
    count, n = negated.shape[:2]
    steps = min(steps, n)
    rng = np.random.default_rng(0)
    q = (1.0 + rng.random((count, n))).astype(negated.dtype)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    previous = np.zeros_like(q)
    alphas, betas = np.zeros((count, steps)), np.zeros((count, steps))
    for k in range(steps):
        w = -np.matmul(negated, q[:, :, None])[:, :, 0]
        alphas[:, k] = np.real(np.einsum("fi,fi->f", np.conj(q), w))
        w = w - alphas[:, k, None] * q - (betas[:, k - 1, None] * previous if k else 0.0)
        betas[:, k] = np.linalg.norm(w, axis=1)
        previous, q = q, w / np.maximum(betas[:, k, None], 1e-300)
    tridiagonal = np.zeros((count, steps, steps))
    index = np.arange(steps)
    tridiagonal[:, index, index] = alphas
    tridiagonal[:, index[1:], index[:-1]] = betas[:, :-1]
    tridiagonal[:, index[:-1], index[1:]] = betas[:, :-1]
    return np.linalg.eigvalsh(tridiagonal)[:, -1]


class _LayerBound:
    """The running proof of one layer: the largest proven lambda_max so far, over its blocks."""

    def __init__(self):
        self.lam, self.fallbacks, self.eigvalsh = 0.0, 0, 0

    def add(self, negated: np.ndarray, estimate: float, exact_sigma, first_try: float | None = None) -> None:
        """Prove lambda_max(-negated) <= the layer's bound, raising it if needed. estimate: from below;
        first_try: a shift to try before the block's eigvalsh (an accurate estimate's); exact_sigma: the
        fallback."""
        if self.lam > 0 and estimate * (1.0 + DELTA) <= self.lam:
            mu = self.lam
        else:
            mu = first_try
        for _ in range(_ATTEMPTS):
            if mu is None:  # an accurate value: the block's own largest eigenvalue
                self.eigvalsh += 1
                top = -float(np.linalg.eigvalsh(negated)[0])
                scale = max(abs(top), float(np.max(np.abs(np.real(np.diagonal(negated))))), 1e-300)
                mu = max(top, 0.0) + DELTA * scale
            bound = cholesky_bound(negated, mu)
            if bound is not None:
                self.lam = max(self.lam, bound)
                return
            mu = None if self.eigvalsh == 0 or mu in (self.lam, first_try) else mu * (1.0 + 1e3 * DELTA)
        self.fallbacks += 1  # never seen: the exact SVD of this block
        self.lam = max(self.lam, (exact_sigma() * SVD_SAFETY) ** 2)

    def verify(self, negated: np.ndarray, exact_sigma, estimates=None) -> None:
        """Every block of a stack of negated Gram matrices [F, n, n], the likely largest first;
        exact_sigma(i): the fallback of block i."""
        estimates = _estimates(negated) if estimates is None else estimates
        order = np.argsort(-estimates)
        top = order[0]
        refined = float(_estimates(negated[top : top + 1], REFINED_STEPS)[0])  # the likely largest, accurately
        first_try = refined * (1.0 + 10 * DELTA) if refined > 0 else None
        self.add(negated[top], refined, lambda: exact_sigma(top), first_try)
        for index in order[1:]:
            self.add(negated[index], float(estimates[index]), lambda i=index: exact_sigma(i))


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


def taps_sigma_bound(taps: np.ndarray, positions: list[tuple[int, int]], grid: int) -> dict:
    """Upper bound of max_f sigma_max(sum_t taps[t] exp(-2 pi i f.p_t / grid)) over the grid x grid torus.

    Args:
      taps: [T, a, b] float64 matrices (any a, b; the smaller side is the Gram's).
      positions: (p1, p2) torus position of every tap (any integers; taken mod grid).
      grid: the torus side (1: one matrix, taps summed).
    Returns:
      {"sigma": the bound, "fallbacks": blocks that fell back to the exact SVD, "eigvalsh": eigvalsh calls,
       "blocks": blocks verified}.
    """
    taps = np.asarray(taps, np.float64)
    if taps.shape[1] > taps.shape[2]:
        taps = np.swapaxes(taps, 1, 2)
    count, a, b = taps.shape
    size = float(np.max(np.abs(taps))) if taps.size else 0.0
    if size == 0.0:
        return {"sigma": 0.0, "fallbacks": 0, "eigvalsh": 0, "blocks": 0}
    scale = _power_of_two(size)
    taps = taps / scale  # exact: a power of two
    offsets: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for s in range(count):
        for t in range(count):
            d = ((positions[s][0] - positions[t][0]) % grid, (positions[s][1] - positions[t][1]) % grid)
            offsets.setdefault(d, []).append((s, t))
    stacked = taps.reshape(count * a, b)
    products = (stacked @ stacked.T).reshape(count, a, count, a)  # T_s T_t^T for every pair, one GEMM
    keys = sorted(offsets)
    grams_by_offset = np.stack([sum(products[s, :, t, :] for s, t in offsets[d]) for d in keys])
    pairs = max(len(v) for v in offsets.values())
    absolute = np.sum(np.abs(taps), axis=0)
    frobenius_sq = float(np.sum(np.square(absolute))) * (1.0 + gamma(a * b + 2 * count + 4, np.float64))
    kappa_h = 2 * gamma(pairs * (b + 1), np.float64) + TWIDDLE_ERROR + 2 * gamma(2 * len(keys) + 2, np.float64)
    frequencies = _frequencies(grid)
    phase = (frequencies @ np.asarray(keys).T) % grid  # [F, D] integers f.d mod N
    phase = np.where(phase > grid // 2, phase - grid, phase)  # angles in [-pi, pi]
    twiddles = np.exp(-2j * np.pi * phase / grid)
    flat = grams_by_offset.reshape(len(keys), a * a)

    # exact: the certificate factors mu I - H~, so -H~ is kept; one matrix (grid 1) stays real
    negated_flat = -flat if grid == 1 else (-flat).astype(np.complex128)

    def negated_grams(rows):  # -H~ of frequencies `rows`: one GEMM (real matrices times twiddles)
        if grid == 1:
            return negated_flat.reshape(-1, a, a)[:1].copy()
        return (twiddles[rows] @ negated_flat).reshape(-1, a, a)

    def exact(i):  # the fallback: the exact SVD of block i
        angles = -2j * np.pi * (np.asarray(positions) @ frequencies[i] % grid) / grid
        block = np.einsum("t,tab->ab", np.exp(angles), taps)
        return float(np.linalg.svd(block, compute_uv=False)[0])

    # every Gram matrix is kept (F a^2 complex numbers: 0.6 GB for a 512-wide 3x3 conv on 16x16) so that the
    # blocks are certified in the order of their estimates, the likely largest first
    negated = negated_grams(np.arange(len(frequencies)))
    layer = _LayerBound()
    layer.verify(negated, exact)
    sigma = math.sqrt(layer.lam + kappa_h * frobenius_sq * SCALAR_SLACK) * SCALAR_SLACK * scale
    return {"sigma": sigma, "fallbacks": layer.fallbacks, "eigvalsh": layer.eigvalsh, "blocks": len(frequencies)}


def conv_taps(kernel, stride: int, padding: int, input_side: int):
    """The taps, torus positions and torus side of a strided zero-padded conv (HWIO kernel) on a square input:
    the same space-to-depth and smallest torus as norms.conv_norm_bound. Returns (taps [T, cin', cout],
    positions, grid); grid 1 when the conv reads disjoint patches (one matrix)."""
    k = np.shape(kernel)[0]
    if input_side % stride:
        raise ValueError(f"input side {input_side} is not divisible by the stride {stride}")
    n_in = input_side // stride
    n_out = (input_side + 2 * padding - k) // stride + 1
    folded, q_min, q_max = space_to_depth_kernel(kernel, stride, padding)
    if q_min == q_max:
        return folded[:1, 0], [(0, 0)], 1
    grid = max(n_in - q_min, n_out + q_max)
    size = folded.shape[0]
    taps = folded.reshape(size * size, *folded.shape[2:])
    positions = [(t1 + q_min, t2 + q_min) for t1 in range(size) for t2 in range(size)]
    return taps, positions, grid


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
    layer, worst = _LayerBound(), 0.0
    chunk = max(1, CHUNK_BYTES // (16 * n * n))
    for start in range(0, len(blocks), chunk):
        part = blocks[start : start + chunk]
        negated = -(np.conj(np.swapaxes(part, 1, 2)) @ part)
        frobenius_sq = float(np.max(np.sum(np.abs(part) ** 2, axis=(1, 2))))
        worst = max(worst, frobenius_sq * (1.0 + gamma(2 * m * n + 4, np.float64)))
        layer.verify(negated, lambda i, p=part: float(np.linalg.svd(p[i], compute_uv=False)[0]))
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
        why="a Cholesky factorisation of mu I - G^H G per block with every rounding error carried (this file)",
    ),
}
TRAINING_BOUND_METHOD = "fast"  # the evaluations during training (the final one uses certify.bound_method)


def bound_method(name: str) -> BoundMethod:
    """The registered method `name` (certify.bound_method), or a ValueError naming the valid ones."""
    if name not in BOUND_METHODS:
        raise ValueError(f"certify.bound_method {name!r}; use one of {sorted(BOUND_METHODS)}")
    return BOUND_METHODS[name]
