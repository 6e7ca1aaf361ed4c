"""The l_inf-dist (and l_p-dist) operation out[b, o] = ||x[b] - w[o]||_p, p in [1, inf], as models call it.

This is the hot path of the l_inf-dist Net (Zhang et al., ICML'21, eq. 1) and SortNet's first layer. It is a
"matmul" with (sub, abs, max) in place of (mul, add). `lp_distance` and `masked_lp_distance` are the functions
models call; `kernel=` picks the implementation (`KERNELS`):

* "auto": the Pallas kernels of `certjax.kernels.linf_dist_pallas` on GPU for each configuration where they
  pass a check against the jnp path (`certjax.kernels.autoselect`); else, and off GPU, the jnp path;
* "pallas": the Pallas kernels unchecked (errors are raised);
* "jnp": the jnp path (`certjax.kernels.linf_dist_jnp`: its formulations and numerics are described there);
* "interpret": the Pallas kernels in interpret mode, on any backend (tests).

Split from the original certjax/kernels/linf_dist.py, which also held the jnp path: this module sits above
the three implementations, so none of them imports it back (no import cycle).
"""

from __future__ import annotations

import jax

from certjax.kernels.linf_dist_jnp import (
    check_shapes,
    lp_distance_jnp,
    lp_distance_reference,
    masked_lp_distance_jnp,
)

__all__ = ["KERNELS", "lp_distance", "lp_distance_reference", "masked_lp_distance"]

KERNELS = ("auto", "pallas", "jnp", "interpret")


def _distance(x, w, mask, p, kernel):
    check_shapes(x, w, mask)
    if kernel not in KERNELS:
        raise ValueError(f"unknown distance kernel {kernel!r}; valid: {KERNELS}")
    # imported on first use: jax.experimental.pallas (with Triton) takes ~0.4 s to import
    if kernel == "auto":
        from certjax.kernels import autoselect

        checked = autoselect.select(autoselect.DISTANCE, x, w, mask)  # None: off GPU, or it failed its check
        if checked is not None:
            return checked(x, w, mask, p)
        kernel = "jnp"
    if kernel == "jnp":
        return lp_distance_jnp(x, w, p) if mask is None else masked_lp_distance_jnp(x, w, mask, p)
    from certjax.kernels import linf_dist_pallas

    return linf_dist_pallas.lp_distance_pallas(x, w, mask, p, interpret=kernel == "interpret")


def lp_distance(x: jax.Array, w: jax.Array, p: jax.Array, *, kernel: str = "auto") -> jax.Array:
    """||x[b] - w[o]||_p for x [B, I], w [O, I], p a scalar (jnp.inf for l_inf). Returns [B, O].

    kernel: one of KERNELS (see the module docstring). Differentiable in x and w.
    """
    return _distance(x, w, None, p, kernel)


def masked_lp_distance(
    x: jax.Array, w: jax.Array, mask: jax.Array, p: jax.Array, *, kernel: str = "auto"
) -> jax.Array:
    """||(x[b] - w[o]) * mask[b]||_p: the distance over the coordinates kept in mask [B, I] (0/1 floats).

    SortNet's dropout training (zbh2047/SortNet core/models/norm_dist.py) evaluates each neuron on a random
    subset of its inputs; a dropped coordinate contributes |d| * 0 = 0, which changes neither the max nor
    the sum of p-th powers. Returns [B, O]; kernel: one of KERNELS.
    """
    return _distance(x, w, mask, p, kernel)
