"""LiResNet++ with CHORD layers (Hu et al., "A Recipe for Improved Certifiable Robustness", ICLR 2024; code
hukkai/liresnet at HEAD: models/model.py GloroNet, models/blocks.py LiResConv / LiResMLP, models/model.py
Map2Vec, models/cholesky_grad.py). Threat model l_2, eps 36/255.

Network (input x - 0.5: the data config gives mean 0.5, std 1, as model.py GloroNet.forward `x.sub(.5)`):
- stem: conv 3 -> W, 5x5, stride 2, padding 2, orthogonal init, bias, then MinMax (model.py build_stem; the
  same layer as LiResNet's, `liresnet.LipschitzConv`);
- D centred residual blocks (blocks.py LiResConv): one 3x3 conv with the merged kernel Dirac(I) + V gamma /
  sqrt(D) (V ~ N(0, 1) / (9 W), gamma per output channel, init 1, bias 0). In training the residual branch
  conv_V(x) is centred by its per-channel batch mean over (batch, height, width), x <- MinMax(x + conv_V(x) -
  mean + bias); the mean stays in the graph (the original subtracts the undetached mean and detaches only the
  copy it stores) and a detached copy updates a running mean, running += 0.1 (mean - running). At evaluation
  the block is conv_{I + V gamma / sqrt(D)}(x) + (bias - running mean): a constant shift, so the layer's
  Lipschitz constant is the merged conv's spectral norm, centred or not;
- neck (model.py Map2Vec): a 4x4 stride-4 conv W -> W without bias or activation, flatten, a dense layer to
  2048 with bias, then MinMax; both weights are Cholesky-orthogonalised row-wise
  (certjax/models/common/cholesky.py) from inits N(0, 1) / (4 sqrt(W)) and N(0, 1) / sqrt(16 W);
- CHORD MLP (blocks.py LiResMLP): 8 dense layers 2048 x 2048, W = I + V gamma / sqrt(8) (V ~ N(0, 1) / 2048,
  gamma per output row, init 1, bias 0), each Cholesky-orthogonalised, each followed by MinMax;
- head: LLN, rows normalised to unit l_2 norm (model.py `head` with use_lln; `NormalizedLinear`).
Parameter layouts differ from the original's only by permutations of weight columns (the conv's (in, 4, 4)
patch order, NHWC flattening); the orthogonalisation is row-wise, so it is unaffected.

Training-time K (model.py sub_lipschitz): the product of power-iteration estimates of the stem and every
block (10 warm-started iterations per step, liresnet's `lipschitz_layer`; the original starts from a vector
of ones, certjax from a random one); the Cholesky layers count as 1 (Map2Vec / LiResMLP `lipschitz` return 1
in training). The margin bound of the EMMA losses is K ||w_i - w_j|| with the normalised head rows.

Evaluation (`certificate_bounds`) uses guaranteed bounds only, in float64 numpy, of every layer AS APPLIED:
the FFT/SVD bound of every conv (`certjax.certify.norms.conv_norm_bound`: stem and blocks; the 4x4/4 neck
conv reads disjoint patches and its bound is the exact SVD of its patch matrix), and the exact SVD of every
Cholesky-orthogonalised dense weight (certify.bound_method "exact"; "fast": the same operators bounded by
the Cholesky certificates of certjax/certify/spectral.py): in float32 they are not exactly 1 (never
assumed). The orthogonalised and merged weights are computed once and frozen in the "liresnet_frozen"
collection, so evaluation applies exactly the arrays that were bounded. The running-mean shift is part of
the bias (no Lipschitz effect). The certifying forward runs the body in float64 with liresnet's per-layer
rounding allowance. The "assumed" bound is the
original's evaluation (model.py sub_lipschitz in eval mode): 500 power iterations for stem and blocks times
the Cholesky layers' SVDs; model.assumed_estimator "lanczos" (the config's default) replaces the 500
iterations by 24 Lanczos steps from the same vectors (the same limit, 20x cheaper; liresnet.py's docstring).
"""

from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from certjax.certify import spectral
from certjax.certify.margins import pair_lipschitz_matrix
from certjax.certify.norms import pairwise_row_distances
from certjax.certify.rounding import round_up_float32_array
from certjax.models import Family
from certjax.models.common.chord import (
    MOMENTUM,
    NECK_PATCH,
    STATS,
    chord_forward,
)
from certjax.models.common.layers import (
    computed_collection,
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
    assumed_estimates,
    conv,
    dirac_kernel,
    linear_maps,
    lipschitz_layer,
    power_estimates,
)


