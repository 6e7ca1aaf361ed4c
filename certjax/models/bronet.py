"""BRONet (Lai et al., "Enhancing Certified Robustness via Block Reflector Orthogonal Layers and Logit
Annealing Loss", ICML 2025; code ntuaislab/BRONet at 9d59c9b, bronet/: a fork of hukkai/liresnet). Threat
model l_2, eps 36/255. Notes on the original, with file and line of every fact: the issue's research notes.

Network ("BRONet-L", model.py with configs/cifar10.yaml; input x - 0.5):
- stem: conv 3 -> W, 5x5, stride 2, padding 2, orthogonal init, bias, MinMax (stem.py; LiResNet++'s stem,
  `lipschitz.LipschitzConv`, power iteration 10 per step, warm-started);
- D BRO layers of width W (backbone.py LiResConvOrtho, mode "bro"), each followed by MinMax. A layer's
  kernel is V = E + gamma U / sqrt(D) [3, 3, W, R] (R = int(W x rank_ratio), 256 of 512; E the identity of
  the first R channels at the centre tap, U ~ N(0, 1) / (9 W), gamma per output channel, init 1). On the
  (H + 2) x (H + 2) grid of the zero-padded input, per rfft2 frequency f:
      W(f) = I - 2 V(f) (V(f)^H V(f) + d I)^{-1} V(f)^H,  d = 1e-7 mean diag(V(f)^H V(f)) (not detached),
  with V(f) the rfft2 of V zero-filled to the grid (backbone.py:242; the "ortho" scaling cancels in W).
  The layer is crop(irfft2(W(f) rfft2(pad x))): in training applied as X - 2 V [(V^H V + d I)^{-1} (V^H X)]
  by a linear solve, never forming W or an inverse; in evaluation W(f) is computed once per checkpoint
  (the FROZEN collection) and applied as cached. Training centres the output by its per-channel batch mean
  (with gradient; a detached copy updates a running mean, momentum 0.1) and adds a bias; evaluation adds
  bias - running mean (a constant shift). W(f) has eigenvalues (d - s^2) / (d + s^2) for the singular values
  s of V(f) and 1 elsewhere: a contraction in exact arithmetic, never exactly orthogonal for d > 0;
- neck and CHORD MLP exactly as LiResNet++'s (`models/common/chord.py`): 4x4/4 Cholesky conv W -> W, dense
  16 W -> 2048 + MinMax, 8 CHORD layers 2048 + MinMax; LLN head. 68,788,234 parameters for CIFAR-10 (the
  recipe's 68.8 M; tests/test_bronet.py counts them).

Training K (model.py sub_lipschitz in training): the stem's power-iteration estimate only; every BRO and
Cholesky layer counts as 1. The loss is the logit-annealing loss on EMMA logits (certjax.losses.la).

Certification (`certificate_bounds`), every layer measured as applied, never assumed:
- each BRO layer: max_f sigma_max(W(f)) over the cached matrices by the guaranteed stack method of
  certify.bound_method (exact SVDs or Cholesky certificates). This bounds the layer: the c2r inverse is the
  real part of the full inverse DFT of the block-diagonal product (certjax/models/common/lot_certify.py), so
  its norm is at most the largest block's, even where rounding leaves W(f) and W(-f) not exactly conjugate;
- the stem: the FFT/SVD (or fast) bound of its conv; neck and MLP as LiResNet++'s.
The certifying forward runs in float64: the stem, neck and MLP with liresnet's per-layer rounding allowance,
each BRO layer with LOT's proven allowance for explicit DFT stages (`lot_certify.lot_layer`, the same
pad -> rfft2 -> W(f) -> c2r -> crop operator). The assumed figure is the original's: the stem's estimate
(model.assumed_estimator, as LiResNet's) times the Cholesky layers' SVDs, every BRO layer taken as 1.
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
    linear_maps,
    power_estimates,
)
from certjax.models.common.lot_certify import lot_layer
from certjax.models.common.solve import solve

REGULARISER = 1e-7  # backbone.py:287: d = 1e-7 mean diag(V^H V) per frequency, not detached
RANK_RATIO = 0.5  # configs/cifar10.yaml: rank = int(width x 0.5)


# --------------------------------------------------------------------------------------------- BRO layer


def kernel_spectrum(kernel, grid: int):
    """V(f) [grid, grid // 2 + 1, W, R]: the rfft2 ("ortho") of the [3, 3, W, R] kernel zero-filled to a
    grid x grid array at its top-left corner (torch.fft.rfft2(V, s=(n, n)))."""
    return jnp.fft.rfft2(kernel, s=(grid, grid), axes=(0, 1), norm="ortho")


def regularised_gram(spectrum):
    """V^H V + d I per frequency, d = REGULARISER mean diag(V^H V)."""
    gram = jnp.einsum("...cr,...cs->...rs", jnp.conj(spectrum), spectrum)
    shift = REGULARISER * jnp.mean(jnp.real(jnp.diagonal(gram, axis1=-2, axis2=-1)), axis=-1)
    return gram + shift[..., None, None] * jnp.eye(gram.shape[-1], dtype=gram.dtype)


def bro_matrices(spectrum):
    """W = I - 2 V (V^H V + d I)^{-1} V^H per frequency [..., W, W] of V(f) [..., W, R] (a solve, no
    inverse): the matrices evaluation caches and bounds."""
    solved = solve(regularised_gram(spectrum), jnp.conj(jnp.swapaxes(spectrum, -1, -2)))
    eye = jnp.eye(spectrum.shape[-2], dtype=spectrum.dtype)
    return eye - 2.0 * spectrum @ solved


def padded_spectrum(x):
    """(rfft2 ("ortho") over height and width of x zero-padded by 1 [B, n, n // 2 + 1, C], n)."""
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return jnp.fft.rfft2(padded, axes=(1, 2), norm="ortho"), padded.shape[1]


def cropped(spectrum, grid: int, side: int):
    """irfft2 ("ortho", grid x grid) of a half spectrum [B, n, m, C], cropped by 1 on every side."""
    return jnp.fft.irfft2(spectrum, s=(grid, grid), axes=(1, 2), norm="ortho")[:, 1 : 1 + side, 1 : 1 + side]


def bro_apply(x, kernel):
    """The BRO layer in training: crop(irfft2(X - 2 V [(V^H V + d I)^{-1} (V^H X)])), X = rfft2(pad x)."""
    spectrum, grid = padded_spectrum(x)
    v = kernel_spectrum(kernel.astype(x.dtype), grid)
    projected = jnp.einsum("fgcr,bfgc->fgrb", jnp.conj(v), spectrum)
    solved = solve(regularised_gram(v), projected)  # [n, m, R, B]
    out = spectrum - 2.0 * jnp.einsum("fgcr,fgrb->bfgc", v, solved)
    return cropped(out, grid, x.shape[1])


def cached_apply(x, weights):
    """The BRO layer with the cached W(f) [n, m, W, W]: crop(irfft2(W X))."""
    spectrum, grid = padded_spectrum(x)
    out = jnp.einsum("fgoc,bfgc->bfgo", weights.astype(spectrum.dtype), spectrum)
    return cropped(out, grid, x.shape[1])


class BROConv(nn.Module):
    """One BRO layer with its centring (backbone.py LiResConvOrtho, one layer of the stack)."""

    features: int
    rank: int
    depth: int
    momentum: float = MOMENTUM

    @nn.compact
    def __call__(self, x, *, train: bool, certify: bool = False):
        width, rank = self.features, self.rank
        if x.shape[-1] != width:
            raise ValueError(f"a BRO layer maps {width} channels to themselves, got {x.shape[-1]}")
        if not 0 < rank < width:
            raise ValueError(f"a BRO layer needs 0 < rank < width, got rank {rank} of {width}")
        weight = self.param(
            "weight",
            lambda key, shape: jax.random.normal(key, shape, jnp.float32) / (9 * width),
            (3, 3, width, rank),
        )
        gamma = self.param("gamma", nn.initializers.ones, (width,))  # per output channel (row of V)
        bias = self.param("bias", nn.initializers.zeros, (width,))
        running_mean = self.variable(STATS, "mean", lambda: jnp.zeros((width,), jnp.float32))
        identity = (
            jnp.zeros((3, 3, width, rank), jnp.float32)
            .at[1, 1, :rank, :rank]
            .set(jnp.eye(rank, dtype=jnp.float32))
        )
        kernel = identity + weight * gamma[:, None] * (self.depth**-0.5)
        one = jnp.ones((), x.dtype)  # training's K takes every BRO layer as 1 (backbone.py:262)
        if train:
            z = bro_apply(x, kernel)
            batch_mean = jnp.mean(z, axis=(0, 1, 2))  # with gradient: the original centres so
            if self.is_mutable_collection("batch_means") and not self.is_initializing():
                self.sow("batch_means", "mean", jax.lax.stop_gradient(batch_mean))
            if self.is_mutable_collection(STATS) and not self.is_initializing():
                running_mean.value = running_mean.value + self.momentum * (
                    jax.lax.stop_gradient(batch_mean) - running_mean.value
                )
            return z - batch_mean + bias, one, None
        if self.has_variable(FROZEN, "weights"):
            weights = self.get_variable(FROZEN, "weights")
        else:
            weights = bro_matrices(kernel_spectrum(kernel, x.shape[1] + 2))
            if self.is_mutable_collection(FROZEN) and not self.is_initializing():
                self.put_variable(FROZEN, "weights", weights)
        shift = bias - running_mean.value
        if not certify or self.is_initializing():
            return cached_apply(x, weights) + shift.astype(x.dtype), one, None
        if not self.has_variable(FROZEN, "sigma_bound"):
            raise ValueError("the rounding allowance needs the guaranteed bounds: certificate_bounds(...)")
        sigma = self.get_variable(FROZEN, "sigma_bound").astype(x.dtype)
        y, local = lot_layer(x, weights, shift, 3, sigma)
        return y, one, (local, sigma)


# ------------------------------------------------------------------------------------------------ network


class BRONet(nn.Module):
    """Stem, `depth` BRO layers, Cholesky neck, CHORD MLP, LLN head (bronet/models/model.py).

    apply(...) -> ModelOutput(logits, pair_bound) with pair_bound[i, j] = K ||w_i - w_j|| (w the normalised
    head rows, K the stem's power-iteration estimate: every other layer 1 in training, as the original)."""

    depth: int = 12
    width: int = 512
    rank: int = 256
    num_classes: int = 10
    neck_features: int = 2048
    mlp_depth: int = 8
    iterations: int = POWER_ITERATIONS
    eval_iterations: int = EVAL_POWER_ITERATIONS  # the original's 500 before evaluation (test.py:77)
    assumed_estimator: str = DEFAULT_ASSUMED_ESTIMATOR  # the assumed figure: "lanczos" or "power"
    eval_lanczos_steps: int = EVAL_LANCZOS_STEPS

    @nn.compact
    def __call__(
        self, x, p=None, *, train: bool = False, return_features: bool = False, dropout=None, certify=False
    ):
        """A ModelOutput (logits, pair_bound), or the features with return_features. certify: the certifying
        forward (certjax.models.certified_logits): the body in float64 with its rounding bound."""
        del p, dropout  # no l_p phase, no dropout (Trainer.recalibrate passes dropout=False)
        if x.shape[1] != x.shape[2] or x.shape[1] % 8:
            raise ValueError(f"BRONet needs square inputs with a side divisible by 8, got {x.shape}")
        body = [BROConv(self.width, self.rank, self.depth, name=f"bro{i + 1}") for i in range(self.depth)]
        return chord_forward(self, body, x, train=train, return_features=return_features, certify=certify)


def build(model_config, num_classes: int) -> nn.Module:
    """The BRONet of `config.model` (depth, width, rank_ratio, neck_features, mlp_depth, ...)."""
    width = model_config.width
    return BRONet(
        depth=model_config.depth,
        width=width,
        rank=int(width * model_config.get("rank_ratio", RANK_RATIO)),
        num_classes=num_classes,
        neck_features=model_config.get("neck_features", 2048),
        mlp_depth=model_config.get("mlp_depth", 8),
        iterations=model_config.get("power_iterations", POWER_ITERATIONS),
        eval_iterations=model_config.get("eval_power_iterations", EVAL_POWER_ITERATIONS),
        assumed_estimator=model_config.get("assumed_estimator", DEFAULT_ASSUMED_ESTIMATOR),
        eval_lanczos_steps=model_config.get("eval_lanczos_steps", EVAL_LANCZOS_STEPS),
    )


def recalibrates_statistics(model_config) -> bool:
    """As LiResNet++: the original evaluates with its momentum-0.1 running means; the option replaces them by
    the exact average of batch means over one pass of the training batches (Trainer.recalibrate)."""
    return bool(model_config.get("recalibrate_statistics", False))


# ------------------------------------------------------------------------------------------- certification


def layer_geometry(model: BRONet, input_side: int) -> dict[str, tuple[int, int, int, int] | None]:
    """name -> (kernel size, stride, padding, input side) of every conv, None for dense layers and for the
    BRO layers (bounded by their cached matrices), in order."""
    side = input_side // 2  # after the stem
    geometry = {"stem": (5, 2, 2, input_side)}
    geometry.update({f"bro{i + 1}": None for i in range(model.depth)})
    geometry["neck_conv"] = (NECK_PATCH, NECK_PATCH, 0, side)
    geometry["neck_linear"] = None
    geometry.update({f"mlp{i + 1}": None for i in range(model.mlp_depth)})
    return geometry


def _layer_sigma(method, name: str, geometry, frozen) -> float:
    if name.startswith("bro"):  # the cached W(f) as applied; stack carries its own safety
        return method.stack(np.asarray(frozen[name]["weights"]))
    kernel = np.asarray(frozen[name]["kernel"], np.float64)
    if geometry is None:
        return method.dense(kernel) * BOUND_SAFETY
    _, stride, padding, side = geometry
    return method.conv(kernel, stride, padding, side) * BOUND_SAFETY


def certificate_bounds(
    model: BRONet, variables, image_shape, *, bound_method: str = "exact", assumed: bool = True
) -> dict:
    """Guaranteed and assumed margin bounds of a checkpoint (the fields and arguments of
    liresnet.certificate_bounds).

    Returns variables ({FROZEN: weights as applied + guaranteed sigmas}), pair_lipschitz [C, C] (guaranteed:
    the product of every layer's bound, BRO layers included, times ||w_p - w_i|| of the normalised head rows,
    float32 rounded up), assumed_pair_lipschitz (the original's: the stem's estimate times the Cholesky
    layers' bounds, BRO layers 1), input_error_gain (= the guaranteed K) and a report with every layer's
    figures, the BRO layers' largest excess over 1 among them.
    """
    variables = {name: value for name, value in variables.items() if name not in (FROZEN, ESTIMATES)}
    input_shape = tuple(image_shape)
    if POWER not in variables or STATS not in variables:
        raise ValueError(
            f"certificate_bounds needs the {POWER!r} and {STATS!r} collections of the checkpoint"
        )
    frozen = flax.core.unfreeze(computed_collection(model, variables, input_shape, FROZEN))
    method, sigmas = spectral.bound_method(bound_method), {}
    geometry = layer_geometry(model, input_shape[1])
    for name, shape in geometry.items():
        sigmas[name] = _layer_sigma(method, name, shape, frozen)
        frozen[name]["sigma_bound"] = jnp.asarray(round_up_float32_array(sigmas[name]))
    guaranteed = float(np.prod(list(sigmas.values())))
    bro = {name: sigma for name, sigma in sigmas.items() if name.startswith("bro")}
    cholesky = {name: sigma for name, sigma in sigmas.items() if name.startswith(("neck", "mlp"))}
    stored = power_estimates(model, variables, input_shape, 0)
    maps = linear_maps(geometry, frozen, variables[POWER])
    converged = assumed_estimates(model, variables, input_shape, maps) if assumed else {}
    power = float(np.prod(list(converged.values()))) * float(np.prod(list(cholesky.values())))

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
            "lipschitz_body_assumed": power if assumed else float("nan"),
            "lipschitz_body_training_estimate": float(np.prod(list(stored.values()))),
            "layer_sigma_bound": sigmas,
            "layer_sigma_power": converged,
            "bro_largest_excess_over_1": max(bro.values()) - 1.0 if bro else 0.0,
            "eval_power_iterations": model.eval_iterations,
            "assumed_estimator": model.assumed_estimator,
            "eval_lanczos_steps": model.eval_lanczos_steps,
        },
    }


FAMILY = Family(
    name="bronet",
    threat_model="l2",
    build=build,
    certificate_bounds=certificate_bounds,
    recalibrates_statistics=recalibrates_statistics,
)
