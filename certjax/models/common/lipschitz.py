"""Lipschitz layers shared by LiResNet and LiResNet++ (Hu et al., NeurIPS'23 and ICLR'24; the snapshot of
klasleino/gloro models/layers/conv.py and hukkai/liresnet models/model.py): the conv / dense maps, power
iteration, the layer that applies a kernel and estimates its sigma_max, and the certifying forward's rounding
allowance per layer (the derivation is in certjax/models/liresnet.py's docstring, "Rounding at evaluation").
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from certjax.certify.norms import l2_norm_per_example
from certjax.certify.rounding import FLOAT32_UNIT_ROUNDOFF, gamma, round_up_to_float32_traced
from certjax.kernels.conv import conv2d
from certjax.models.common.layers import sow_l2_rounding_error

POWER = "power_iteration"  # persistent power-iteration vectors, one per layer, shape (1,) + input shape
FROZEN = "liresnet_frozen"  # evaluation: every layer's kernel as applied and its guaranteed sigma
ESTIMATES = "lipschitz_estimate"  # sown per-layer power-iteration estimates, when asked for
POWER_ITERATIONS = 10  # per training step (the snapshot's num_lc_iter)
EVAL_POWER_ITERATIONS = 500  # the snapshot's evaluation: "let the power method converge"
EVAL_LANCZOS_STEPS = 24  # the assumed figure by Lanczos: converged where 500 power iterations are not yet
BOUND_SAFETY = 1.0 + 1e-6  # on each float64 FFT + SVD bound (their relative errors are ~1e-15)
_HIGHEST = jax.lax.Precision.HIGHEST


# ------------------------------------------------------------------------------------------- linear maps


def conv(x, kernel, stride: int, padding: int, precision=None, fast_gradient: bool = False):
    """NHWC x HWIO cross-correlation with symmetric zero padding (PyTorch's Conv2d).

    fast_gradient (the training forward): the same convolution whose kernel gradient is computed by chunked
    im2col GEMMs on CPU (certjax/kernels/conv.py, ~3x XLA:CPU's own; reverse mode only). Otherwise XLA's
    convolution, which forward-mode autodiff (the tests' exact Jacobians) can also differentiate."""
    if fast_gradient:
        return conv2d(x, kernel, stride, padding, precision)
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        (stride, stride),
        ((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=precision,
    )


def dense(x, kernel, precision=None, fast_gradient: bool = False):
    del fast_gradient  # XLA's matmul gradients are GEMMs already
    return jnp.matmul(x, kernel, precision=precision)


def power_iteration(linear_fn, u, iterations: int):
    """`iterations` steps u <- A^T A u / ||A^T A u|| (A^T through jax.vjp) from u (normalised first)."""

    def normalise(v):
        return v / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(v))), 1e-12)

    def step(_, v):
        image, transpose = jax.vjp(linear_fn, v)
        return normalise(transpose(image)[0])

    return jax.lax.fori_loop(0, iterations, step, normalise(u))


def lanczos_iterate(linear_fn, u, steps: int):
    """The top Ritz vector of A^T A after `steps` Lanczos steps from u, normalised (A^T through jax.vjp; full
    reorthogonalisation, twice per step). Its Krylov space holds every power iterate of fewer than `steps`
    steps from u, so its Rayleigh quotient is at least theirs (in exact arithmetic), and it converges to the
    same sigma_max much sooner where the top singular values are close (Chebyshev rather than geometric).

    Args:
      linear_fn: v -> A v, linear, v of u's shape.
      u: the start vector (the stored power-iteration vector).
      steps: Lanczos steps (at most u.size are taken).
    Returns:
      the Ritz vector, u's shape: ||A y|| is the estimate of sigma_max(A).
    """
    shape, size = u.shape, u.size
    steps = min(steps, size)

    def gram(q):
        image, transpose = jax.vjp(linear_fn, q.reshape(shape))
        return transpose(image)[0].reshape(-1)

    start = u.reshape(-1)
    start = start / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(start))), 1e-12)
    basis = jnp.zeros((steps + 1, size), u.dtype).at[0].set(start)

    def step(k, carry):
        basis, alphas, betas = carry
        q = basis[k]
        w = gram(q)
        alpha = jnp.vdot(q, w)
        for _ in range(2):  # rows past k are zero: projecting on them changes nothing
            w = w - basis.T @ (basis @ w)
        beta = jnp.sqrt(jnp.sum(jnp.square(w)))
        # an invariant subspace reached (beta ~ 0): the next vectors stay zero and T decouples
        going = beta > 1e-6 * jnp.maximum(jnp.abs(alpha), 1e-30)
        basis = basis.at[k + 1].set(jnp.where(going, w / jnp.where(going, beta, 1.0), 0.0))
        return basis, alphas.at[k].set(alpha), betas.at[k].set(jnp.where(going, beta, 0.0))

    zeros = jnp.zeros((steps,), u.dtype)
    basis, alphas, betas = jax.lax.fori_loop(0, steps, step, (basis, zeros, zeros))
    tridiagonal = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
    _, vectors = jnp.linalg.eigh(tridiagonal)
    ritz = basis[:steps].T @ vectors[:, -1]
    return (ritz / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(ritz))), 1e-12)).reshape(shape)


