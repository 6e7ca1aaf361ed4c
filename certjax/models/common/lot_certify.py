"""LOT's certifying forward: LipConvNet in float64 with a proven (worst-case) bound of its rounding error.

The network certified is the one of certjax/models/lot.py in exact arithmetic with the cached orthogonalised
frequency weights W'(f) (float32 values, the "lot_frozen" collection of `certificate_bounds`): each layer is
y = crop(R(W' . D(pad x))) + b, with D the 2-D DFT on the n x n grid keeping the rfft2 half (k2 <= n // 2)
and R the inverse that irfft2 applies to a half spectrum (full inverse DFT along the height, then along the
width the c2r formula z(t) = (1/n) sum_k c_k Re(V_k e^{2 pi i k t / n}), c_k = 1 for k = 0 and k = n/2, else
2). Its norm is at most max_f sigma_max(W'(f)) (lot.py docstring), which `certificate_bounds` measures.

An FFT library's rounding error cannot be bounded without knowing its algorithm, so here D and R are
computed as explicit real matrix products (twiddle matrices cos / sin built in numpy float64), each a set of
dot products, whose float64 rounding Higham's Thm. 3.1 bounds for any summation order, FMA or not: a computed
length-m dot product errs by at most gamma_m sum_i |a_i b_i|, gamma_m = m u / (1 - m u), u = 2^-53. Per stage
(a real matrix G applied along one or two axes, to "fibres" v) the error's l_2 norm over the whole tensor is
at most (gamma_m ||G||_F + ||dG||_F) ||v|| (|| |G| |v| || <= ||G||_F ||v||; dG the error of the computed
twiddles, |dG| <= TWIDDLE_ERROR x the entry scale). The five stages (rfft along width, DFT along height, W'
per frequency, inverse DFT along height, c2r along width) have exact operator norms <= sqrt(n), sqrt(n),
sigma, 1 / sqrt(n), 2 / sqrt(n), so the layer's local error is
    sum_i (prod_{j > i} norm_j) eps_i ||v_{i-1}||  +  u ||y||  (bias addition),
with ||v_{i-1}|| the computed stage inputs' norms (x 1.01 for their own rounding). The network adds them up
as error_out = sigma_l error_in + local_l (MaxMin is 1-Lipschitz and exact; space-to-depth, padding and
cropping are exact). The head: the last LOT layer (a 1 x 1 grid) the same way, or the normalised linear
layer (lln) with its rows normalised in float32 exactly as bounded, gamma_m ||row|| ||x|| + u |z|. Finally the
logits are rounded to float32 (2^-24 |z| each) and the total is rounded up to float32. This is a bound of
every logit's absolute error, which the certifier subtracts twice from every margin.

The float64 error is ~1e-13 of the logits, so the certificates are those of the exact network; tests compare
with an independent numpy evaluation in extended precision (np.longdouble, tests/test_lot_certify.py).
"""

from __future__ import annotations

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np

from certjax.certify.norms import l2_norm_per_example
from certjax.certify.rounding import (
    FLOAT32_SPACING_AT_ONE,
    FLOAT32_UNIT_ROUNDOFF,
    FLOAT64_UNIT_ROUNDOFF,
    gamma,
    round_up_to_float32_traced,
)

# |computed - exact| of a twiddle factor scale * cos(2 pi q / n): the argument takes <= 3 roundings (relative
# 3u of a value < 2 pi: < 2.1e-15), libm's cos / sin < 1 ulp, the scale one more rounding: < 2.6e-15.
TWIDDLE_ERROR = 1e-14
NORM_SAFETY = 1.01  # the computed l_2 norms used in the bound are themselves rounded (relative ~1e-15)
_HIGHEST = jax.lax.Precision.HIGHEST


def _twiddles(n: int, sign: float):
    """cos and sign * sin of 2 pi (k t mod n) / n for k, t < n, in float64 (exact integer reduction)."""
    k = np.arange(n)
    angle = 2.0 * np.pi * (np.outer(k, k) % n) / n
    return np.cos(angle), sign * np.sin(angle)


