"""Cholesky orthogonalisation of the rows of a weight matrix (the CHORD layers of LiResNet++: Hu et al., "A
Recipe for Improved Certifiable Robustness", ICLR 2024; hukkai/liresnet models/cholesky_grad.py `orth` and
models/model.py Map2Vec.get_weight).

For W [m, n]: S = W W^T + eps I with eps = mean(diag(W W^T)) / 1000, L = chol(S) (lower), and the layer
applies L^{-1} W. Then (L^{-1} W)(L^{-1} W)^T = L^{-1} (S - eps I) L^{-T} = I - eps (L^T L)^{-1}, where L^T L
has the eigenvalues of L L^T = S, s_i^2 + eps (s_i the singular values of W). So in exact arithmetic the
result's singular values are s_i / sqrt(s_i^2 + eps) < 1: close to 1 for the large s_i (rows nearly
orthonormal), and 0 for the missing ones when m > n (rank deficient W). Rounding can push the float32 result
a little above 1, which is why evaluation measures every orthogonalised weight as applied (exact float64 SVD)
instead of assuming 1.

The regulariser eps is a constant for the gradient: the original takes it with `.item()` (Map2Vec) or leaves
it out of its hand-written backward (CholeskyOrthfn); here `stop_gradient`. The gradient itself is JAX's
autodiff of `cholesky` and `triangular_solve`, which is the same triangular-solve algebra as the original's
custom backward; tests/test_liresnet_pp.py checks it against finite differences in float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

REGULARISER = 1e-3  # eps = mean(diag(W W^T)) * 1e-3 (cholesky_grad.py: .mul(1e-3); model.py: .div(1000.))


def cholesky_orthogonalize(weight):
    """L^{-1} W for W [..., m, n] (batched over leading axes), L = chol(W W^T + eps I), eps as above.

    The Gram matrix is computed at full precision (no TF32 on GPUs): a rounded Gram matrix only makes the
    rows less orthonormal, which the evaluation-time SVD would then report as a larger bound."""
    if weight.ndim < 2:
        raise ValueError(f"cholesky_orthogonalize needs a matrix [..., m, n], got shape {weight.shape}")
    gram = jnp.matmul(weight, jnp.swapaxes(weight, -1, -2), precision=jax.lax.Precision.HIGHEST)
    eps = jax.lax.stop_gradient(REGULARISER * jnp.mean(jnp.diagonal(gram, axis1=-2, axis2=-1), axis=-1))
    eye = jnp.eye(gram.shape[-1], dtype=gram.dtype)
    lower = jnp.linalg.cholesky(gram + eps[..., None, None] * eye)
    return jax.lax.linalg.triangular_solve(lower, weight, left_side=True, lower=True)
