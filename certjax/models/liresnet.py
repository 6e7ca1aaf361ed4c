"""LiResNet, the GloroNet of the seed paper (Hu et al., "Unlocking Deterministic Robustness Certification on
ImageNet", NeurIPS'23; the snapshot `snapshots/hu23_snapshot.zip` of klasleino/gloro, shared/RECIPES.md
"GloroNet = LiResNet"). Threat model l_2, eps 36/255.

Network (input x - 0.5, which the data config gives with mean 0.5 and std 1): stem conv 3 -> W (5x5, stride 2,
padding 2, orthogonal init) + MinMax; D linear residual blocks, each ONE 3x3 conv with the merged kernel
Dirac(I) + V * a / sqrt(D) (V ~ N(0, 1) / (9 W), a per output channel, init 1; bias 0) + MinMax; neck conv
W -> 2W (4x4, stride 4) + MinMax, flatten, linear -> 512 + MinMax; head: rows normalised to unit l_2 norm
("LLN", `NormalizedLinear`). No normalisation layers. MinMax is 1-Lipschitz, so the body is
K = prod_l sigma_max(layer l)-Lipschitz and the margin z_p - z_i is K ||w_p - w_i||-Lipschitz.

Training-time K: power iteration per layer on A^T A (A^T by `jax.vjp`) from a persistent start vector of the
layer's true input shape, kept in the "power_iteration" collection and warm-started every step, 10 iterations
per step (models/layers/conv.py `lipschitz` of the snapshot). The estimate is sigma = ||A u|| with u the
normalised iterate: always <= sigma_max, increasing towards it. Gradients flow into sigma through A (the
kernel), not through the iterations (stop_gradient); the snapshot also differentiates through its 10
iterations, but once u has converged the two gradients agree (d||Au|| = v^T dA u with v = Au/||Au||, and the
change of u is orthogonal to u, which is then a fixed point), and warm starting keeps u converged.

Evaluation-time K must be an upper bound (shared/DESIGN.md, "Certification"); power iteration is a lower
bound. `certificate_bounds` computes, in float64 numpy, for every layer as applied:
- convolutions: a strided conv with zero padding is first rewritten as a stride-1 conv on the space-to-depth
  input (input pixel s*i + a - p = s*(i + q) + r with q = (a - p) // s, r = (a - p) % s: the s x s phases r
  become channels, the kernel taps regroup by q). Space-to-depth is a permutation (an isometry), so the
  operator norm is unchanged. The stride-1 conv on an n x n input, read at offsets q_min..q_max, equals
  crop o (circular conv on an N x N torus) o zero-embedding whenever N >= max(n_in - q_min, n_out + q_max)
  (no read wraps onto the embedded input). Embedding and crop have norm <= 1, and the circular conv's norm
  is the largest singular value over the frequency blocks of its FFT (exact SVD per frequency, rfft2: a real
  kernel's spectrum is Hermitian-symmetric). So max_f sigma_max(K(f)) bounds the layer; the tests show it
  within ~1 % of the dense operator norm on 16 x 16 grids. A layer reading one disjoint patch per output
  (the 4x4/4 neck conv: q_min = q_max = 0) is block diagonal: its norm is exactly sigma_max of the patch
  matrix.
- linear layers: exact SVD.
Each is multiplied by BOUND_SAFETY (float64 FFT/SVD backward errors are ~1e-15; float32 kernels are exact
in float64), and the merged kernels are computed once and passed in the "liresnet_frozen" collection, so the
forward applies exactly the arrays that were bounded. The estimated K is reported next to it as the assumed
bound: the snapshot's evaluation runs 500 power iterations from the stored vectors ("let the power method
converge"); model.assumed_estimator "lanczos" (the configs' default) reaches the same limit by 24 Lanczos
steps from the same vectors, at least as high as the power iteration after as many steps (lipschitz.py
lanczos_iterate), 20x cheaper; "power" is the snapshot's own procedure.

Rounding at evaluation. Certificates are for the network in exact arithmetic. With the layer bounds above
a rounding error e of layer l's output grows to at most e prod_{m > l} sigma_m at the features (MinMax is
1-Lipschitz and exact), and a worst-case float32 bound, gamma_m sum_i |k_i x_i| with gamma_m = m u / (1 - m u)
for a length-m dot product (Higham, Thm. 3.1: any summation order, with or without FMA), times that product
(~100 for a trained net) would take a visible share of the margins. So the certifying forward (`certify=True`,
certjax.models.certified_logits) runs the body in float64 (`jax.enable_x64` inside the trace; the kernels
are float32 values, exact in float64), where the same worst-case bound is ~1e-9 of the features: per layer
gamma_m ||K||_F r ||x|| + u ||y|| (Cauchy-Schwarz per output; every input pixel is read by at most r^2 =
ceil(k / s)^2 output positions; u ||y|| for the bias addition), accumulated as E = sum_l local_l
prod_{m > l} sigma_m with the guaranteed sigmas. The features are then rounded to float32 (error <= 2^-24
per element) and the head runs in float32 (NormalizedLinear sows its allowance; this module adds the
worst-case gamma_512 ||h|| of its matmul, rows having unit norm). A margin then moves by at most
||w_p - w_i|| E' <= 2 E', which the certifier's 2 * logit_error covers. Training and attacks use the float32
forward. Checked against a float64 numpy forward in tests/test_liresnet.py.
"""