def dft_stages(n: int):
    """The four real twiddle tensors of one layer on an n x n grid (numpy float64) and their stage figures.

    Returns (tensors, figures): tensors = (width_rfft [2, m, n], height_dft [2, n, 2, n], height_idft
    [2, n, 2, n], width_c2r [n, 2, m]) with m = n // 2 + 1; figures[name] = (dot length, ||G||_F per fibre,
    ||dG||_F bound, exact operator norm)."""
    m = n // 2 + 1
    cos, sin = _twiddles(n, 1.0)
    width_rfft = np.stack([cos[:m], -sin[:m]])  # (Re, Im) of sum_t x_t e^{-2 pi i k t / n}
    height_dft = np.zeros((2, n, 2, n))
    height_dft[0, :, 0], height_dft[0, :, 1] = cos, sin  # (C - iS)(U_re + i U_im)
    height_dft[1, :, 0], height_dft[1, :, 1] = -sin, cos
    height_idft = np.zeros((2, n, 2, n))
    height_idft[0, :, 0], height_idft[0, :, 1] = cos / n, -sin / n  # (1/n)(C + iS)(Y_re + i Y_im)
    height_idft[1, :, 0], height_idft[1, :, 1] = sin / n, cos / n
    weight = np.where((np.arange(m) == 0) | (2 * np.arange(m) == n), 1.0, 2.0) / n
    width_c2r = np.stack([(cos[:m] * weight[:, None]).T, (-sin[:m] * weight[:, None]).T], axis=1)
    root = math.sqrt(n)
    stats = {
        # (dot length, max fibre Frobenius norm, Frobenius bound of the twiddle errors, exact operator norm)
        "width_rfft": (n, float(np.linalg.norm(width_rfft)), TWIDDLE_ERROR * math.sqrt(2 * m * n), root),
        "height_dft": (2 * n, float(np.linalg.norm(height_dft)), TWIDDLE_ERROR * 2 * n, root),
        "height_idft": (2 * n, float(np.linalg.norm(height_idft)), TWIDDLE_ERROR * 2 * n / n, 1.0 / root),
        "width_c2r": (2 * m, float(np.linalg.norm(width_c2r)), TWIDDLE_ERROR * math.sqrt(2 * m * n) * 2 / n,
                      2.0 / root),
    }  # fmt: skip
    return (width_rfft, height_dft, height_idft, width_c2r), stats


def _l2(x):
    return l2_norm_per_example(x) * NORM_SAFETY


def lot_layer(x, weights, bias, kernel_size: int, sigma):
    """One LOT layer in float64 on x [B, H, H, cin] (already space-to-depth for stride 2).

    Returns (y, local error bound [B]). weights: W' [n, n // 2 + 1, cout, cin] complex64 as cached."""
    batch, side, _, cin = x.shape
    pad = kernel_size // 2
    n = side + 2 * pad
    (width_rfft, height_dft, height_idft, width_c2r), stats = dft_stages(n)
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    w = jnp.asarray(weights)
    w_re, w_im = jnp.real(w).astype(jnp.float64), jnp.imag(w).astype(jnp.float64)
    # Real embedding of the complex product per frequency: [P, k1, k2, o, p, i]
    embedded = jnp.stack(
        [jnp.stack([w_re, -w_im], axis=-2), jnp.stack([w_im, w_re], axis=-2)], axis=0
    )  # [2, n, m, cout, 2, cin]
    norms = []
    u = jnp.einsum("pkt,bhtc->bphkc", width_rfft, padded, precision=_HIGHEST)  # [B, 2, n, m, cin]
    norms.append(_l2(padded))
    spectrum = jnp.einsum("PKpt,bptkc->bPKkc", height_dft, u, precision=_HIGHEST)
    norms.append(_l2(u))
    product = jnp.einsum("PKkopi,bpKki->bPKko", embedded, spectrum, precision=_HIGHEST)
    norms.append(_l2(spectrum))
    inverse = jnp.einsum("PTpK,bpKko->bPTko", height_idft, product, precision=_HIGHEST)
    norms.append(_l2(product))
    z = jnp.einsum("tpk,bphko->bhto", width_c2r, inverse, precision=_HIGHEST)  # [B, n, n, cout]
    norms.append(_l2(inverse))
    y = z[:, pad : pad + side, pad : pad + side, :] + jnp.asarray(bias, jnp.float64)

    # Stage figures: (dot length, ||G||_F, ||dG||_F, operator norm); the per-frequency product's ||G||_F is
    # the largest over frequencies of the embedded block's (exact: no twiddles), its norm the measured sigma.
    frobenius = jnp.max(jnp.sqrt(jnp.sum(jnp.square(embedded), axis=(0, 3, 4, 5))))
    stages = [
        stats["width_rfft"],
        stats["height_dft"],
        (2 * cin, frobenius, 0.0, sigma),
        stats["height_idft"],
        stats["width_c2r"],
    ]
    error = jnp.zeros((batch,), jnp.float64)
    for i, (terms, fro, twiddle_error, _) in enumerate(stages):
        after = 1.0
        for later in stages[i + 1 :]:
            after = after * later[3]
        error = error + after * (gamma(terms, np.float64) * NORM_SAFETY * fro + twiddle_error) * norms[i]
    error = error + NORM_SAFETY * FLOAT64_UNIT_ROUNDOFF * _l2(
        y
    )  # the bias addition (crop and padding are exact)
    return y, error


