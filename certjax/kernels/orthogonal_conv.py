"""LOT's orthogonal convolution laid out for speed: the same math as certjax/models/lot.py's definition
(`orthogonalize(frequency_weights(kernel, n))` and the einsum over rfft2(x)), computed with less work.

Three savings, none of which changes what is computed (tests/test_lot.py checks values and gradients against
the definition):

1. **Only the independent bins.** The kernel is real, so W(-f) = conj(W(f)), and LOT's orthogonalisation
   commutes with conjugation (every step is a polynomial in W, W^H with real coefficients), so
   W'(-f) = conj(W'(f)). In the rfft2 half-spectrum [n, n//2 + 1] the columns v = 0 and v = n/2 (n even) hold
   both f and -f: only rows u <= n/2 of them are orthogonalised, the others are conjugated copies. The bins
   with u, v in {0, n/2} are real matrices and are orthogonalised in real arithmetic (a quarter of the work).
   On the small grids of the deep stages this is most of the spectrum: n = 1 (the 1x1 stride-2 layer, the
   widest one) is a single real bin, n = 4 has 6 complex + 4 real bins instead of 12 complex ones.
2. **Complex matrices as real ones.** XLA:CPU multiplies small batched complex matrices 2-3x slower than real
   ones. A complex [m, k] matrix A = Ar + i Ai is carried as its column form col(A) = [Ar; Ai] ([2m, k]) and
   multiplied through its real embedding emb(A) = [[Ar, -Ai], [Ai, Ar]]: emb(A) col(B) = col(AB), one real
   matmul with the same 4 m k n multiply-adds. Newton-Schulz runs in a `fori_loop` (one small program per
   layer, whatever the iteration count), with Z_0 = I taken exactly (its products skipped) and the updates of
   Y and Z stacked into one matmul: Y_{k+1} = Y_k T_k = T_k Y_k, both being polynomials in S.
3. **Channels-first FFT convolution.** rfft2 / irfft2 over the two minor axes (no hidden transposes) and the
   per-frequency product as one real batched matmul [freq, B, 2 cin] @ [freq, 2 cin, 2 cout].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

GRAM_REGULARISER = 1e-4  # lot_ortho_conv.py: S + 1e-4 I and ||S||_F + 1e-4
_HIGHEST = jax.lax.Precision.HIGHEST  # fp32 matmuls on GPU too (the original refuses mixed precision)


def _matmul(a, b):
    """a @ b; a contraction of <= 8 (the 3-channel first layer) as a fused broadcast-and-sum, which beats
    hundreds of tiny batched dots on XLA:CPU."""
    if a.shape[-1] <= 8:
        return jnp.sum(a[..., :, :, None] * b[..., None, :, :], axis=-2)
    return jnp.matmul(a, b, precision=_HIGHEST)


def _embed(a, is_complex: bool):
    """col(A) [..., 2m, k] -> emb(A) [..., 2m, 2k]; a real matrix is its own embedding."""
    if not is_complex:
        return a
    re, im = jnp.split(a, 2, axis=-2)
    return jnp.concatenate([jnp.concatenate([re, -im], -1), jnp.concatenate([im, re], -1)], -2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _times(a, b, is_complex: bool):
    """col(A), col(B) -> col(AB)."""
    return _matmul(_embed(a, is_complex), b)


def _times_fwd(a, b, is_complex):
    return _times(a, b, is_complex), (a, b)


def _times_bwd(is_complex, residuals, g):
    """Autodiff's backward of emb(A) col(B), written with row-major operands only: XLA:CPU folds a
    transpose into the dot, and its dots with a transposed operand ran 1.5-3x slower on these small batched
    blocks (bench/lot.py). The optimization barriers keep the transposed copies materialised."""
    a, b = residuals
    b_t = jax.lax.optimization_barrier(jnp.swapaxes(b, -1, -2))
    e = _matmul(g, b_t)  # d emb(A) = G col(B)^T
    if is_complex:  # onto col(A) = [Ar; Ai]: d Ar = E11 + E22, d Ai = E21 - E12
        (e11, e12), (e21, e22) = (jnp.split(half, 2, axis=-1) for half in jnp.split(e, 2, axis=-2))
        e = jnp.concatenate([e11 + e22, e21 - e12], -2)
    a_h = jax.lax.optimization_barrier(_hermitian(a, is_complex))
    return e, _times(a_h, g, is_complex)  # d col(B) = emb(A)^T G = emb(A^H) G


_times.defvjp(_times_fwd, _times_bwd)


def _hermitian(a, is_complex: bool):
    """col(A) -> col(A^H)."""
    if not is_complex:
        return jnp.swapaxes(a, -1, -2)
    re, im = jnp.split(a, 2, axis=-2)
    return jnp.concatenate([jnp.swapaxes(re, -1, -2), -jnp.swapaxes(im, -1, -2)], -2)


def _eye(m: int, is_complex: bool, dtype):
    eye = jnp.eye(m, dtype=dtype)
    return jnp.concatenate([eye, jnp.zeros_like(eye)], 0) if is_complex else eye


def _newton_schulz(grams, iterations: int):
    """[(col(S), is_complex)] -> [col(Z)], Z ~ S^{-1/2}: LOT's coupled iteration (Y_0 = S, Z_0 = I;
    T = (3I - Z Y)/2, Y <- Y T, Z <- T Z), `iterations` times, every group in one loop (one loop body to
    compile per layer), Y T computed as T Y (equal: both are polynomials in S) and stacked with T Z into one
    matmul."""
    eyes = [_eye(s.shape[-1], is_complex, s.dtype) for s, is_complex in grams]

    def step(_, state):
        out = []
        for (y, z), eye, (_, is_complex) in zip(state, eyes, grams, strict=True):
            t = 1.5 * eye - 0.5 * _times(z, y, is_complex)
            out.append(tuple(jnp.split(_times(t, jnp.concatenate([y, z], -1), is_complex), 2, axis=-1)))
        return out

    state = [(s, jnp.broadcast_to(eye, s.shape)) for (s, _), eye in zip(grams, eyes, strict=True)]
    return [z for _, z in jax.lax.fori_loop(0, iterations, step, state)]


def _orthogonalize(groups, iterations: int):
    """LOT's orthogonalisation (lot.orthogonalize) of [(col(W) [..., (2) cout, cin], is_complex)] ->
    [col(W')]."""
    grams, products = [], []
    for w, is_complex in groups:
        cin = w.shape[-1]
        cout = w.shape[-2] // 2 if is_complex else w.shape[-2]
        rows = cout <= cin
        w_h = _hermitian(w, is_complex)
        gram = _times(w, w_h, is_complex) if rows else _times(w_h, w, is_complex)
        gram = gram + GRAM_REGULARISER * _eye(gram.shape[-1], is_complex, gram.dtype)
        norm = jnp.sqrt(jnp.sum(gram**2, axis=(-2, -1), keepdims=True)) + GRAM_REGULARISER
        grams.append((gram / norm, is_complex))
        products.append((rows, norm))
    out = []
    for (w, is_complex), z, (rows, norm) in zip(
        groups, _newton_schulz(grams, iterations), products, strict=True
    ):
        product = _times(z, w, is_complex) if rows else _times(w, z, is_complex)
        out.append(product / jnp.sqrt(norm))
    return out


@functools.cache
def _bins(n: int, k: int):
    """Index sets of the n x n grid's rfft2 half-spectrum [n, n//2 + 1] and the DFT bases that give W(f) of a
    k x k kernel (float64 at trace time): W(f) = sum_d kernel[d]^T exp(+2 pi i f . (d - k//2) / n), the
    conjugated rfft2 of lot.frequency_weights.

    Returns (complex bins, real bins, mirrored bins (u, v, index of their source among the complex bins),
    cos and sin [len(complex bins), k*k], cos [len(real bins), k*k])."""
    even = n % 2 == 0 and n > 1
    paired_columns = [0] + ([n // 2] if even else [])
    real_rows = [0] + ([n // 2] if even else [])
    complex_bins = [(u, v) for v in range(1, n // 2 + 1) if v not in paired_columns for u in range(n)]
    complex_bins += [(u, v) for v in paired_columns for u in range(1, (n + 1) // 2)]
    real_bins = [(u, v) for v in paired_columns for u in real_rows]
    index = {b: i for i, b in enumerate(complex_bins)}
    mirrored = [((n - u) % n, v, index[(u, v)]) for v in paired_columns for u in range(1, (n + 1) // 2)]

    def basis(bins):
        d = np.arange(k) - k // 2
        u = np.array([b[0] for b in bins], np.float64)[:, None, None]
        v = np.array([b[1] for b in bins], np.float64)[:, None, None]
        angle = 2.0 * np.pi * (u * d[None, :, None] + v * d[None, None, :]) / n
        return np.cos(angle).reshape(len(bins), k * k), np.sin(angle).reshape(len(bins), k * k)

    cos, sin = basis(complex_bins) if complex_bins else (None, None)
    return complex_bins, real_bins, mirrored, cos, sin, basis(real_bins)[0]


@functools.cache
def _spectrum_index(n: int, k: int):
    """For each bin of the [n, n//2 + 1] half-spectrum (row-major), its row in concat([W'(complex bins),
    conj(W'(complex bins)), W'(real bins)])."""
    complex_bins, real_bins, mirrored, *_ = _bins(n, k)
    index = np.full((n, n // 2 + 1), -1, np.int32)
    for i, (u, v) in enumerate(complex_bins):
        index[u, v] = i
    for u, v, source in mirrored:
        index[u, v] = len(complex_bins) + source
    for i, (u, v) in enumerate(real_bins):
        index[u, v] = 2 * len(complex_bins) + i
    assert (index >= 0).all(), "every bin of the half-spectrum is computed or mirrored"
    return index.reshape(-1)


def orthogonal_frequency_weights(kernel, n: int, iterations: int):
    """kernel [k, k, cin, cout] -> W' [n, n//2 + 1, cout, cin] (complex64): lot.orthogonalize(
    lot.frequency_weights(kernel, n), iterations), computed as the module docstring says."""
    k, _, cin, cout = kernel.shape
    complex_bins, real_bins, mirrored, cos, sin, real_cos = _bins(n, k)
    taps = kernel.reshape(k * k, cin * cout)
    groups = []
    if complex_bins:
        basis = jnp.asarray(np.concatenate([cos, sin]), kernel.dtype)
        w = jnp.matmul(basis, taps, precision=_HIGHEST).reshape(2, len(complex_bins), cin, cout)
        w = jnp.swapaxes(w, -1, -2)  # [re / im, bins, cout, cin]
        groups.append((jnp.concatenate([w[0], w[1]], -2), True))
    w = jnp.matmul(jnp.asarray(real_cos, kernel.dtype), taps, precision=_HIGHEST)
    groups.append((jnp.swapaxes(w.reshape(len(real_bins), cin, cout), -1, -2), False))
    *complex_part, real_part = _orthogonalize(groups, iterations)
    pieces = [real_part.astype(jnp.complex64)]
    if complex_part:
        w = jax.lax.complex(complex_part[0][..., :cout, :], complex_part[0][..., cout:, :])
        pieces = [w, jnp.conj(w)] + pieces
    # one gather puts every bin of the half-spectrum in place (its backward: one scatter-add)
    return jnp.concatenate(pieces)[_spectrum_index(n, k)].reshape(n, n // 2 + 1, cout, cin)


def fft_conv(x, w, pad: int):
    """x [B, side, side, cin] (NHWC), W' [n, n//2 + 1, cout, cin] on the n = side + 2 pad grid -> the cropped
    circular convolution [B, side, side, cout] (no bias): einsum("hwoi,bhwi->bhwo", W', rfft2(padded x)),
    inverse FFT and crop, with the FFTs over the minor axes and the product as one real batched matmul,
    [Xr, Xi] [[Wr^T, Wi^T], [-Wi^T, Wr^T]] = [Re, Im] of X W^T per frequency."""
    batch, side, _, cin = x.shape
    n = side + 2 * pad
    cout = w.shape[-2]
    freqs = n * (n // 2 + 1)
    padded = jnp.pad(jnp.transpose(x, (0, 3, 1, 2)), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    spectrum = jnp.fft.rfft2(padded).reshape(batch, cin, freqs)  # [B, cin, freq]
    spectrum = jnp.concatenate([jnp.real(spectrum), jnp.imag(spectrum)], 1).transpose(2, 0, 1)
    w_t = jnp.swapaxes(w, -1, -2).reshape(freqs, cin, cout)
    w_re, w_im = jnp.real(w_t), jnp.imag(w_t)
    embedded = jnp.concatenate([jnp.concatenate([w_re, w_im], -1), jnp.concatenate([-w_im, w_re], -1)], -2)
    out = jnp.matmul(spectrum, embedded, precision=_HIGHEST)  # [freq, B, 2 cout]
    out = out.transpose(1, 2, 0).reshape(batch, 2, cout, n, n // 2 + 1)
    z = jnp.fft.irfft2(jax.lax.complex(out[:, 0], out[:, 1]), s=(n, n))  # [B, cout, n, n]
    return jnp.transpose(z[:, :, pad : pad + side, pad : pad + side], (0, 2, 3, 1))
