"""certjax.models.common.solve: the same solutions and gradients as jnp.linalg.solve, checked against float64
numpy, and no hang where independent batched solves run at once on XLA:CPU's pool (jaxlib's ParallelBatchMap
deadlock, the reason the module exists)."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from certjax.models.common.solve import solve


def _system(rng, batch, n, k, dtype):
    a = rng.normal(size=batch + (n, n)) + 1j * rng.normal(size=batch + (n, n))
    a = a @ np.conj(np.swapaxes(a, -1, -2)) + n * np.eye(n)  # Hermitian positive definite, as BRO's Gram
    b = rng.normal(size=batch + (n, k)) + 1j * rng.normal(size=batch + (n, k))
    return a.astype(dtype), b.astype(dtype)


@pytest.mark.parametrize("batch", [(), (5,), (3, 4)])
def test_solution_matches_float64(batch):
    a, b = _system(np.random.default_rng(0), batch, 6, 3, np.complex64)
    got = np.asarray(jax.jit(solve)(a, b))
    want = np.linalg.solve(a.astype(np.complex128), b.astype(np.complex128))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, np.asarray(jnp.linalg.solve(a, b)), rtol=1e-6, atol=1e-7)


def test_gradient_matches_batched_solve():
    a, b = _system(np.random.default_rng(1), (4,), 5, 2, np.complex64)

    def loss(solver):
        return lambda a, b: jnp.sum(jnp.abs(solver(a, b)) ** 2)

    got = jax.grad(loss(solve), argnums=(0, 1))(a, b)
    want = jax.grad(loss(jnp.linalg.solve), argnums=(0, 1))(a, b)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6)


def test_mismatched_shapes_name_them():
    with pytest.raises(ValueError, match=r"one batch shape, got \(2, 3, 3\), \(3, 3, 1\)"):
        solve(jnp.zeros((2, 3, 3)), jnp.zeros((3, 3, 1)))


def test_independent_batched_solves_finish():
    """Eight independent solves of 64 complex 48 x 48 systems (work enough for jaxlib to split each over the
    pool) in one jitted function, 40 calls, on 2 cores as on CI. In a subprocess, so that a deadlock fails the
    test instead of hanging the suite. With jnp.linalg.solve in place of solve this script hung 3 times out of
    3 (killed after 60 s); with solve it takes about 5 s."""
    script = textwrap.dedent(
        """
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
        import jax, jax.numpy as jnp, numpy as np
        from certjax.models.common.solve import solve
        rng = np.random.default_rng(0)
        eye = jnp.eye(48, dtype=jnp.complex64)
        grams = [jnp.asarray(rng.normal(size=(64, 48, 48)), jnp.complex64) + 48 * eye for _ in range(8)]
        rhs = jnp.asarray(rng.normal(size=(64, 48, 32)), jnp.complex64)
        step = jax.jit(lambda grams, rhs: sum(jnp.sum(jnp.abs(solve(g, rhs))) for g in grams))
        for _ in range(40):
            value = float(step(grams, rhs))
        print("finished", value)
        """
    )
    done = subprocess.run(
        ["taskset", "-c", "0,1", sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "finished" in done.stdout