from __future__ import annotations

import contextlib

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from certjax.certify import spectral
from certjax.certify.margins import pair_lipschitz_matrix
from certjax.certify.norms import pairwise_row_distances
from certjax.certify.rounding import round_up_float32_array
from certjax.models import Family, ModelOutput
from certjax.models.common.layers import (
    NormalizedLinear,
    check_certifying,
    computed_collection,
    max_min,
    normalized_rows,
)
from certjax.models.common.lipschitz import (
    BOUND_SAFETY,
    DEFAULT_ASSUMED_ESTIMATOR,
    ESTIMATES,
    EVAL_LANCZOS_STEPS,
    EVAL_POWER_ITERATIONS,
    FROZEN,
    POWER,
    POWER_ITERATIONS,
    LipschitzConv,
    assumed_estimates,
    certified_features,
    conv,
    dense,
    dirac_kernel,
    linear_maps,
    lipschitz_layer,
    pairwise_distances,
    power_estimates,
    torch_uniform,
)

SIZES = {"XS": (6, 128), "S": (12, 128), "M": (18, 128), "L": (18, 256)}  # (depth, width): LiResNet LxWy


class LinearResidualConv(nn.Module):
    """LiResNet block (blocks.py LinearRes): one 3x3 conv, kernel Dirac + V * a / sqrt(depth), bias 0."""

    features: int
    depth: int
    iterations: int = POWER_ITERATIONS

    @nn.compact
    def __call__(self, x, *, train: bool, certify: bool = False):
        width = self.features
        if x.shape[-1] != width:
            raise ValueError(f"a residual block needs {width} input channels, got {x.shape[-1]}")
        weight = self.param(
            "weight",
            lambda key, shape: jax.random.normal(key, shape, jnp.float32) / (9 * width),
            (3, 3, width, width),
        )
        affine = self.param("affine", nn.initializers.ones, (width,))  # per output channel
        bias = self.param("bias", nn.initializers.zeros, (width,))
        kernel = dirac_kernel(width) + weight * affine * (self.depth**-0.5)

        def linear(v, w, precision, fast_gradient=False):
            return conv(v, w, 1, 1, precision, fast_gradient)

        return lipschitz_layer(
            self, x, kernel, bias, linear, reuse=3, train=train, iterations=self.iterations, certify=certify
        )


class LipschitzDense(nn.Module):
    features: int
    iterations: int = POWER_ITERATIONS

    @nn.compact
    def __call__(self, x, *, train: bool, certify: bool = False):
        fan_in = x.shape[-1]
        kernel = self.param("kernel", torch_uniform(fan_in), (fan_in, self.features))
        bias = self.param("bias", torch_uniform(fan_in), (self.features,))
        return lipschitz_layer(
            self, x, kernel, bias, dense, reuse=1, train=train, iterations=self.iterations, certify=certify
        )