def dirac_kernel(width: int, size: int = 3, dtype=jnp.float32):
    """The identity as a size x size HWIO kernel (torch.nn.init.dirac_)."""
    c = size // 2
    return jnp.zeros((size, size, width, width), dtype).at[c, c].set(jnp.eye(width, dtype=dtype))


def torch_uniform(fan_in: int):
    """PyTorch's default Linear / Conv2d initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


# ----------------------------------------------------------------------------------------------- layers


def lipschitz_layer(
    module: nn.Module,
    x,
    kernel,
    bias,
    linear,
    *,
    reuse: int,
    train: bool,
    iterations,
    certify: bool,
    estimate: bool = True,
):
    """Everything a LiResNet layer shares: the kernel as applied (cached at evaluation), the output, the
    power-iteration estimate of sigma_max, and the rounding allowance. Computes in x's dtype (float64 in the
    certifying forward). `reuse`: every input element is read by at most reuse^2 outputs per output channel.
    certify (required, so that no layer leaves the certifying forward's allowance out by default): the
    certifying forward. estimate=False (LiResNet++'s Cholesky-orthogonalised layers): no power-iteration
    vector, sigma taken as 1 in training as the original does; certificate_bounds measures the layer all the
    same.
    Returns (y, sigma_estimate, rounding) with rounding = (local error [B], guaranteed sigma) in the
    certifying forward (certify=True), else None."""
    if module.has_variable(FROZEN, "kernel"):
        kernel = module.get_variable(FROZEN, "kernel")
    elif module.is_mutable_collection(FROZEN) and not module.is_initializing():
        module.put_variable(FROZEN, "kernel", kernel)
    kernel, bias = kernel.astype(x.dtype), bias.astype(x.dtype)
    precision = None if train else _HIGHEST  # evaluation in full precision on GPUs too (no TF32)
    y = linear(x, kernel, precision, train) + bias

    shape = (1,) + x.shape[1:]
    if not estimate:
        sigma = jnp.ones((), x.dtype)
    elif module.is_initializing() or module.has_variable(POWER, "u"):
        u = module.variable(POWER, "u", lambda: jax.random.normal(module.make_rng("params"), shape))
        if train:
            fixed = jax.lax.stop_gradient(kernel)
            iterate = power_iteration(lambda v: linear(v, fixed, precision), u.value, iterations)
            if module.is_mutable_collection(POWER) and not module.is_initializing():
                u.value = iterate  # warm start for the next step
        else:
            iterate = u.value / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(u.value))), 1e-12)
        sigma = jnp.sqrt(jnp.sum(jnp.square(linear(iterate.astype(x.dtype), kernel, precision))))
    elif train:
        raise ValueError(f"{module.name}: training needs the {POWER!r} collection (power-iteration vectors)")
    else:
        sigma = jnp.full((), jnp.nan, x.dtype)  # evaluation without the vectors: no estimate
    if estimate and module.is_mutable_collection(ESTIMATES) and not module.is_initializing():
        module.sow(ESTIMATES, "sigma", sigma)

    rounding = None
    if certify and not module.is_initializing():
        if not module.has_variable(FROZEN, "sigma_bound"):
            raise ValueError("the rounding allowance needs the guaranteed bounds: certificate_bounds(...)")
        products = math.prod(kernel.shape[:-1])  # terms of every output's dot product
        frobenius = jnp.sqrt(jnp.sum(jnp.square(kernel)))
        unit = float(jnp.finfo(x.dtype).eps) / 2.0
        local = gamma(products, x.dtype) * frobenius * reuse * l2_norm_per_example(x)
        local = local + unit * l2_norm_per_example(y)
        # x 1.01: the allowance itself is computed with rounding (relative error ~1e-15 in float64)
        rounding = (1.01 * local, module.get_variable(FROZEN, "sigma_bound").astype(x.dtype))
    return y, sigma, rounding


class LipschitzConv(nn.Module):
    """Plain conv (stem, neck): PyTorch's conv geometry, orthogonal kernel init (the snapshot's Conv2d)."""

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    iterations: int = POWER_ITERATIONS

    @nn.compact
    def __call__(self, x, *, train: bool, certify: bool = False):
        k, cin = self.kernel_size, x.shape[-1]
        kernel = self.param("kernel", nn.initializers.orthogonal(), (k, k, cin, self.features))
        bias = self.param("bias", torch_uniform(cin * k * k), (self.features,))

        def linear(v, w, precision, fast_gradient=False):
            return conv(v, w, self.stride, self.padding, precision, fast_gradient)

        reuse = -(-k // self.stride)
        return lipschitz_layer(
            self,
            x,
            kernel,
            bias,
            linear,
            reuse=reuse,
            train=train,
            iterations=self.iterations,
            certify=certify,
        )


def pairwise_distances(rows):
    """||r_i - r_j|| [C, C], 0 on the diagonal with a zero (not NaN) gradient there."""
    squared = jnp.sum(jnp.square(rows[:, None, :] - rows[None, :, :]), axis=-1)
    eye = jnp.eye(rows.shape[0], dtype=bool)
    return jnp.where(eye, 0.0, jnp.sqrt(jnp.where(eye, 1.0, squared)))


def certified_features(module: nn.Module, h, error):
    """The certifying forward's float64 body output h -> float32 features for the float32 LLN head; sows the
    rounding allowance: the body's accumulated error bound `error` + rounding the features to float32 + the
    head's float32 matmul (worst case, unit rows), on top of what NormalizedLinear sows itself."""
    error = error + (FLOAT32_UNIT_ROUNDOFF + 1.01 * gamma(h.shape[-1], jnp.float32)) * l2_norm_per_example(h)
    sow_l2_rounding_error(module, round_up_to_float32_traced(error), certify=True)
    return h.astype(jnp.float32)


_COMPILED: dict = {}  # (model, input shape, iterations) -> jitted computation: compiled once per run


def lanczos_estimates(model, input_shape, maps: dict, steps: int) -> dict[str, float]:
    """Per-layer sigma_max estimates by `steps` Lanczos steps (lanczos_iterate) from the stored vectors.

    Args:
      model: the model (with input_shape and steps, the key of the compiled computation).
      input_shape: the image batch shape.
      maps: layer name -> (linear(v, kernel), kernel as applied, stored power-iteration vector u), for every
        layer with a vector.
      steps: Lanczos steps per layer.
    Returns:
      name -> ||A y|| for the Ritz vector y (float32, as training's power iteration computes it).
    """
    key = ("lanczos", repr(model), tuple(input_shape), steps)
    if key not in _COMPILED:
        linears = {name: linear for name, (linear, _, _) in maps.items()}

        @jax.jit
        def compute(kernels, vectors):
            sigmas = {}
            for name, linear in linears.items():
                kernel = kernels[name]
                ritz = lanczos_iterate(lambda v, k=kernel, f=linear: f(v, k), vectors[name], steps)
                sigmas[name] = jnp.sqrt(jnp.sum(jnp.square(linear(ritz, kernel))))
            return sigmas

        _COMPILED[key] = compute
    kernels = {name: jnp.asarray(kernel, jnp.float32) for name, (_, kernel, _) in maps.items()}
    vectors = {name: jnp.asarray(u, jnp.float32) for name, (_, _, u) in maps.items()}
    return {name: float(value) for name, value in _COMPILED[key](kernels, vectors).items()}


def linear_maps(geometry: dict, frozen, vectors) -> dict:
    """name -> (linear(v, kernel), kernel as applied, stored vector) of every layer of `geometry` (name ->
    (kernel size, stride, padding, ...) of a conv, None of a dense layer) with a power-iteration vector."""
    maps = {}
    for name, shape in geometry.items():
        if name not in vectors:
            continue
        if shape is None:
            linear = dense
        else:
            linear = lambda v, kernel, s=shape[1], p=shape[2]: conv(v, kernel, s, p)  # noqa: E731
        maps[name] = (linear, frozen[name]["kernel"], vectors[name]["u"])
    return maps


def assumed_estimates(model, variables, input_shape, maps: dict) -> dict[str, float]:
    """The assumed figure's per-layer estimates by model.assumed_estimator (ASSUMED_ESTIMATORS): "power",
    the original's model.eval_iterations warm-started power iterations, or "lanczos",
    model.eval_lanczos_steps Lanczos steps from the same vectors (maps: as lanczos_estimates takes them)."""
    return ASSUMED_ESTIMATORS[model.assumed_estimator](model, variables, input_shape, maps)


ASSUMED_ESTIMATORS = {
    "lanczos": lambda model, variables, shape, maps: lanczos_estimates(
        model, shape, maps, model.eval_lanczos_steps
    ),
    "power": lambda model, variables, shape, maps: power_estimates(
        model, variables, shape, model.eval_iterations
    ),
}
DEFAULT_ASSUMED_ESTIMATOR = "power"  # a saved config without model.assumed_estimator (8811d5e's records)


def power_estimates(model, variables, input_shape, iterations: int) -> dict[str, float]:
    """Per-layer power-iteration estimates after `iterations` more warm-started steps (0: the stored
    vectors as the last training step left them)."""
    key = ("power", repr(model), input_shape, iterations)
    if key not in _COMPILED:
        probe = model.clone(iterations=iterations)

        @jax.jit
        def compute(variables):
            dummy = jnp.zeros(input_shape, jnp.float32)
            _, state = probe.apply(variables, dummy, train=True, mutable=[POWER, ESTIMATES])
            return state[ESTIMATES]

        _COMPILED[key] = compute
    estimates = _COMPILED[key](variables)
    return {name: float(np.asarray(value["sigma"][0])) for name, value in estimates.items()}
