"""The Pallas interval-bounds kernel (certjax.kernels.lp_bounds_pallas) in interpret mode on CPU, and its
place in certjax.certify.interval and kernel="auto" (certjax.kernels.autoselect).

* the raw ends equal the jnp path's (bitwise at p = inf, to rounding at p = 8), with and without mask, at
  shapes that are no multiple of the tiles (several programs, padded inputs);
* the rounded ends contain the float64 bound of the same box (an independent computation);
* the gradient through kernel="interpret" bounds is the jnp path's (the kernel is forward only);
* "auto": the real kernel passes its check and is used; a candidate whose interval is tighter than the jnp
  path's (by less than the p = 8 value tolerance) fails it with one warning, and the jnp values are used.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from certjax.certify import interval as bounds
from certjax.kernels import autoselect, linf_dist_pallas, lp_bounds_pallas

# several programs per axis; unroll 4 pads I = 37 to 40 (unroll 1: no padding, the smallest programs)
SMALL = linf_dist_pallas.BlockSizes(block_b=8, block_o=8, block_i=8, unroll=1, num_warps=4)
UNROLLED = linf_dist_pallas.BlockSizes(block_b=8, block_o=8, block_i=8, unroll=4, num_warps=4)
SHAPE = (13, 37, 21)  # (B, I, O)
PS = (np.inf, 8.0)


@pytest.fixture(autouse=True)
def _fresh_decisions():
    autoselect.clear_decisions()
    yield
    autoselect.clear_decisions()


def _boxes(masked: bool, seed: int = 0):
    batch, size, out = SHAPE
    kx, kr, kw, km = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(kx, (batch, size))
    radius = 0.4 * jax.random.uniform(kr, (batch, size))
    radius = radius.at[0, :5].set(0.0)  # zero-width coordinates
    w = jax.random.normal(kw, (out, size))
    w = w.at[:3].set(x[:3])  # unit o < 3 has its weights inside example o's box: lower bound 0
    mask = None
    if masked:
        mask = (jax.random.uniform(km, (batch, size)) < 0.7).astype(jnp.float32).at[1].set(0.0)
    return x - radius, x + radius, w, mask


def _float64_bounds(lower, upper, w, mask, p):
    """The exact bound of the float32 box, in float64: per-term bounds, then the norm."""
    lower, upper, w = (np.asarray(a, np.float64) for a in (lower, upper, w))
    below = lower[:, None, :] - w[None]
    above = upper[:, None, :] - w[None]
    lo = np.maximum(np.maximum(below, -above), 0.0)
    hi = np.maximum(np.abs(below), np.abs(above))
    if mask is not None:
        lo, hi = lo * np.asarray(mask)[:, None, :], hi * np.asarray(mask)[:, None, :]
    if np.isinf(p):
        return lo.max(-1), hi.max(-1)
    return (lo**p).sum(-1) ** (1 / p), (hi**p).sum(-1) ** (1 / p)


_jnp_raw = jax.jit(bounds.jnp_raw_bounds)


@pytest.mark.parametrize(
    "blocks, masked", [(SMALL, False), (UNROLLED, True)], ids=["unroll1-plain", "unroll4-masked"]
)
def test_interpret_kernel_equals_the_jnp_bounds_and_contains_float64(blocks, masked):
    lower, upper, w, mask = _boxes(masked)
    kernel = jax.jit(lambda *a: lp_bounds_pallas.lp_bounds_pallas(*a, blocks=blocks, interpret=True))
    rounded = jax.jit(
        lambda *a: bounds.lp_distance_bounds_with(
            lambda lo, hi, w, m, p: lp_bounds_pallas.lp_bounds_pallas(
                lo, hi, w, m, p, blocks=blocks, interpret=True
            ),
            *a,
        )
    )
    for p in PS:
        lo, hi = kernel(lower, upper, w, mask, np.float32(p))
        want_lo, want_hi = _jnp_raw(lower, upper, w, mask, np.float32(p))
        if np.isinf(p):  # the same float32 operations
            np.testing.assert_array_equal(lo, want_lo)
            np.testing.assert_array_equal(hi, want_hi)
        else:
            np.testing.assert_allclose(lo, want_lo, rtol=2e-6, atol=1e-30)
            np.testing.assert_allclose(hi, want_hi, rtol=2e-6)
        exact_lo, exact_hi = _float64_bounds(lower, upper, w, mask, p)
        final_lo, final_hi = rounded(lower, upper, w, np.float32(p), mask)
        assert np.all(np.asarray(final_lo, np.float64) <= exact_lo), p
        assert np.all(np.asarray(final_hi, np.float64) >= exact_hi), p
        # not vacuous: w inside the box for some units (lo = 0), outside for others; a masked row is 0
        assert 0 < np.mean(exact_lo > 0) < 1
        np.testing.assert_allclose(final_hi, exact_hi, rtol=1e-4, atol=1e-37)  # the masked row: tiny


def test_kernel_bounds_differentiate_as_the_jnp_path():
    """The kernel computes values only; certjax.certify.interval gives it the jnp path's blocked backward."""
    lower, upper, w, _ = _boxes(False)
    g_lo, g_hi = jax.random.normal(jax.random.key(7), (2, SHAPE[0], SHAPE[2]))

    def grads(kernel, p):
        def loss(lower, upper, w):
            lo, hi = bounds.lp_distance_bounds(lower, upper, w, p, kernel=kernel)
            return jnp.sum(g_lo * lo + g_hi * hi)

        return jax.jit(jax.grad(loss, (0, 1, 2)))(lower, upper, w)

    for p in PS:
        for got, want in zip(grads("interpret", p), grads("jnp", p), strict=True):
            scale = float(jnp.max(jnp.abs(want)))
            assert scale > 0
            if np.isinf(p):  # the same backward of the same residuals, the same (zero) allowance
                np.testing.assert_array_equal(got, want)
            else:  # the kernel's wider allowance scales each end's gradient by 1 +- ~3e-6 before the sums
                np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * scale)


