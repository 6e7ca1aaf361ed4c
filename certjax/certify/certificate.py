"""The Cholesky certificate of one Hermitian block and the running bound of a layer's blocks (the proof of
certify.bound_method = "fast"; the derivation is point 2 of certjax/certify/spectral.py's module docstring).

* `cholesky_bound(negated, mu)`: if a Cholesky factorisation of fl(mu I - H~) runs to completion, then
  lambda_max(H~) <= mu + rho + 2 u max_i a~_ii, rho = kappa_C / (1 - kappa_C) trace(A~), kappa_C =
  2 gamma(2 n + 4) (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., Thm. 10.3, widened for
  complex arithmetic); else None. Nothing of an eigenvalue solver is trusted: eigvalsh and Lanczos only choose
  mu.
* `LayerBound`: the largest proven lambda_max over a layer's blocks; a block below the bound so far is
  certified at it (one factorisation), a larger one at its own Lanczos value times 1 + 10 DELTA (or
  1 + 100 DELTA), its eigvalsh value only if both fail.
* `lanczos_top`: Lanczos estimates (from below) of lambda_max of a batch of Hermitian operators.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg.lapack as lapack

from certjax.certify.norms import SVD_SAFETY
from certjax.certify.rounding import FLOAT64_UNIT_ROUNDOFF, gamma

DELTA = 1e-7  # relative margin of mu over the estimated lambda_max: the bound's excess is ~DELTA / 2
SCALAR_SLACK = 1.0 + 64 * FLOAT64_UNIT_ROUNDOFF  # the handful of scalar float64 operations per bound
REFINED_STEPS = 48  # Lanczos steps for a block above the layer's bound so far: its shift, before eigvalsh


def cholesky_bound(negated: np.ndarray, mu: float, in_place: bool = False) -> float | None:
    """A proven upper bound of lambda_max(H~) from a Cholesky factorisation of mu I - H~, or None if it does
    not run to completion.

    Args:
      negated: -H~ [n, n] for the computed Hermitian (or symmetric) H~, C-ordered. Only its lower triangle is
        read (as the upper one of its transpose, which is what LAPACK factors: the conjugate matrix, with the
        same spectrum); the other one may hold anything.
      mu: the shift, > 0.
      in_place: factor `negated` itself (then destroyed) instead of a copy.
    Returns:
      mu + rho + 2 u max a~_ii (rounded up), or None.
    """
    n = negated.shape[0]
    diagonal = mu + np.real(np.diagonal(negated))  # fl(mu - h~_ii)
    work = negated if in_place else negated.copy()
    work[np.diag_indices(n)] = diagonal
    potrf = lapack.zpotrf if np.iscomplexobj(work) else lapack.dpotrf
    _, info = potrf(work.T, lower=0, clean=0, overwrite_a=1)  # work.T is Fortran-ordered: no copy
    if info != 0 or np.any(diagonal < 0):
        return None
    kappa = 2.0 * gamma(2 * n + 4, np.float64)
    rho = kappa / (1.0 - kappa) * float(np.sum(diagonal)) * (1.0 + gamma(n, np.float64))
    return (mu + rho + 2.0 * FLOAT64_UNIT_ROUNDOFF * float(np.max(diagonal))) * SCALAR_SLACK


def lanczos_top(matvec, start: np.ndarray, steps: int) -> np.ndarray:
    """The largest Ritz value after `steps` Lanczos steps, per operator of a batch (an estimate from below of
    lambda_max; no proof rests on it).

    Args:
      matvec: [F, n] -> [F, n], the F Hermitian operators applied to one vector each.
      start: [F, n] start vectors (nonzero).
      steps: Lanczos steps (at most n are taken).
    Returns:
      [F] estimates.
    """
    count, n = start.shape
    steps = min(steps, n)
    q = start / np.linalg.norm(start, axis=1, keepdims=True)
    previous = np.zeros_like(q)
    alphas, betas = np.zeros((count, steps)), np.zeros((count, steps))
    for k in range(steps):
        w = matvec(q)
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


def start_vectors(count: int, n: int, dtype) -> np.ndarray:
    """Fixed positive start vectors [count, n]: the same checkpoint gives the same figure."""
    return (1.0 + np.random.default_rng(0).random((count, n))).astype(dtype)


def refined_top(negated: np.ndarray) -> float:
    """lambda_max of the Hermitian -negated (both triangles read) from below: REFINED_STEPS Lanczos steps."""
    start = start_vectors(1, len(negated), negated.dtype)
    return float(lanczos_top(lambda v: -(v @ negated.T), start, REFINED_STEPS)[0])


class LayerBound:
    """The running proof of one layer: `lam`, the largest proven lambda_max over the blocks added so far."""

    def __init__(self):
        self.lam, self.fallbacks, self.eigvalsh = 0.0, 0, 0

    def add(self, negated, estimate: float, exact_sigma, remake=None) -> None:
        """Prove lambda_max(H) <= the layer's bound for one block, raising the bound if needed.

        The shifts tried, cheapest first (a failed factorisation costs less than a completed one): the bound
        so far (if the block's estimate is below it: the bound does not grow), then REFINED_STEPS Lanczos
        steps' value times 1 + 10 DELTA and 1 + 100 DELTA, then the block's eigvalsh value plus DELTA and
        1e3 DELTA of its scale; then the exact SVD (never seen).

        Args:
          negated: -H~ of the block (lower triangle read).
          estimate: lambda_max from below (Lanczos).
          exact_sigma: () -> its exact sigma_max, the fallback when every certificate failed.
          remake: () -> a fresh `negated`: the certificate then factors in place (no copy) and retries
            remake it.
        """
        below = self.lam > 0 and estimate * (1.0 + DELTA) <= self.lam
        plan = ("bound", "lanczos", "lanczos wide", "eigvalsh", "eigvalsh wide")[0 if below else 1 :]
        intact, top, mu = True, 0.0, 0.0
        for step in plan:
            if not intact:
                negated, intact = remake(), True
            if step == "bound":
                mu = self.lam
            elif step == "lanczos":
                top = refined_top(negated)
                mu = top * (1.0 + 10 * DELTA)
            elif step == "lanczos wide":
                mu = top * (1.0 + 100 * DELTA)
            elif step == "eigvalsh":  # an accurate value: the block's own largest eigenvalue
                self.eigvalsh += 1
                top = -float(np.linalg.eigvalsh(negated, UPLO="L")[0])
                scale = max(abs(top), float(np.max(np.abs(np.real(np.diagonal(negated))))), 1e-300)
                mu = max(top, 0.0) + DELTA * scale
            else:
                mu = mu * (1.0 + 1e3 * DELTA)
            if mu <= 0:
                continue  # a Lanczos value <= 0: straight to eigvalsh
            bound = cholesky_bound(negated, mu, in_place=remake is not None)
            intact = remake is None
            if bound is not None:
                self.lam = max(self.lam, bound)
                return
        self.fallbacks += 1  # never seen: the exact SVD of this block
        self.lam = max(self.lam, (exact_sigma() * SVD_SAFETY) ** 2)
