"""Guaranteed operator norms and the norms certificates are built from (shared/DESIGN.md, "Certification").

* `conv_norm_bound`: the l_2 operator norm of a strided, zero-padded convolution, bounded from above by the
  exact float64 SVD of every frequency block of an equivalent circular convolution (space-to-depth to make it
  stride 1, then the smallest torus on which no read wraps onto the embedded input; Sedghi et al., ICLR 2019,
  "The Singular Values of Convolutional Layers", Thm. 6, extended to padding and stride as derived in
  certjax/models/liresnet.py's module docstring; used by LiResNet and LiResNet++).
* `largest_singular_value`: exact float64 SVD over a stack of blocks (LOT's frequency blocks, dense layers),
  times `SVD_SAFETY`.
* `pairwise_row_distances`: ||w_y - w_j|| of a last layer, the per-pair head factor of l_2 certificates.
* `l2_norm_per_example`: the per-example l_2 norm every rounding allowance and attack measures with.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

# Safety factor on the float64 SVD of a float32 matrix (backward error ~1e-15 of the norm).
SVD_SAFETY = 1.0 + 1e-9


def l2_norm_per_example(x):
    """||x[b]||_2 over all but the first axis: [B, ...] -> [B]."""
    return jnp.sqrt(jnp.sum(jnp.square(x.reshape(x.shape[0], -1)), axis=1))


def pairwise_row_distances(rows) -> np.ndarray:
    """||r_y - r_j||_2 for every pair of rows of a last layer, in float64 (the per-pair head bound)."""
    rows = np.asarray(rows, np.float64)
    return np.sqrt(np.maximum(np.sum((rows[:, None, :] - rows[None, :, :]) ** 2, axis=-1), 0.0))


def largest_singular_value(w) -> float:
    """Exact (float64 SVD) largest singular value over all [cout, cin] blocks of w, rounded up."""
    blocks = np.asarray(w).astype(np.complex128).reshape((-1,) + np.shape(w)[-2:])
    return float(np.max(np.linalg.svd(blocks, compute_uv=False))) * SVD_SAFETY


def space_to_depth_kernel(kernel, stride: int, padding: int):
    """A stride-s conv (HWIO kernel, zero padding p) as a stride-1 conv on the space-to-depth input
    (einops "b (h s1) (w s2) c -> b h w (c s1 s2)"). Returns (kernel [k', k', cin s^2, cout], q_min, q_max):
    output i reads the space-to-depth input at i + q, q = q_min .. q_max."""
    kernel = np.asarray(kernel, np.float64)
    k, _, cin, cout = kernel.shape
    taps = [divmod(a - padding, stride) for a in range(k)]  # (q, r) per kernel tap
    q_min, q_max = min(q for q, _ in taps), max(q for q, _ in taps)
    size = q_max - q_min + 1
    out = np.zeros((size, size, cin * stride * stride, cout))
    channels = np.arange(cin) * stride * stride
    for a1, (q1, r1) in enumerate(taps):
        for a2, (q2, r2) in enumerate(taps):
            out[q1 - q_min, q2 - q_min, channels + r1 * stride + r2] = kernel[a1, a2]
    return out, q_min, q_max


def conv_taps(kernel, stride: int, padding: int, input_side: int):
    """The taps, torus positions and torus side of a strided zero-padded conv (HWIO kernel) on a square input
    of side input_side (see the module docstring): space-to-depth, then the smallest torus without
    wrap-around. Returns (taps [T, cin', cout], positions [(p1, p2)] per tap, grid); grid 1 when the conv
    reads disjoint patches (one matrix, its bound exact)."""
    k = np.shape(kernel)[0]
    if input_side % stride:
        raise ValueError(f"input side {input_side} is not divisible by the stride {stride}")
    n_in = input_side // stride
    n_out = (input_side + 2 * padding - k) // stride + 1
    folded, q_min, q_max = space_to_depth_kernel(kernel, stride, padding)
    if q_min == q_max:  # one disjoint patch per output: block diagonal
        return folded[:1, 0], [(0, 0)], 1
    grid = max(n_in - q_min, n_out + q_max)
    size = folded.shape[0]
    taps = folded.reshape(size * size, *folded.shape[2:])
    positions = [(t1 + q_min, t2 + q_min) for t1 in range(size) for t2 in range(size)]
    return taps, positions, grid


def conv_norm_bound(kernel, stride: int, padding: int, input_side: int) -> float:
    """Upper bound of the l_2 operator norm of `conv(x, kernel, stride, padding)` on a square input of side
    input_side (see the module docstring): `conv_taps`, then the exact SVD of every frequency block of the
    circular conv in float64."""
    taps, positions, grid = conv_taps(kernel, stride, padding, input_side)
    if grid == 1:
        return float(np.linalg.svd(taps[0], compute_uv=False)[0])
    array = np.zeros((grid, grid) + taps.shape[1:])
    for tap, (p1, p2) in zip(taps, positions):
        array[p1 % grid, p2 % grid] += tap
    spectrum = np.fft.rfft2(array, axes=(0, 1))  # [grid, grid // 2 + 1, cin', cout]
    return float(np.max(np.linalg.svd(spectrum, compute_uv=False)))
