"""LOT: layer-wise orthogonal convolutions and LipConvNet (Xu, Li & Li, NeurIPS'22; recipe of
AI-secure/Layerwise-Orthogonal-Training, shared/RECIPES.md "LOT"). Threat model l_2, eps 36/255.

The orthogonal convolution. Zero-pad the input by k//2 to an n x n grid and treat the convolution as circular
on that grid: in the Fourier domain it is one cout x cin matrix W(f) per frequency f (lot_ortho_conv.py
`forward`). Orthogonalise every W(f):

    S = W W^H + 1e-4 I,  S <- S / (||S||_F + 1e-4),  W' = S^{-1/2} W / sqrt(||S||_F + 1e-4)

with S^{-1/2} from 10 Newton-Schulz iterations (Y = S, Z = I; T = (3I - ZY)/2, Y = YT, Z = TZ). When converged
W' = (W W^H + 1e-4 I)^{-1/2} W: rows orthonormal (cout <= cin) or, equally, W (W^H W + 1e-4 I)^{-1/2} with
orthonormal columns (cout > cin). certjax iterates on the smaller of the two Gram matrices (the same W' when
converged, far cheaper for 3 -> 32). Then inverse FFT and crop: pad (isometry), circular operator (norm =
max_f sigma_max(W'(f))) and crop (a projection) make the layer max_f sigma_max(W'(f))-Lipschitz in l_2, ~1.

Only half the spectrum is computed (rfft2): the kernel is real, so W(-f) = conj(W(f)) and the orthogonalised
weights keep that symmetry; irfft2 uses the Hermitian part of what it is given, whose norm is at most the
largest sigma_max of the two bins involved. So max over the rfft2 bins bounds the layer exactly as the full
spectrum does, at half the matrix work.

Stride 2 is space-to-depth by 2 (cin -> 4 cin, einops as the original) followed by a stride-1 LOT layer; the
rearrangement is a permutation, an isometry. Every conv has a bias (after the orthogonal map). Identity init
where the layer is square, else PyTorch's default conv init (uniform +-1/sqrt(fan_in), weights and bias).

Evaluation: the orthogonalised frequency weights depend only on the parameters, so they are computed once per
checkpoint (`certificate_bounds` below, one jitted call) and passed in the "lot_frozen" collection; every
layer then skips Newton-Schulz. The same cached weights are what evaluation measures: the exact largest
singular value of every frequency block (numpy SVD in float64), whose product certifies, next to the assumed
product 1.
"""

from __future__ import annotations

import math

import einops
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from certjax.certify import spectral
from certjax.certify.margins import pair_lipschitz_matrix
from certjax.certify.norms import (
    SVD_SAFETY,
    l2_norm_per_example,
    pairwise_row_distances,
)
from certjax.certify.rounding import FLOAT32_SPACING_AT_ONE, round_up_float32_array
from certjax.kernels.orthogonal_conv import fft_conv, orthogonal_frequency_weights
from certjax.models import Family, ModelOutput
from certjax.models.common.layers import (
    NormalizedLinear,
    check_certifying,
    computed_collection,
    max_min,
    normalized_rows,
    sow_l2_rounding_error,
)
from certjax.models.common.lipschitz import torch_uniform
from certjax.models.common.lot_certify import certified_logits

NEWTON_SCHULZ_ITERATIONS = 10
GRAM_REGULARISER = 1e-4  # lot_ortho_conv.py: S + 1e-4 I and ||S||_F + 1e-4
FROZEN = "lot_frozen"  # collection of the cached orthogonalised frequency weights
SIZES = {"S": 2, "M": 4, "L": 8}  # LipConvNet-(5b): 10, 20, 40 layers

_HIGHEST = (
    jax.lax.Precision.HIGHEST
)  # fp32 matmuls on GPU too (no TF32: the original refuses mixed precision)


def space_to_depth(x, block: int = 2):
    return einops.rearrange(x, "b (h k1) (w k2) c -> b h w (c k1 k2)", k1=block, k2=block)