class CentredResidualConv(nn.Module):
    """blocks.py LiResConv, one block: merged 3x3 kernel I + V gamma / sqrt(depth), centred in training."""

    features: int
    depth: int
    iterations: int = POWER_ITERATIONS
    momentum: float = MOMENTUM

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
        gamma = self.param("gamma", nn.initializers.ones, (width,))  # per output channel
        bias = self.param("bias", nn.initializers.zeros, (width,))
        running_mean = self.variable(STATS, "mean", lambda: jnp.zeros((width,), jnp.float32))
        kernel = dirac_kernel(width) + weight * gamma * (self.depth**-0.5)

        def linear(v, w, precision, fast_gradient=False):
            return conv(v, w, 1, 1, precision, fast_gradient)

        if not train:  # blocks.py: biases = bias - running_mean, one conv with the merged kernel
            shift = bias - running_mean.value
            return lipschitz_layer(
                self,
                x,
                kernel,
                shift,
                linear,
                reuse=3,
                train=False,
                iterations=self.iterations,
                certify=certify,
            )
        y, sigma, rounding = lipschitz_layer(  # training: never the certifying forward
            self, x, kernel, bias, linear, reuse=3, train=True, iterations=self.iterations, certify=False
        )
        # the residual branch conv_V(x) = conv_{I + V}(x) - x: its per-channel mean over batch and space
        batch_mean = jnp.mean(y - x, axis=(0, 1, 2)) - bias
        if self.is_mutable_collection("batch_means") and not self.is_initializing():
            self.sow("batch_means", "mean", jax.lax.stop_gradient(batch_mean))
        if self.is_mutable_collection(STATS) and not self.is_initializing():
            running_mean.value = running_mean.value + self.momentum * (
                jax.lax.stop_gradient(batch_mean) - running_mean.value
            )
        return y - batch_mean, sigma, rounding


class LiResNetPP(nn.Module):
    """Stem, `depth` centred residual blocks, Cholesky neck, CHORD MLP, LLN head (model.py GloroNet).

    apply(...) -> (logits, pair_bound) with pair_bound[i, j] = K ||w_i - w_j|| (w the normalised head rows, K
    the product of the stem's and the blocks' power-iteration estimates; Cholesky layers 1 in training)."""

    depth: int = 12
    width: int = 512
    num_classes: int = 10
    neck_features: int = 2048
    mlp_depth: int = 8
    iterations: int = POWER_ITERATIONS
    eval_iterations: int = EVAL_POWER_ITERATIONS  # certificate_bounds: the original's 500 before evaluation
    assumed_estimator: str = DEFAULT_ASSUMED_ESTIMATOR  # the assumed figure: "lanczos" or "power" (above)
    eval_lanczos_steps: int = EVAL_LANCZOS_STEPS

    @nn.compact
    def __call__(
        self, x, p=None, *, train: bool = False, return_features: bool = False, dropout=None, certify=False
    ):
        """A ModelOutput (logits, pair_bound), or the features with return_features. certify: the certifying
        forward (certjax.models.certified_logits): the body in float64 with its rounding bound."""
        del p, dropout  # no l_p phase, no dropout (Trainer.recalibrate passes dropout=False)
        if x.shape[1] != x.shape[2] or x.shape[1] % 8:
            raise ValueError(f"LiResNet++ needs square inputs with a side divisible by 8, got {x.shape}")
        body = [
            CentredResidualConv(self.width, self.depth, self.iterations, name=f"block{i + 1}")
            for i in range(self.depth)
        ]
        return chord_forward(self, body, x, train=train, return_features=return_features, certify=certify)


def build(model_config, num_classes: int) -> nn.Module:
    """The LiResNetPP of `config.model` (depth, width, neck_features, mlp_depth, power_iterations, ...)."""
    return LiResNetPP(
        depth=model_config.depth,
        width=model_config.width,
        num_classes=num_classes,
        neck_features=model_config.get("neck_features", 2048),
        mlp_depth=model_config.get("mlp_depth", 8),
        iterations=model_config.get("power_iterations", POWER_ITERATIONS),
        eval_iterations=model_config.get("eval_power_iterations", EVAL_POWER_ITERATIONS),
        assumed_estimator=model_config.get("assumed_estimator", DEFAULT_ASSUMED_ESTIMATOR),
        eval_lanczos_steps=model_config.get("eval_lanczos_steps", EVAL_LANCZOS_STEPS),
    )


