"""The l_p-dist operation and the l_inf-dist Net against independent computations."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from certjax.certify.margins import rounding_slack
from certjax.kernels.linf_dist import lp_distance, lp_distance_reference
from certjax.models.linf_dist import LinfDistNet, identity_init


def brute_force_distance(x, w, p):
    """Plain Python loops in float64: the definition, nothing shared with the implementation."""
    out = np.zeros((x.shape[0], w.shape[0]))
    for b, o in itertools.product(range(x.shape[0]), range(w.shape[0])):
        diffs = [abs(float(x[b, i]) - float(w[o, i])) for i in range(x.shape[1])]
        out[b, o] = max(diffs) if np.isinf(p) else sum(d**p for d in diffs) ** (1.0 / p)
    return out


@pytest.mark.parametrize("p", [1.0, 2.0, 8.0, 37.5, np.inf])
def test_distance_matches_brute_force(p):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 13)).astype(np.float32)
    w = rng.normal(size=(5, 13)).astype(np.float32)
    got = np.asarray(lp_distance(x, w, jnp.float32(p)))
    np.testing.assert_allclose(got, brute_force_distance(x, w, p), rtol=2e-5, atol=1e-6)


def test_large_p_does_not_overflow_and_approaches_max():
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(4, 50)) * 30).astype(np.float32)  # |d|^1000 would overflow float32
    w = rng.normal(size=(3, 50)).astype(np.float32)
    got = np.asarray(lp_distance(x, w, jnp.float32(1000.0)))
    assert np.all(np.isfinite(got))
    exact_max = brute_force_distance(x, w, np.inf)
    # ||d||_inf <= ||d||_p <= n^(1/p) ||d||_inf
    assert np.all(got >= exact_max * (1 - 1e-6))
    assert np.all(got <= exact_max * 50 ** (1 / 1000) * (1 + 1e-6))


@pytest.mark.parametrize("p", [8.0, 100.0, np.inf])
def test_custom_gradient_matches_autodiff_of_definition(p):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(7, 11)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(5, 11)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(7, 5)), jnp.float32)
    p = jnp.float32(p)
    ours = jax.grad(lambda x, w: jnp.sum(g * lp_distance(x, w, p)), (0, 1))(x, w)
    ref = jax.grad(lambda x, w: jnp.sum(g * lp_distance_reference(x, w, p)), (0, 1))(x, w)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_linf_gradient_goes_to_first_argmax_on_ties():
    x = jnp.array([[1.0, -1.0, 0.5]])  # |x - 0| ties between coordinates 0 and 1
    w = jnp.zeros((1, 3))
    grad_x = jax.grad(lambda x: jnp.sum(lp_distance(x, w, jnp.float32(jnp.inf))))(x)
    np.testing.assert_array_equal(grad_x, [[1.0, 0.0, 0.0]])


def test_gradients_match_finite_differences():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, 6))
    w = rng.normal(size=(4, 6))
    w32 = jnp.asarray(w, jnp.float32)
    for p in (8.0, np.inf):

        def f(x, p=p):
            return float(np.sum(brute_force_distance(x, w, p)))

        def total(x, p=p):
            return jnp.sum(lp_distance(x, w32, jnp.float32(p)))

        grad = np.asarray(jax.grad(total)(jnp.asarray(x, jnp.float32)))
        h = 1e-4
        for b, i in [(0, 0), (1, 3), (2, 5)]:
            e = np.zeros_like(x)
            e[b, i] = h
            fd = (f(x + e) - f(x - e)) / (2 * h)
            assert abs(fd - grad[b, i]) < 2e-3, (p, b, i, fd, grad[b, i])


def test_identity_init_copies_inputs():
    w = identity_init()(jax.random.key(0), (8, 5))
    assert np.all(np.asarray(w)[np.arange(8), np.arange(8) % 5] == -10.0)
    x = jax.random.uniform(jax.random.key(1), (4, 5), minval=-2.5, maxval=2.5)
    y = lp_distance(x, w, jnp.float32(jnp.inf))
    np.testing.assert_allclose(y, x[:, np.arange(8) % 5] + 10.0, rtol=1e-6)


def _trained_like_net(seed=0):
    """A small net whose running means are non-zero (as after training)."""
    model = LinfDistNet(depth=4, width=48, num_classes=10)
    x = jax.random.normal(jax.random.key(seed), (64, 4, 4, 3))
    variables = model.init(jax.random.key(seed + 1), x, jnp.float32(jnp.inf))
    _, updates = model.apply(variables, x, jnp.float32(jnp.inf), train=True, mutable=["batch_stats"])
    return model, {**variables, **updates}


def test_every_logit_is_1_lipschitz_in_linf():
    model, variables = _trained_like_net()
    key_a, key_b, key_c = jax.random.split(jax.random.key(5), 3)
    x = jax.random.normal(key_a, (512, 4, 4, 3))
    # near pairs (the regime of certification) and far pairs
    scale = jnp.where(jnp.arange(512)[:, None, None, None] < 256, 0.01, 1.0)
    x2 = x + scale * jax.random.uniform(key_b, x.shape, minval=-1, maxval=1)
    z1 = model.apply(variables, x, jnp.float32(jnp.inf)).logits
    z2 = model.apply(variables, x2, jnp.float32(jnp.inf)).logits
    input_distance = jnp.max(jnp.abs(x - x2).reshape(512, -1), axis=1)[:, None]
    # float32 logits carry rounding error: the bound must hold up to the slack that certification
    # subtracts from every margin (certify.rounding_slack), i.e. the slack must cover it.
    slack = rounding_slack(z1, z2) / 2
    assert bool(jnp.all(jnp.abs(z1 - z2) <= input_distance + slack))
    ratio = jnp.abs(z1 - z2) / input_distance
    assert float(ratio.max()) <= 1.001
    assert float(ratio.max()) > 0.3  # the check is not vacuous
    del key_c


def test_changing_p_does_not_recompile():
    model, variables = _trained_like_net()
    apply = jax.jit(lambda v, x, p: model.apply(v, x, p).logits)
    x = jnp.ones((2, 4, 4, 3))
    for p in (8.0, 9.5, 1000.0, np.inf):
        apply(variables, x, jnp.float32(p))
    assert apply._cache_size() == 1


@pytest.mark.parametrize("block_elements", [7 * 11 * 3, 7 * 11])  # 3 units per block (one padded), 1 unit
def test_blockwise_lp_backward_matches_the_single_block(monkeypatch, block_elements):
    import certjax.kernels.linf_dist as kernel
    import certjax.kernels.linf_dist_jnp as jnp_path

    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.normal(size=(7, 11)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(5, 11)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(7, 5)), jnp.float32)
    mask = jnp.asarray(rng.random((7, 11)) < 0.7, jnp.float32)

    def grads():
        plain = jax.grad(lambda x, w: jnp.sum(g * lp_distance(x, w, jnp.float32(8.0))), (0, 1))(x, w)
        masked = jax.grad(
            lambda x, w: jnp.sum(g * kernel.masked_lp_distance(x, w, mask, jnp.float32(8.0))), (0, 1)
        )(x, w)
        return plain + masked

    whole = grads()
    monkeypatch.setattr(jnp_path, "_BACKWARD_BLOCK_ELEMENTS", block_elements)
    for a, b in zip(grads(), whole):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
