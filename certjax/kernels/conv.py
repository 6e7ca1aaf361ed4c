"""2-D convolution (NHWC x HWIO, symmetric zero padding) whose kernel gradient is fast on XLA:CPU.

The forward and the input gradient are XLA's own convolutions. The kernel (filter) gradient is where XLA:CPU
is slow: for LiResNet's 3x3 convolution at [256, 16, 16, 64] it takes 0.18-0.22 s, against 0.04 s for the
forward and 0.06 s for the input gradient (`python bench/liresnet.py --conv`), so it was ~2/3 of the
network's backward. XLA computes it as a convolution with a 16 x 16 "kernel" (the output gradient) and a
3 x 3 output, a shape its CPU convolution handles poorly. Written as what it is, a matrix product

    dK[(i, j, c), o] = sum_{b, h, w} x_pad[b, s h + i, s w + j, c] g[b, h, w, o]  =  cols(x)^T g,

it is one GEMM per chunk of images with the im2col matrix of that chunk only: a [chunk Ho Wo, k k cin] matrix
that stays in cache (the whole-batch im2col is 151 MB at that shape and costs more than it saves on this
memory-bound machine: ~6 GB/s). Chunks of ~1024 output pixels (4 images of 16 x 16) measured fastest.

The sum over the batch is only reordered (chunk by chunk instead of XLA's order): values agree to float32
rounding (tests/test_conv.py: <= 1e-5 relative to the largest gradient entry). On other backends (GPU: cuDNN
handles the filter gradient well) `jax.lax.platform_dependent` keeps XLA's own gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

ROWS_PER_CHUNK = 1024  # output pixels per GEMM of the kernel gradient (measured: 4 images of 16 x 16)
_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _xla_conv(x, kernel, stride: int, padding: int, precision):
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        (stride, stride),
        ((padding, padding), (padding, padding)),
        dimension_numbers=_DIMENSIONS,
        precision=precision,
    )


def _patches(x_padded, size: int, stride: int, out_height: int, out_width: int):
    """im2col: [n, Ho, Wo, size * size * cin] in the (i, j, c) order of an HWIO kernel's reshape."""
    span_h, span_w = stride * (out_height - 1) + 1, stride * (out_width - 1) + 1
    return jnp.concatenate(
        [
            x_padded[:, i : i + span_h : stride, j : j + span_w : stride, :]
            for i in range(size)
            for j in range(size)
        ],
        axis=-1,
    )


def kernel_gradient_by_chunks(x, g, size: int, stride: int, padding: int, precision=None):
    """cols(x)^T g summed chunk by chunk over the batch (a `lax.scan`): the gradient of
    sum(g * conv(x, K)) w.r.t. K, as an HWIO kernel [size, size, cin, cout]."""
    batch, _, _, cin = x.shape
    _, out_height, out_width, cout = g.shape
    chunk = max(1, min(batch, ROWS_PER_CHUNK // (out_height * out_width)))
    chunks = -(-batch // chunk)
    extra = chunks * chunk - batch  # zero images add nothing to the sum
    x = jnp.pad(x, ((0, extra), (padding, padding), (padding, padding), (0, 0)))
    g = jnp.pad(g, ((0, extra), (0, 0), (0, 0), (0, 0)))
    x = x.reshape((chunks, chunk) + x.shape[1:])
    g = g.reshape(chunks, chunk * out_height * out_width, cout)

    def accumulate(total, pair):
        x_chunk, g_chunk = pair
        cols = _patches(x_chunk, size, stride, out_height, out_width).reshape(-1, size * size * cin)
        # [cout, rows] x [rows, k k cin]: contracting the rows of both (a transposed-LHS GEMM)
        part = jax.lax.dot_general(g_chunk, cols, (((0,), (0,)), ((), ())), precision=precision)
        return total + part.astype(total.dtype), None

    total, _ = jax.lax.scan(accumulate, jnp.zeros((cout, size * size * cin), x.dtype), (x, g))
    return total.T.reshape(size, size, cin, cout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d(x, kernel, stride: int = 1, padding: int = 0, precision=None):
    """conv_general_dilated(x, kernel) with PyTorch's Conv2d geometry (NHWC x HWIO, padding p each side)."""
    return _xla_conv(x, kernel, stride, padding, precision)


def _conv2d_forward(x, kernel, stride, padding, precision):
    return _xla_conv(x, kernel, stride, padding, precision), (x, kernel)


def _conv2d_backward(stride, padding, precision, residuals, g):
    x, kernel = residuals
    _, input_transpose = jax.vjp(lambda a: _xla_conv(a, kernel, stride, padding, precision), x)
    (dx,) = input_transpose(g)

    def xla_kernel_gradient(x, g):
        _, transpose = jax.vjp(lambda k: _xla_conv(x, k, stride, padding, precision), kernel)
        return transpose(g)[0]

    def chunked_kernel_gradient(x, g):
        return kernel_gradient_by_chunks(x, g, kernel.shape[0], stride, padding, precision)

    dkernel = jax.lax.platform_dependent(x, g, cpu=chunked_kernel_gradient, default=xla_kernel_gradient)
    return dx, dkernel.astype(kernel.dtype)


conv2d.defvjp(_conv2d_forward, _conv2d_backward)
