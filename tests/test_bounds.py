"""certjax.certify.interval: interval bounds contain every reachable output (random points, PGD's extremes),
are tight
for one layer, round outward against float64, train (gradients), and certify soundly (margin, IBP, both)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from certjax.certify import interval as bounds
from certjax.certify.interval import Interval
from certjax.kernels.linf_dist import lp_distance_reference
from certjax.kernels.sort_neuron import sort_distance_reference
from certjax.models.linf_dist import LinfDistNet
from certjax.models.sortnet import SortNet, float32_sort_weights

SAMPLES = 10_000
EPS = 0.15

# jitted once per shape: eager dispatch of the blocked bounds (lax.map, cond, custom_vjp) is slow
_distance_bounds = jax.jit(bounds.lp_distance_bounds)
_sort_bounds = jax.jit(bounds.sort_distance_bounds)


@jax.jit
def _distances(points, w, p, mask=None):
    """lp_distance_reference at every point: points [count, B, I] -> [count, B, O]."""
    return jax.lax.map(lambda pts: lp_distance_reference(pts, w, p, mask), points, batch_size=500)


def _box(key, batch, size, eps=EPS):
    x = jax.random.normal(key, (batch, size))
    return x, x - eps, x + eps


def _samples(key, lower, upper, count):
    """count points per example, uniform in the box and with every coordinate at a random end (corners)."""
    k1, k2 = jax.random.split(key)
    uniform = jax.random.uniform(k1, (count // 2,) + lower.shape)
    corners = jax.random.bernoulli(k2, 0.5, (count - count // 2,) + lower.shape).astype(jnp.float32)
    t = jnp.concatenate([uniform, corners])
    return lower + t * (upper - lower)  # [count, B, I]


# ------------------------------------------------------------------------------------------------ one layer


def _lp(d, p):
    """||d||_p over the last axis, float64."""
    return d.max(-1) if np.isinf(p) else (d**p).sum(-1) ** (1 / p)


@pytest.mark.parametrize("p", [8.0, jnp.inf])
def test_distance_layer_bounds_contain_samples_and_are_attained(p):
    x, lower, upper = _box(jax.random.key(0), 3, 12)
    w = x[jnp.array([0, 1, 2, 0, 1])] + 0.3 * jax.random.normal(jax.random.key(1), (5, 12))  # near the box
    lo, hi = _distance_bounds(lower, upper, w, p)
    points = _samples(jax.random.key(2), lower, upper, SAMPLES)
    y = _distances(points, w, p)
    assert bool(jnp.all(y >= lo) & jnp.all(y <= hi))
    # tight: the upper end is attained at a corner (per coordinate the end farther from w), the lower end at
    # the box's point nearest to w (a corner where w lies outside the box's range in every coordinate)
    far = jnp.where(
        jnp.abs(upper[:, None, :] - w) >= jnp.abs(lower[:, None, :] - w), upper[:, None, :], lower[:, None, :]
    )
    near = jnp.clip(w[None], lower[:, None, :], upper[:, None, :])
    at_far = _lp(np.abs(np.asarray(far, np.float64) - np.asarray(w, np.float64)), float(p))
    at_near = _lp(np.abs(np.asarray(near, np.float64) - np.asarray(w, np.float64)), float(p))
    np.testing.assert_allclose(hi, at_far, rtol=2e-4 if p == 8.0 else 1e-6)
    np.testing.assert_allclose(lo, at_near, rtol=2e-4 if p == 8.0 else 1e-6, atol=1e-6)
    assert float(jnp.min(lo)) < float(jnp.max(lo))  # some units see w outside the box, some inside


def test_masked_distance_and_sort_neuron_bounds_contain_samples():
    x, lower, upper = _box(jax.random.key(3), 2, 16)
    w = jax.random.normal(jax.random.key(4), (6, 16))
    mask = jax.random.bernoulli(jax.random.key(5), 0.7, x.shape).astype(jnp.float32)
    points = _samples(jax.random.key(6), lower, upper, SAMPLES)
    for p in (8.0, jnp.inf):
        lo, hi = _distance_bounds(lower, upper, w, p, mask=mask)
        y = _distances(points, w, p, mask)
        assert bool(jnp.all(y >= lo) & jnp.all(y <= hi))
    weights = float32_sort_weights(0.85, 16)
    lo, hi = _sort_bounds(lower, upper, w, weights)
    y = jax.jit(jax.vmap(lambda pts: sort_distance_reference(pts, w, weights)))(points)
    assert bool(jnp.all(y >= lo) & jnp.all(y <= hi))
    # the sort neuron is monotone in every |x_i - w_i|: its bounds are attained where the terms are extreme
    far = jnp.where(
        jnp.abs(upper[:, None, :] - w) >= jnp.abs(lower[:, None, :] - w), upper[:, None, :], lower[:, None, :]
    )
    at_far = jnp.stack([sort_distance_reference(far[:, o], w[o : o + 1], weights)[:, 0] for o in range(6)], 1)
    np.testing.assert_allclose(hi, at_far, rtol=1e-5)


# ---------------------------------------------------------------------------------------- rounding outward


def _float64_bounds(lower, upper, w, p):
    lower, upper, w = (np.asarray(a, np.float64) for a in (lower, upper, w))
    below = lower[:, None, :] - w[None]
    above = upper[:, None, :] - w[None]
    lo = np.maximum(np.maximum(below, -above), 0.0)
    hi = np.maximum(np.abs(below), np.abs(above))
    if np.isinf(p):
        return lo.max(-1), hi.max(-1)

    def norm(d):
        m = d.max(-1, keepdims=True)
        return m[..., 0] * ((d / np.where(m > 0, m, 1.0)) ** p).sum(-1) ** (1 / p)

    return norm(lo), norm(hi)


@pytest.mark.parametrize("p", [2.0, 8.0, 100.0, jnp.inf])
def test_outward_rounding_covers_the_float64_bounds(p):
    # magnitudes far apart and a thin box: every subtraction rounds
    key1, key2, key3 = jax.random.split(jax.random.key(7), 3)
    x = 300.0 * jax.random.normal(key1, (8, 40))
    width = jnp.abs(jax.random.normal(key3, x.shape)) * 1e-3
    lower, upper = x - width, x + width
    w = x[jnp.arange(24) % 8] + jax.random.normal(key2, (24, 40)) * jnp.array([1e-4, 1e2])[jnp.arange(40) % 2]
    lo32, hi32 = _distance_bounds(lower, upper, w, p)
    lo64, hi64 = _float64_bounds(lower, upper, w, float(p))
    assert np.all(np.asarray(lo32, np.float64) <= lo64) and np.all(np.asarray(hi32, np.float64) >= hi64)
    # the rounding is needed: the float32 values without it fall on the wrong side somewhere
    raw_hi = np.max(np.maximum(np.abs(lower[:, None] - w), np.abs(upper[:, None] - w)), -1)
    if np.isinf(p):
        assert np.any(raw_hi.astype(np.float64) < hi64)
    # and it stays small (a few ulps at p = inf, the documented allowance otherwise)
    assert np.all(hi32 <= hi64 * (1 + (1e-6 if np.isinf(p) else 1e-2)))


def test_shift_and_input_box_round_outward():
    rng = np.random.default_rng(0)
    lo = rng.normal(size=1000).astype(np.float32) * 100
    hi = lo + np.abs(rng.normal(size=1000)).astype(np.float32)
    shift = rng.normal(size=1000).astype(np.float32) * 1e-3
    new_lo, new_hi = bounds.shift_bounds(jnp.asarray(lo), jnp.asarray(hi), jnp.asarray(shift))
    assert np.all(np.asarray(new_lo, np.float64) <= lo.astype(np.float64) + shift)
    assert np.all(np.asarray(new_hi, np.float64) >= hi.astype(np.float64) + shift)
    low, high = bounds.valid_pixel_range((0.4914, 0.4822, 0.4465), (0.2009,) * 3)
    assert np.all(low.astype(np.float64) <= (0 - np.array([0.4914, 0.4822, 0.4465])) / 0.2009)
    assert np.all(high.astype(np.float64) >= (1 - np.array([0.4914, 0.4822, 0.4465])) / 0.2009)
    images = jnp.asarray(rng.uniform(-2.4, 2.6, (4, 2, 2, 3)).astype(np.float32))
    box_lo, box_hi = bounds.input_box(images, 0.1, low, high)
    x64 = np.asarray(images, np.float64)
    assert np.all(np.asarray(box_lo, np.float64) <= np.maximum(x64 - 0.1, low))
    assert np.all(np.asarray(box_hi, np.float64) >= np.minimum(x64 + 0.1, high))
    assert np.all(box_lo >= low) and np.all(box_hi <= high)  # clipped to the pixel range


# ------------------------------------------------------------------------------------------- whole networks


def _networks():
    return {
        "linf_dist": LinfDistNet(depth=4, width=24, num_classes=5),
        "sortnet_dropout": SortNet(depth=4, width=24, num_classes=5, mode="dropout"),
        "sortnet_exact": SortNet(depth=4, width=24, num_classes=5, q=0.6, mode="exact"),
    }


def _variables(model, x):
    variables = model.init(jax.random.key(8), x, jnp.float32(jnp.inf))
    # non-zero running means, as after training
    shifted = jax.tree.map(
        lambda m: m + jax.random.normal(jax.random.key(9), m.shape), variables["batch_stats"]
    )
    return {**variables, "batch_stats": shifted}


def _pgd_extremes(model, variables, x, lower, upper, p, steps=20):
    """Inputs in the box that push every logit up and down (sign-gradient steps, projected): [2C, B, C]."""

    def logits(xx):
        return model.apply(variables, xx, p).logits

    @jax.jit
    def extreme(direction):  # direction [C]: +1 / -1 on one logit
        def step(xx, _):
            g = jax.grad(lambda v: jnp.sum(logits(v) * direction))(xx)
            return jnp.clip(xx + 0.25 * (upper - lower) * jnp.sign(g), lower, upper), None

        xx, _ = jax.lax.scan(step, x, None, length=steps)
        return logits(xx)

    classes = logits(x).shape[-1]
    directions = jnp.concatenate([jnp.eye(classes), -jnp.eye(classes)])
    return jnp.stack([extreme(d) for d in directions])


@pytest.mark.parametrize(
    "name, p",
    [
        ("linf_dist", 8.0),
        ("linf_dist", jnp.inf),
        ("sortnet_dropout", jnp.inf),  # at evaluation both SortNet modes run the sort neuron
        ("sortnet_exact", 8.0),  # the l_p relaxation of the p schedule
        ("sortnet_exact", jnp.inf),
    ],
)
def test_network_bounds_contain_random_points_and_pgd_extremes(name, p):
    model = _networks()[name]
    x = jax.random.normal(jax.random.key(10), (3, 2, 2, 3))
    lower, upper = x - EPS, x + EPS
    variables = _variables(model, x)
    p = jnp.float32(p)
    output = jax.jit(lambda: model.apply(variables, x, p, interval=Interval(lower, upper)))()
    logits, (lo, hi) = output.logits, output.logit_bounds
    # the box leaves the forward alone (up to compiled-vs-eager rounding)
    np.testing.assert_allclose(logits, model.apply(variables, x, p).logits, rtol=1e-6)
    points = _samples(jax.random.key(11), lower.reshape(3, -1), upper.reshape(3, -1), SAMPLES)
    forward = jax.jit(lambda pts: model.apply(variables, pts.reshape(x.shape), p).logits)
    z = jax.lax.map(forward, points, batch_size=1000)
    assert bool(jnp.all(z >= lo) & jnp.all(z <= hi))
    extremes = _pgd_extremes(model, variables, x, lower, upper, p)
    assert bool(jnp.all(extremes >= lo) & jnp.all(extremes <= hi))
    # not vacuous: PGD gets close to the bounds of a 1-Lipschitz net (within a few eps of 2 eps width)
    assert float(jnp.max(hi - lo)) < 20 * EPS
    # the first layer's interval contains that layer's outputs (all layers: the next test)
    kernel = variables["params"]["DistLayer_0"]["kernel"]
    layer_lo, layer_hi = _distance_bounds(lower.reshape(3, -1), upper.reshape(3, -1), kernel, p)
    layer_y = _distances(points, kernel, p)
    assert bool(jnp.all(layer_y >= layer_lo) & jnp.all(layer_y <= layer_hi))


def test_every_hidden_layer_interval_contains_its_outputs():
    """Intermediate intervals of the l_inf-dist Net, read by capturing each layer's (y, interval)."""
    model = LinfDistNet(depth=4, width=24, num_classes=5)
    x = jax.random.normal(jax.random.key(12), (2, 2, 2, 3))
    variables = _variables(model, x)
    lower, upper = x - EPS, x + EPS

    def capture(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and type(context.module).__name__ == "DistLayer":
            context.module.sow("intermediates", "out", out)
        return out

    def layer_outputs(xx, box=None):
        with nn.intercept_methods(capture):
            _, state = model.apply(
                variables, xx, jnp.float32(jnp.inf), interval=box, mutable=["intermediates"]
            )
        return [v["out"][0] for v in state["intermediates"].values()]

    with_box = jax.jit(lambda: layer_outputs(x, Interval(lower, upper)))()
    count = 500
    points = _samples(jax.random.key(13), lower.reshape(2, -1), upper.reshape(2, -1), count)
    # evaluation mode treats every example on its own: all points in one batch of count * 2
    outputs = jax.jit(layer_outputs)(points.reshape((count * 2,) + x.shape[1:]))
    for (_, (lo, hi)), (y, _) in zip(with_box, outputs, strict=True):
        y = y.reshape(count, 2, -1)
        assert bool(jnp.all(y >= lo) & jnp.all(y <= hi))


# ---------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("p", [8.0, jnp.inf])
def test_bound_gradients_match_autodiff_of_the_unblocked_definition(p, monkeypatch):
    x, lower, upper = _box(jax.random.key(14), 3, 10)
    w = jax.random.normal(jax.random.key(15), (7, 10))
    cot = jax.random.normal(jax.random.key(16), (2, 3, 7))

    def reference(lower, upper, w):
        lo_t = jnp.maximum(jnp.maximum(lower[:, None] - w, w - upper[:, None]), 0.0)
        hi_t = jnp.maximum(jnp.abs(lower[:, None] - w), jnp.abs(upper[:, None] - w))
        if jnp.isinf(p):
            return jnp.max(lo_t, -1), jnp.max(hi_t, -1)
        return jnp.sum(lo_t**p, -1) ** (1 / p), jnp.sum(hi_t**p, -1) ** (1 / p)

    def scalar(fn):
        return lambda *a: sum(jnp.sum(c * v) for c, v in zip(cot, fn(*a), strict=True))

    # 3 units per block: several blocks, one padded
    monkeypatch.setattr(bounds, "_BLOCK_ELEMENTS", 3 * 10 * 3)
    ours = jax.grad(scalar(lambda *a: bounds.lp_distance_bounds(*a, p)), argnums=(0, 1, 2))(lower, upper, w)
    want = jax.grad(scalar(reference), argnums=(0, 1, 2))(lower, upper, w)
    for a, b in zip(ours, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
