"""certjax/kernels/conv.py: the chunked im2col kernel gradient equals XLA's own convolution gradient.

Tolerance: the two compute the same sums in another order, so they differ by float32 rounding only; 1e-5 of
the largest entry is ~100 ulps of headroom for sums of up to a few thousand terms.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from certjax.kernels import conv as conv_module
from certjax.kernels.conv import conv2d, kernel_gradient_by_chunks


def _xla(x, kernel, stride, padding):
    return jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), ((padding, padding),) * 2, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _relative_error(actual, desired):
    return float(jnp.max(jnp.abs(actual - desired)) / jnp.max(jnp.abs(desired)))


# (batch, side, cin, cout, kernel size, stride, padding): LiResNet's block, stem and neck geometries, and an
# odd batch that needs a zero-padded last chunk.
GEOMETRIES = [
    (8, 16, 16, 16, 3, 1, 1),
    (6, 32, 3, 16, 5, 2, 2),
    (8, 16, 16, 32, 4, 4, 0),
    (5, 8, 4, 6, 3, 1, 1),
]


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_values_and_gradients_equal_xla_convolution(geometry):
    batch, side, cin, cout, size, stride, padding = geometry
    kx, kk, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (batch, side, side, cin))
    kernel = jax.random.normal(kk, (size, size, cin, cout)) / size
    probe = jax.random.normal(kg, _xla(x, kernel, stride, padding).shape)

    def loss(conv):
        # a nonlinear function of the output, so the cotangent differs from element to element
        return lambda x, kernel: jnp.sum(jnp.sin(conv(x, kernel, stride, padding)) * probe)

    np.testing.assert_array_equal(conv2d(x, kernel, stride, padding), _xla(x, kernel, stride, padding))
    fast = jax.jit(jax.grad(loss(conv2d), argnums=(0, 1)))(x, kernel)
    reference = jax.jit(jax.grad(loss(_xla), argnums=(0, 1)))(x, kernel)
    np.testing.assert_array_equal(fast[0], reference[0])  # the input gradient is XLA's own
    assert _relative_error(fast[1], reference[1]) <= 1e-5


def test_chunks_that_do_not_divide_the_batch(monkeypatch):
    """7 images in chunks of 3 (ROWS_PER_CHUNK = 3 images of 4 x 4): the padded zero images add nothing."""
    monkeypatch.setattr(conv_module, "ROWS_PER_CHUNK", 48)
    x = jax.random.normal(jax.random.key(1), (7, 4, 4, 2))
    g = jax.random.normal(jax.random.key(2), (7, 4, 4, 3))
    kernel = jnp.zeros((3, 3, 2, 3))
    _, transpose = jax.vjp(lambda k: _xla(x, k, 1, 1), kernel)
    assert _relative_error(kernel_gradient_by_chunks(x, g, 3, 1, 1), transpose(g)[0]) <= 1e-5


def test_brute_force_kernel_gradient():
    """dK[i, j, c, o] = sum_{b, h, w} x_pad[b, s h + i, s w + j, c] g[b, h, w, o], by explicit loops."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 6, 2))
    g = rng.standard_normal((2, 3, 3, 2))
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    expected = np.zeros((3, 3, 2, 2))
    for i in range(3):
        for j in range(3):
            for h in range(3):
                for w in range(3):
                    expected[i, j] += padded[:, 2 * h + i, 2 * w + j, :].T @ g[:, h, w, :]
    actual = kernel_gradient_by_chunks(jnp.asarray(x, jnp.float32), jnp.asarray(g, jnp.float32), 3, 2, 1)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)