def _space_to_depth(x):
    b, h, w, c = x.shape
    x = x.reshape(b, h // 2, 2, w // 2, 2, c)  # einops "b (h k1) (w k2) c -> b h w (c k1 k2)"
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, h // 2, w // 2, c * 4)


def _max_min(x):
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return jnp.concatenate([jnp.maximum(a, b), jnp.minimum(a, b)], axis=-1)


def _body_layers(params) -> list[str]:
    names = [name for name in params if name.startswith("stage")]
    return sorted(names, key=lambda s: tuple(int(t) for t in s[5:].split("_block")))


def certified_logits64(variables, x, frozen_name: str, normalized_rows):
    """(logits float64 [B, C], bound of every logit's absolute error [B], float64), x normalised images.

    Call inside `jax.enable_x64(True)`. variables: {"params", frozen_name: {layer: {"weights",
    "sigma_bound"}}} as `certificate_bounds` leaves them."""
    params = flax.core.unfreeze(variables["params"])
    frozen = variables.get(frozen_name)
    if frozen is None or any("sigma_bound" not in frozen[name] for name in _body_layers(params)):
        raise ValueError("the certifying forward needs the measured bounds: lot.certificate_bounds(...)")
    h = jnp.asarray(x, jnp.float64)
    error = jnp.zeros((x.shape[0],), jnp.float64)
    for name in _body_layers(params):
        kernel = params[name]["kernel"]
        k, cin_layer = kernel.shape[0], kernel.shape[2]
        if cin_layer == 4 * h.shape[-1]:
            h = _space_to_depth(h)
        elif cin_layer != h.shape[-1]:
            raise ValueError(f"{name}: kernel reads {cin_layer} channels, the input has {h.shape[-1]}")
        sigma = jnp.asarray(frozen[name]["sigma_bound"], jnp.float64)
        h, local = lot_layer(h, frozen[name]["weights"], params[name]["bias"], k, sigma)
        h = _max_min(h)
        error = sigma * error + local
    while h.shape[1] > 1:  # as LipConvNet: a map larger than 1 x 1 is folded into the channels
        h = _space_to_depth(h)
    if "last" in frozen:  # the 1x1 LOT head on a 1 x 1 grid, bounded as the body layers
        sigma = jnp.asarray(frozen["last"]["sigma_bound"], jnp.float64)
        kernel = params["last"]["kernel"]
        if kernel.shape[2] != h.shape[-1]:
            raise ValueError(f"last: kernel reads {kernel.shape[2]} channels, the input has {h.shape[-1]}")
        z, local = lot_layer(h, frozen["last"]["weights"], params["last"]["bias"], 1, sigma)
        logits = z.reshape(z.shape[0], -1)
        error = sigma * error + local  # l_2 norm of the logit vector's error: bounds every logit
    else:  # lln: rows normalised in float32 (the rows certificate_bounds measured), applied in float64
        rows = normalized_rows(jnp.asarray(params["last"]["kernel"], jnp.float32)).astype(jnp.float64)
        features = h.reshape(h.shape[0], -1)
        logits = jnp.matmul(features, rows.T, precision=_HIGHEST) + jnp.asarray(
            params["last"]["bias"], jnp.float64
        )
        row_norm = jnp.max(jnp.sqrt(jnp.sum(jnp.square(rows), axis=1))) * NORM_SAFETY
        error = row_norm * (error + gamma(features.shape[1], np.float64) * _l2(features))
        error = error + NORM_SAFETY * FLOAT64_UNIT_ROUNDOFF * jnp.max(jnp.abs(logits), axis=1)
    return logits, error


def certified_logits(variables, x, frozen_name: str, normalized_rows):
    """(logits float32, bound of every logit's absolute error float32 [B]): the float64 forward rounded."""
    with jax.enable_x64(True):
        logits64, error = certified_logits64(variables, x, frozen_name, normalized_rows)
        logits = logits64.astype(jnp.float32)
        # rounding to float32: <= 2^-24 |z| per logit (|z| <= |computed z| (1 + 2^-24))
        error = error + FLOAT32_UNIT_ROUNDOFF * (1.0 + FLOAT32_SPACING_AT_ONE) * jnp.max(
            jnp.abs(logits64), axis=1
        )
        return logits, round_up_to_float32_traced(error * (1.0 + 1e-12))
