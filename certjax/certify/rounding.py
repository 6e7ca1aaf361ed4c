"""Floating-point rounding, named once: the unit roundoffs, Higham's gamma, round-up helpers and the error
bound of the input normalisation (shared/DESIGN.md, "Certification"; Higham, *Accuracy and Stability of
Numerical Algorithms*, 2nd ed., Sec. 2.2 and Lemma 3.1).

Every certificate that allows for rounding cites these names, so its soundness argument can be read here:

* `FLOAT32_UNIT_ROUNDOFF` u32 = 2^-24: |fl(a op b) - a op b| <= u32 |a op b| for one float32 operation
  (round to nearest, no underflow).
* `FLOAT32_SPACING_AT_ONE` = 2^-23 = 2 u32, the distance from 1 to the next float32 (numpy's `eps`): the
  per-operation allowance the l_inf-dist layers sow (a generous 2 u32 |result| per op).
* `FLOAT64_UNIT_ROUNDOFF` u64 = 2^-53: the same for float64 (the certifying forwards of LOT and LiResNet).
* `gamma(n, dtype)` = n u / (1 - n u): a dot product of n terms errs by at most gamma_n sum_i |a_i b_i|
  (Higham, Lemma 3.1 / Thm. 3.1), valid while n u < 1.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from certjax.certify.norms import l2_norm_per_example

FLOAT32_UNIT_ROUNDOFF = 2.0**-24
FLOAT32_SPACING_AT_ONE = 2.0**-23
FLOAT64_UNIT_ROUNDOFF = 2.0**-53


def unit_roundoff(dtype) -> float:
    """The unit roundoff of float32 or float64 (anything else is refused: no bound is derived for it)."""
    name = np.dtype(dtype).name
    if name == "float32":
        return FLOAT32_UNIT_ROUNDOFF
    if name == "float64":
        return FLOAT64_UNIT_ROUNDOFF
    raise ValueError(f"no unit roundoff for dtype {name}: certify in float32 or float64")


def gamma(n: int, dtype) -> float:
    """Higham's gamma_n = n u / (1 - n u) for the unit roundoff u of `dtype`: the worst-case relative error of
    a dot product of n products (Lemma 3.1).

    Args:
      n: number of products (terms) in the dot product.
      dtype: float32 or float64.
    Returns:
      gamma_n as a Python float.
    """
    mu = n * unit_roundoff(dtype)
    if mu >= 1.0:
        raise ValueError(f"gamma({n}) undefined for {np.dtype(dtype).name}: n u >= 1")
    return mu / (1.0 - mu)


def round_up_float32(value: float) -> np.float32:
    """The smallest float32 >= value (a budget eps must never shrink when it becomes float32)."""
    rounded = np.float32(value)
    if float(rounded) < value:
        rounded = np.nextafter(rounded, np.float32(np.inf))
    return rounded


def round_up_float32_array(values) -> np.ndarray:
    """Elementwise: the smallest float32 >= each value (bounds must never shrink when they become float32)."""
    values = np.asarray(values, np.float64)
    rounded = values.astype(np.float32)
    low = rounded.astype(np.float64) < values
    return np.where(low, np.nextafter(rounded, np.float32(np.inf)), rounded).astype(np.float32)


def round_up_to_float32_traced(a):
    """Traced float64 -> the next float32 at or above each value (called inside a float64 region)."""
    rounded = a.astype(jnp.float32)
    low = rounded.astype(jnp.float64) < a
    return jnp.where(low, jnp.nextafter(rounded, jnp.float32(jnp.inf)), rounded)


def normalisation_error_linf(images, std):
    """Per example: a bound of the l_inf error of the float32 normalisation (x / 255 - mean) / std.

    Each of its three operations rounds: <= u (1 + 1) / min(std) from the first two (values <= 1) and
    u |x'| from the division, per pixel, here with the per-op allowance 2 u (FLOAT32_SPACING_AT_ONE).

    Args:
      images: the normalised float32 images [B, H, W, C].
      std: the per-channel standard deviations of the normalisation.
    Returns:
      [B] bounds.
    """
    flat = jnp.abs(images).reshape(images.shape[0], -1)
    return FLOAT32_SPACING_AT_ONE * (2.0 / min(std) + jnp.max(flat, axis=1))


def normalisation_error_l2(images, std):
    """`normalisation_error_linf`'s per-pixel bound summed as an l_2 norm over the D pixels (<= sqrt(D) times
    its constant part): [B] bounds of the l_2 error of the float32 normalisation; the same Args."""
    flat = jnp.abs(images).reshape(images.shape[0], -1)
    return FLOAT32_SPACING_AT_ONE * (2.0 / min(std) * math.sqrt(flat.shape[1]) + l2_norm_per_example(flat))