class LiResNet(nn.Module):
    """Stem, `depth` linear residual blocks, neck, LLN head (model.py GloroNet, arch linear_res).

    apply(...) -> (logits, pair_bound) with pair_bound[i, j] = K ||w_i - w_j|| (w the normalised head rows,
    K the product of the power-iteration estimates): the margin Lipschitz bounds the EMMA / GloRo losses use.
    """

    depth: int = 6
    width: int = 128
    num_classes: int = 10
    neck_features: int = 512
    iterations: int = POWER_ITERATIONS
    eval_iterations: int = EVAL_POWER_ITERATIONS  # certificate_bounds: the snapshot's 500 before evaluation
    assumed_estimator: str = DEFAULT_ASSUMED_ESTIMATOR  # the assumed figure: "lanczos" or "power" (above)
    eval_lanczos_steps: int = EVAL_LANCZOS_STEPS

    @nn.compact
    def __call__(self, x, p=None, *, train: bool = False, return_features: bool = False, certify=False):
        """A ModelOutput (logits, pair_bound), or the features with return_features. certify: the certifying
        forward (certjax.models.certified_logits): the body in float64 with its rounding bound."""
        del p  # no l_p phase
        if x.shape[1] != x.shape[2] or x.shape[1] % 8:
            raise ValueError(f"LiResNet needs square inputs with a side divisible by 8, got {x.shape}")
        layers = [LipschitzConv(self.width, 5, 2, 2, self.iterations, name="stem")]
        layers += [
            LinearResidualConv(self.width, self.depth, self.iterations, name=f"block{i + 1}")
            for i in range(self.depth)
        ]
        layers += [
            LipschitzConv(2 * self.width, 4, 4, 0, self.iterations, name="neck_conv"),
            LipschitzDense(self.neck_features, self.iterations, name="neck_linear"),
        ]
        certifying = check_certifying(self, certify)
        with jax.enable_x64(True) if certifying else contextlib.nullcontext():
            h = jnp.asarray(x, jnp.float64) if certifying else jnp.asarray(x)  # numpy float64 -> float32
            lipschitz, error = 1.0, None
            for layer in layers:
                if isinstance(layer, LipschitzDense):
                    h = h.reshape(h.shape[0], -1)
                h, sigma, rounding = layer(h, train=train, certify=certifying)
                h = max_min(h)
                lipschitz = lipschitz * sigma
                if rounding is not None:
                    local, sigma_bound = rounding
                    error = local if error is None else sigma_bound * error + local
            if certifying:
                h = certified_features(self, h, error)
                lipschitz = lipschitz.astype(jnp.float32)
        if return_features:
            return h
        head = NormalizedLinear(self.num_classes, name="head")
        logits = head(h, certify=certifying)
        rows = normalized_rows(head.variables["params"]["kernel"])
        return ModelOutput(logits, pair_bound=lipschitz * pairwise_distances(rows))


def build(model_config, num_classes: int) -> nn.Module:
    """The LiResNet of `config.model` (depth, width, neck_features, power_iterations, ...)."""
    return LiResNet(
        depth=model_config.depth,
        width=model_config.width,
        num_classes=num_classes,
        neck_features=model_config.get("neck_features", 512),
        iterations=model_config.get("power_iterations", POWER_ITERATIONS),
        eval_iterations=model_config.get("eval_power_iterations", EVAL_POWER_ITERATIONS),
        assumed_estimator=model_config.get("assumed_estimator", DEFAULT_ASSUMED_ESTIMATOR),
        eval_lanczos_steps=model_config.get("eval_lanczos_steps", EVAL_LANCZOS_STEPS),
    )


# ------------------------------------------------------------------------------------------- certification