def frequency_weights(kernel, n: int):
    """kernel [k, k, cin, cout] -> W(f) [n, n//2 + 1, cout, cin] (complex64) of the circular
    cross-correlation z[p] = sum_d kernel[d] x[p + d - k//2] on the n x n grid: Z(f) = W(f) X(f)."""
    k = kernel.shape[0]
    grid = jnp.zeros((n, n) + kernel.shape[2:], kernel.dtype).at[:k, :k].set(kernel)
    grid = jnp.roll(grid, (-(k // 2), -(k // 2)), axis=(0, 1))  # kernel centre at offset 0
    return jnp.swapaxes(jnp.conj(jnp.fft.rfft2(grid, axes=(0, 1))), -1, -2)


def _hermitian(a):
    return jnp.conj(jnp.swapaxes(a, -1, -2))


def newton_schulz_inverse_sqrt(s, iterations: int = NEWTON_SCHULZ_ITERATIONS):
    """Z ~ S^{-1/2} for Hermitian S with eigenvalues in (0, 1] (coupled Newton-Schulz, LOT's iteration)."""
    eye = jnp.eye(s.shape[-1], dtype=s.dtype)

    def step(_, yz):
        y, z = yz
        t = 0.5 * (3.0 * eye - jnp.matmul(z, y, precision=_HIGHEST))
        return jnp.matmul(y, t, precision=_HIGHEST), jnp.matmul(t, z, precision=_HIGHEST)

    _, z = jax.lax.fori_loop(0, iterations, step, (s, jnp.broadcast_to(eye, s.shape)))
    return z


def orthogonalize(w, iterations: int = NEWTON_SCHULZ_ITERATIONS):
    """LOT's orthogonalisation of each [cout, cin] block of w (see the module docstring)."""
    cout, cin = w.shape[-2:]
    rows = cout <= cin
    gram = (
        jnp.matmul(w, _hermitian(w), precision=_HIGHEST)
        if rows
        else jnp.matmul(_hermitian(w), w, precision=_HIGHEST)
    )
    gram = gram + GRAM_REGULARISER * jnp.eye(gram.shape[-1], dtype=gram.dtype)
    norm = jnp.sqrt(jnp.sum(jnp.abs(gram) ** 2, axis=(-2, -1), keepdims=True)) + GRAM_REGULARISER
    z = newton_schulz_inverse_sqrt(gram / norm, iterations)
    product = jnp.matmul(z, w, precision=_HIGHEST) if rows else jnp.matmul(w, z, precision=_HIGHEST)
    return product / jnp.sqrt(norm)


def identity_kernel(key, shape, dtype=jnp.float32):
    del key
    k, _, cin, cout = shape
    return jnp.zeros(shape, dtype).at[k // 2, k // 2].set(jnp.eye(cin, cout, dtype=dtype))


class LOTConv(nn.Module):
    """One LOT layer: NHWC in, NHWC out (stride 2 halves the side and reads 4 cin channels)."""

    features: int
    kernel_size: int = 3
    stride: int = 1
    iterations: int = NEWTON_SCHULZ_ITERATIONS

    @nn.compact
    def __call__(self, x, *, certify: bool = False):
        if self.stride == 2:
            x = space_to_depth(x)
        elif self.stride != 1:
            raise ValueError(f"LOT supports stride 1 or 2, got {self.stride}")
        batch, height, width, cin = x.shape
        if height != width:
            raise ValueError(f"LOT needs square inputs, got {height}x{width}")
        k = self.kernel_size
        pad = k // 2
        n = height + 2 * pad
        square = cin == self.features
        fan_in = cin * k * k
        kernel = self.param(
            "kernel", identity_kernel if square else torch_uniform(fan_in), (k, k, cin, self.features)
        )
        bias = self.param(
            "bias", nn.initializers.zeros if square else torch_uniform(fan_in), (self.features,)
        )
        if self.has_variable(FROZEN, "weights"):
            w = self.get_variable(FROZEN, "weights")
        else:
            # = orthogonalize(frequency_weights(kernel, n)), with less work
            # (certjax/kernels/orthogonal_conv.py)
            w = orthogonal_frequency_weights(kernel, n, self.iterations)
            if self.is_mutable_collection(FROZEN) and not self.is_initializing():
                self.put_variable(FROZEN, "weights", w)
        y = fft_conv(x, w, pad) + bias
        # Rounding allowance (not a worst-case proof; checked against float64 in tests/test_lot.py): FFT and
        # inverse FFT err by O(log2(n^2) u ||x||), a length-cin complex dot by O(sqrt(cin) u) of its operands'
        # norm (rows of W' have norm <= 1); a factor 8 on top; one more rounding for the bias.
        log_n = math.log2(max(n * n, 2))
        sow_l2_rounding_error(
            self,
            FLOAT32_SPACING_AT_ONE
            * (8.0 * (2.0 * log_n + math.sqrt(cin)) * l2_norm_per_example(x) + l2_norm_per_example(y)),
            certify,
        )
        return y


class LipConvNet(nn.Module):
    """LipConvNet-(5 blocks): 5 stages of `blocks` LOT + MaxMin blocks (lip_convnets.py LipConvNet).

    In a stage the first blocks - 1 are stride 1 kernel 3 and the last is stride 2 (kernel 1 in stage 5),
    doubling the channels: init_channels 32 gives 3 -> 32 ... -> 64@16, 128@8, 256@4, 512@2, 1024@1. The last
    layer is a 1x1 LOT layer (row-orthonormal) or, with lln, a normalised linear layer. Inputs larger than
    32 x 32 (a side 32 * 2^k) leave a 2^k x 2^k map after stage 5, folded by space-to-depth into 1 x 1.
    """

    blocks: int = 2
    init_channels: int = 32
    num_classes: int = 10
    lln: bool = False
    iterations: int = NEWTON_SCHULZ_ITERATIONS

    @nn.compact
    def __call__(self, x, p=None, *, train: bool = False, certify: bool = False):
        """A ModelOutput: logits and logit_scale 1. certify: the certifying forward
        (certjax.models.certified_logits): float64 with a proven error bound, on the cached weights and
        measured sigmas of certificate_bounds (certjax/models/common/lot_certify.py)."""
        del p, train  # no l_p phase, no batch statistics
        if x.shape[1] % 32 or x.shape[1] != x.shape[2]:
            raise ValueError(f"LipConvNet needs square inputs with a side divisible by 32, got {x.shape}")
        if check_certifying(self, certify):
            logits, error = certified_logits(self.variables, x, FROZEN, normalized_rows)
            sow_l2_rounding_error(self, error, certify)
            return ModelOutput(logits, logit_scale=jnp.ones((), logits.dtype))
        planes = self.init_channels
        h = x
        for stage in range(5):
            for block in range(self.blocks):
                last = block == self.blocks - 1
                stride = 2 if last else 1
                kernel = 1 if (stage == 4 and last) else 3
                conv = LOTConv(
                    planes * stride,
                    kernel,
                    stride,
                    self.iterations,
                    name=f"stage{stage + 1}_block{block + 1}",
                )
                h = max_min(conv(h))
            planes *= 2
        # After five stages a 32 x 32 image is one pixel; a larger one (64 x 64: 2 x 2) is folded into the
        # channels by space-to-depth (a permutation of coordinates: norm-preserving) until it is, so the
        # head sees a 1 x 1 map and gives one logit per class at every input size (issue 25).
        while h.shape[1] > 1:
            h = space_to_depth(h)
        if self.lln:
            logits = NormalizedLinear(self.num_classes, name="last")(h)
        else:
            logits = LOTConv(self.num_classes, 1, 1, self.iterations, name="last")(h)
            logits = logits.reshape(logits.shape[0], -1)
        return ModelOutput(logits, logit_scale=jnp.ones((), logits.dtype))


def build(model_config, num_classes: int) -> nn.Module:
    """The LipConvNet of `config.model` (size, init_channels, lln, iterations)."""
    size = model_config.size
    if size not in SIZES:
        raise ValueError(f"model.size {size!r}; valid: {sorted(SIZES)}")
    return LipConvNet(
        blocks=SIZES[size],
        init_channels=model_config.init_channels,
        num_classes=num_classes,
        lln=model_config.lln,
        iterations=model_config.get("iterations", NEWTON_SCHULZ_ITERATIONS),
    )


# ------------------------------------------------------------------------------------------- certification


def certificate_bounds(
    model: LipConvNet, variables, image_shape, *, bound_method: str = "exact", assumed: bool = True
) -> dict:
    """Cached orthogonalised weights and the l_2 margin bounds of a checkpoint.

    image_shape: the batch shape (1, H, W, C) of the dataset's images (the layers' frequency grids).
    bound_method: how every layer's blocks are bounded (certjax.certify.spectral.BOUND_METHODS); assumed:
    unused (the assumed bound is a constant here).

    Returns variables ({"lot_frozen": ...} for evaluation), pair_lipschitz [C, C] (the measured bound of
    z_y - z_j: prod of every body layer's exact sigma_max times ||w_y - w_j|| of the last layer as applied,
    float32 rounded up), assumed_pair_lipschitz (body taken as exactly 1: sqrt(2), or ||w_y - w_j|| with lln)
    and a report of the measured figures.
    """
    variables = {name: value for name, value in variables.items() if name != FROZEN}
    frozen = flax.core.unfreeze(computed_collection(model, variables, tuple(image_shape), FROZEN))
    flat = flax.traverse_util.flatten_dict(frozen)
    del assumed
    method, sigmas, last_rows = spectral.bound_method(bound_method), {}, None
    for path, w in sorted(flat.items()):
        layer = path[-2]
        if layer == "last":
            if w.shape[:2] != (1, 1):
                raise ValueError(f"the last LOT layer must see a 1x1 map, got frequency grid {w.shape[:2]}")
            # On a 1x1 grid irfft2 keeps the real part: the applied matrix is Re W'(0).
            last_rows = np.real(np.asarray(w[0, 0])).astype(np.float64)
        else:
            sigmas[layer] = method.stack(w)
    if model.lln:
        # The rows as applied (float32, normalised in float32): bound with their own exact distances.
        last_rows = np.asarray(
            normalized_rows(jnp.asarray(variables["params"]["last"]["kernel"])), np.float64
        )
    body = float(np.prod(list(sigmas.values()))) if sigmas else 1.0
    # The certifying forward (lot_certify.py) propagates rounding errors with these measured sigmas.
    for layer, sigma in sigmas.items():
        frozen[layer]["sigma_bound"] = jnp.asarray(round_up_float32_array(sigma))
    last_sigma = float(np.linalg.norm(last_rows, 2)) * SVD_SAFETY
    if not model.lln:
        frozen["last"]["sigma_bound"] = jnp.asarray(round_up_float32_array(last_sigma))
    # lln: the forward normalises the rows in float32 inside its own computation; the rows here may differ
    # in the last bits (fusion order), by < 8 ulps of a unit row: + 1e-6 covers it (as LiResNet's head).
    distances = pairwise_row_distances(last_rows) * SVD_SAFETY + (1e-6 if model.lln else 0.0)
    row_norm = float(np.max(np.linalg.norm(last_rows, axis=1))) * SVD_SAFETY + (1e-6 if model.lln else 0.0)
    assumed = distances if model.lln else np.full_like(distances, math.sqrt(2.0))
    return {
        "variables": {FROZEN: frozen},
        "pair_lipschitz": pair_lipschitz_matrix(body * distances),
        "assumed_pair_lipschitz": pair_lipschitz_matrix(assumed),
        # an error of the normalised input moves every logit by at most body x the largest row norm
        "input_error_gain": float(round_up_float32_array(body * row_norm)),
        "report": {
            "bound_method": bound_method,
            "lipschitz_body_measured": body,
            "lipschitz_body_assumed": 1.0,
            "layer_sigma_max": sigmas,
            "last_layer_sigma_max": last_sigma,
        },
    }


FAMILY = Family(name="lot", threat_model="l2", build=build, certificate_bounds=certificate_bounds)
