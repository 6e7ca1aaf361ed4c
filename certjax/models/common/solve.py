"""Batched linear solves that cannot deadlock XLA:CPU.

jaxlib's CPU LAPACK kernels (jaxlib/cpu/lapack_kernels.cc at jax-v0.10.2, `ParallelBatchMap`) split a
batched call whose work exceeds 2e5 flops into chunks, schedule them on XLA's intra-op thread pool and block
the calling pool thread until they finish. When the thunk executor runs as many independent batched LAPACK
calls at once as the pool has threads, every thread waits for chunks that no thread is free to run, and the
step hangs at 0 % CPU. BRONet's layers factor their Gram matrices independently of each other, so two of
them are enough on a 2-core machine: `bench/bronet.py` at width 128 hung in its first step, with both pool
threads in `lapack_cgetrf_ffi` -> `ParallelBatchMap` -> `BlockingCounter::Wait` (gdb).

A call with batch 1 runs inline, never on the pool. On CPU `solve` therefore maps over the batch one matrix
at a time (each matrix goes through the same getrf / getrs as in the batched call); every other platform
(cuSOLVER on GPU) keeps the batched call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def solve(a, b):
    """jnp.linalg.solve(a, b), one matrix at a time on CPU.

    Args:
      a: [..., n, n] square matrices.
      b: [..., n, k] right-hand sides, with a's batch shape.

    Returns:
      [..., n, k], the solution of a x = b per batch element.
    """
    if a.shape[:-2] != b.shape[:-2] or b.ndim != a.ndim:
        raise ValueError(
            f"solve needs a [..., n, n] and b [..., n, k] of one batch shape, got {a.shape}, {b.shape}"
        )
    if a.ndim == 2:
        return jnp.linalg.solve(a, b)

    def one_at_a_time(a, b):
        flat = (a.reshape((-1,) + a.shape[-2:]), b.reshape((-1,) + b.shape[-2:]))
        return jax.lax.map(lambda pair: jnp.linalg.solve(*pair), flat).reshape(b.shape)

    return jax.lax.platform_dependent(a, b, cpu=one_at_a_time, default=jnp.linalg.solve)