def layer_geometry(model: LiResNet) -> dict[str, tuple[int, int, int] | None]:
    """name -> (kernel size, stride, padding) of every conv, None for the linear layer, in forward order."""
    geometry = {"stem": (5, 2, 2)}
    geometry.update({f"block{i + 1}": (3, 1, 1) for i in range(model.depth)})
    geometry.update({"neck_conv": (4, 4, 0), "neck_linear": None})
    return geometry


def certificate_bounds(
    model: LiResNet, variables, image_shape, *, bound_method: str = "exact", assumed: bool = True
) -> dict:
    """Guaranteed and power-iteration margin bounds of a checkpoint.

    image_shape: the batch shape (1, H, W, C) of the dataset's images. bound_method: how every layer is
    bounded (certjax.certify.spectral.BOUND_METHODS). assumed=False skips the estimates (power or Lanczos)
    of the assumed figure (assumed_pair_lipschitz None): the evaluations during training do not report it.

    Returns variables ({"liresnet_frozen": kernels as applied + guaranteed sigmas}), pair_lipschitz [C, C]
    (guaranteed: prod of the layers' FFT/SVD bounds times ||w_p - w_i|| of the normalised head rows as
    applied, float32 rounded up), assumed_pair_lipschitz (the same with the estimated K:
    model.assumed_estimator, `model.eval_iterations` (500) warm-started power iterations as the snapshot's
    evaluation or `model.eval_lanczos_steps` Lanczos steps from the same vectors), input_error_gain (= the
    guaranteed K: how much an error of the normalised input can move the features) and a report.
    """
    variables = {name: value for name, value in variables.items() if name not in (FROZEN, ESTIMATES)}
    input_shape = tuple(image_shape)
    frozen = flax.core.unfreeze(computed_collection(model, variables, input_shape, FROZEN))
    vectors = variables.get(POWER)
    if vectors is None:
        raise ValueError(f"certificate_bounds needs the {POWER!r} collection of the checkpoint")
    method, sigmas = spectral.bound_method(bound_method), {}
    for name, geometry in layer_geometry(model).items():
        kernel = np.asarray(frozen[name]["kernel"], np.float64)
        if geometry is None:
            sigma = method.dense(kernel)
        else:
            k, stride, padding = geometry
            sigma = method.conv(kernel, stride, padding, int(vectors[name]["u"].shape[1]))
        sigmas[name] = sigma * BOUND_SAFETY
        frozen[name]["sigma_bound"] = jnp.asarray(round_up_float32_array(sigmas[name]))
    guaranteed = float(np.prod(list(sigmas.values())))
    stored = power_estimates(model, variables, input_shape, 0)
    maps = linear_maps(layer_geometry(model), frozen, vectors)
    converged = assumed_estimates(model, variables, input_shape, maps) if assumed else {}
    power = float(np.prod(list(converged.values()))) if assumed else float("nan")

    # The head normalises its rows in float32 inside the jitted forward; the rows computed here may differ in
    # the last bits (fusion order), by < 8 ulps of a unit row: + 1e-6 covers it.
    rows = np.asarray(normalized_rows(jnp.asarray(variables["params"]["head"]["kernel"])), np.float64)
    distances = pairwise_row_distances(rows) * (1.0 + 1e-9) + 1e-6
    return {
        "variables": {FROZEN: frozen},
        "pair_lipschitz": pair_lipschitz_matrix(guaranteed * distances),
        "assumed_pair_lipschitz": pair_lipschitz_matrix(power * distances) if assumed else None,
        "input_error_gain": float(round_up_float32_array(guaranteed)),
        "report": {
            "bound_method": bound_method,
            "lipschitz_body_measured": guaranteed,
            "lipschitz_body_assumed": power,
            "lipschitz_body_training_estimate": float(np.prod(list(stored.values()))),
            "layer_sigma_bound": sigmas,
            "layer_sigma_power": converged,
            "eval_power_iterations": model.eval_iterations,
            "assumed_estimator": model.assumed_estimator,
            "eval_lanczos_steps": model.eval_lanczos_steps,
        },
    }


FAMILY = Family(name="liresnet", threat_model="l2", build=build, certificate_bounds=certificate_bounds)