def recalibrates_statistics(model_config) -> bool:
    """The original keeps momentum-0.1 running means and evaluates with them (no recalibration); the option
    replaces them by the exact average of batch means over one pass of the training batches before each
    evaluation (Trainer.recalibrate), as SortNet does."""
    return bool(model_config.get("recalibrate_statistics", False))


# ------------------------------------------------------------------------------------------- certification


def layer_geometry(model: LiResNetPP, input_side: int) -> dict[str, tuple[int, int, int, int] | None]:
    """name -> (kernel size, stride, padding, input side) of every conv, None for dense layers, in order."""
    side = input_side // 2  # after the stem
    geometry = {"stem": (5, 2, 2, input_side)}
    geometry.update({f"block{i + 1}": (3, 1, 1, side) for i in range(model.depth)})
    geometry["neck_conv"] = (NECK_PATCH, NECK_PATCH, 0, side)
    geometry["neck_linear"] = None
    geometry.update({f"mlp{i + 1}": None for i in range(model.mlp_depth)})
    return geometry


def certificate_bounds(
    model: LiResNetPP, variables, image_shape, *, bound_method: str = "exact", assumed: bool = True
) -> dict:
    """Guaranteed and assumed margin bounds of a checkpoint (the fields and arguments of
    liresnet.certificate_bounds).

    Returns variables ({"liresnet_frozen": weights as applied + guaranteed sigmas}), pair_lipschitz [C, C]
    (guaranteed: the product of every layer's float64 FFT/SVD bound times ||w_p - w_i|| of the normalised
    head rows, float32 rounded up), assumed_pair_lipschitz (the estimates of stem and blocks by
    model.assumed_estimator: the original's 500 warm-started power iterations or Lanczos from the same
    vectors, times the Cholesky layers' SVDs), input_error_gain (= the guaranteed K)
    and a report with every layer's figures and how far the Cholesky layers are from the 1 training assumes.
    """
    variables = {name: value for name, value in variables.items() if name not in (FROZEN, ESTIMATES)}
    input_shape = tuple(image_shape)  # (1, H, W, C): the dataset's images
    if POWER not in variables or STATS not in variables:
        raise ValueError(
            f"certificate_bounds needs the {POWER!r} and {STATS!r} collections of the checkpoint"
        )
    frozen = flax.core.unfreeze(computed_collection(model, variables, input_shape, FROZEN))
    method, sigmas, cholesky = spectral.bound_method(bound_method), {}, {}
    for name, geometry in layer_geometry(model, input_shape[1]).items():
        kernel = np.asarray(frozen[name]["kernel"], np.float64)
        if geometry is None:
            sigma = method.dense(kernel)
        else:
            k, stride, padding, side = geometry
            sigma = method.conv(kernel, stride, padding, side)
        if name == "neck_conv" or geometry is None:
            cholesky[name] = sigma  # exact for these (disjoint patches / a matrix)
        sigmas[name] = sigma * BOUND_SAFETY
        frozen[name]["sigma_bound"] = jnp.asarray(round_up_float32_array(sigmas[name]))
    guaranteed = float(np.prod(list(sigmas.values())))
    stored = power_estimates(model, variables, input_shape, 0)
    maps = linear_maps(layer_geometry(model, input_shape[1]), frozen, variables[POWER])
    converged = assumed_estimates(model, variables, input_shape, maps) if assumed else {}
    cholesky_product = float(np.prod(list(cholesky.values())))
    power = float(np.prod(list(converged.values()))) * cholesky_product if assumed else float("nan")

    # as liresnet.certificate_bounds: rows normalised in float32 may differ by a few ulps from the forward's
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
            # training's K: the stored power-iteration vectors, the Cholesky layers taken as 1
            "lipschitz_body_training_estimate": float(np.prod(list(stored.values()))),
            "layer_sigma_bound": sigmas,
            "layer_sigma_power": converged,
            "cholesky_sigma_max": cholesky,
            "cholesky_largest_excess_over_1": max(cholesky.values()) - 1.0,
            "eval_power_iterations": model.eval_iterations,
            "assumed_estimator": model.assumed_estimator,
            "eval_lanczos_steps": model.eval_lanczos_steps,
        },
    }


FAMILY = Family(
    name="liresnet_pp",
    threat_model="l2",
    build=build,
    certificate_bounds=certificate_bounds,
    recalibrates_statistics=recalibrates_statistics,
)