def _interpret_candidate(lower, upper, w, mask, p):
    return autoselect.pallas_bounds(lower, upper, w, mask, p, blocks=SMALL, interpret=True)


def _tighter_candidate(lower, upper, w, mask, p):
    """The jnp ends moved inward by 1e-3 of their size at p = 8 only: within the value tolerance there (1e-2),
    so only the containment check can see it."""
    lo, hi = bounds.jnp_raw_bounds(lower, upper, w, mask, p)
    shrink = jnp.where(jnp.isinf(p), 0.0, 1e-3)
    return lo * (1 + shrink), hi * (1 - shrink)


def _auto_bounds(masked: bool):
    lower, upper, w, mask = _boxes(masked, seed=1)
    run = jax.jit(lambda p: bounds.lp_distance_bounds(lower, upper, w, p, mask, kernel="auto"))
    return [run(np.float32(p)) for p in PS]


def _fallback_messages(record):
    return [str(r.message) for r in record if issubclass(r.category, autoselect.KernelFallbackWarning)]


def test_auto_checks_and_uses_a_correct_kernel():
    with (
        autoselect.candidate_for_auto(_interpret_candidate, op="bounds"),
        warnings.catch_warnings(record=True) as record,
    ):
        warnings.simplefilter("always")
        got = _auto_bounds(masked=True)
    assert not _fallback_messages(record)
    (result,) = autoselect.decisions().values()
    assert result.ok and result.signature.op == "bounds" and "interval bounds" in result.signature.describe()
    assert set(result.errors) == {"p=inf lower", "p=inf upper", "p=8 lower", "p=8 upper"}
    assert result.errors["p=inf lower"] == 0.0 and result.errors["p=inf upper"] == 0.0
    # the kernel's values (wider allowance than the jnp path at p = 8): used, not the jnp path's
    lower, upper, w, mask = _boxes(True, seed=1)
    jnp_hi = bounds.lp_distance_bounds(lower, upper, w, np.float32(8.0), mask, kernel="jnp")[1]
    assert float(jnp.max(got[1][1] - jnp_hi)) > 0


@pytest.mark.parametrize(
    "candidate, expected",
    [
        (_tighter_candidate, "p=8 lower bound is tighter than the jnp path's"),
        (lambda *a: (_ for _ in ()).throw(RuntimeError("Triton compile failed (injected)")), "RuntimeError"),
    ],
    ids=["tighter", "raises"],
)
def test_auto_falls_back_to_jnp_for_a_broken_kernel(candidate, expected):
    with (
        autoselect.candidate_for_auto(candidate, op="bounds"),
        warnings.catch_warnings(record=True) as record,
    ):
        warnings.simplefilter("always")
        got = _auto_bounds(masked=False)
        _auto_bounds(masked=False)  # a second trace: no second check, no second warning
    messages = _fallback_messages(record)
    assert len(messages) == 1, messages
    for text in (expected, "interval bounds, B x I x O = 13 x 37 x 21", "uses the jnp path"):
        assert text in messages[0], (text, messages[0])
    (result,) = autoselect.decisions().values()
    assert not result.ok
    lower, upper, w, _ = _boxes(False, seed=1)
    for (lo, hi), p in zip(got, PS, strict=True):
        want_lo, want_hi = bounds.lp_distance_bounds(lower, upper, w, np.float32(p), kernel="jnp")
        np.testing.assert_array_equal(lo, want_lo)
        np.testing.assert_array_equal(hi, want_hi)


def test_unknown_bounds_kernel_is_named():
    lower, upper, w, _ = _boxes(False)
    with pytest.raises(ValueError, match="unknown bounds kernel 'cuda'; valid: .*'auto'"):
        bounds.lp_distance_bounds(lower, upper, w, np.inf, kernel="cuda")


def test_bounds_kernel_lowers_for_cuda_with_triton():
    """Both branches (p = inf, finite p), plain and masked, and the gradient (the jnp backward around the
    kernel) export for CUDA from a CPU-only machine: lowering builds the Triton IR; only a GPU compiles it."""
    pytest.importorskip("jax._src.pallas.triton.pallas_call_registration")
    box = jax.ShapeDtypeStruct((100, 300), jnp.float32)
    w = jax.ShapeDtypeStruct((200, 300), jnp.float32)
    p = jax.ShapeDtypeStruct((), jnp.float32)

    def bounds_and_gradient(lower, upper, w, mask, p):
        def loss(lower, upper, w):
            lo, hi = bounds.lp_distance_bounds(lower, upper, w, p, mask, kernel="pallas")
            return jnp.sum(hi - lo)

        plain = bounds.lp_distance_bounds(lower, upper, w, p, kernel="pallas")
        return plain, jax.grad(loss, (0, 1, 2))(lower, upper, w)

    exported = jax.export.export(
        jax.jit(bounds_and_gradient),
        platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(box, box, w, box, p)
    # plain and masked, each l_inf + l_p (both cond branches); the backward adds no kernel
    assert exported.mlir_module().count("stablehlo.custom_call @__gpu$xla.gpu.triton(") == 4
