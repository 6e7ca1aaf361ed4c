"""SortNet's hybrid model (certjax/models/sortnet_hybrid.py): interval bounds of its head against brute force
and float64, the ce_hinge loss and the eps-smooth schedule against transcriptions of zbh2047/SortNet main.py,
no margin certificate, and one end-to-end run on the Tiny-ImageNet fixture (train, API, export, audit)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from certjax.certify import interval as bounds
from certjax.certify.interval import Interval
from certjax.certify.margins import linf_certify
from certjax.certify.rounding import gamma
from certjax.losses import LOSSES
from certjax.models import certified_logits, get_family
from certjax.models.sortnet_hybrid import SortHybridNet
from certjax.optim.schedules import eps_schedule_factor, schedule_values
from tests.conftest import REPO, run_launch

CLASSES = 5


def _tiny_model():
    return SortHybridNet(depth=4, width=16, hidden=8, num_classes=CLASSES, q=0.7, mode="exact",
                         distance_kernel="jnp")  # fmt: skip


@pytest.fixture(scope="module")
def tiny_model():
    model = _tiny_model()
    x = jax.random.normal(jax.random.key(0), (4, 4, 4, 3))
    variables = model.init(jax.random.key(1), x)
    # running means away from 0, as after training
    _, state = model.apply(variables, 0.5 * x, train=True, mutable=["batch_stats"])
    return model, {**variables, **state}, x


def test_head_bounds_contain_every_sampled_point_of_the_box(tiny_model):
    model, variables, x = tiny_model
    eps = 0.05
    box = Interval(x - eps, x + eps)
    out = jax.jit(lambda v, x: model.apply(v, x, interval=box))(variables, x)
    lower, upper = (np.asarray(end) for end in out.logit_bounds)
    k = np.asarray(out.logits).argmax(-1)
    np.testing.assert_array_equal(lower[np.arange(4), k], 0.0)
    logits_of = jax.jit(lambda v, x: model.apply(v, x).logits)
    key = jax.random.key(2)
    for trial in range(40):  # 20 random corners, 20 random interior points, 4 images each
        key, sub = jax.random.split(key)
        if trial % 2:
            delta = eps * jax.random.rademacher(sub, x.shape, jnp.float32)
        else:
            delta = jax.random.uniform(sub, x.shape, minval=-eps, maxval=eps)
        z = np.asarray(logits_of(variables, x + delta))
        diff = z - z[np.arange(4), k][:, None]
        assert np.all(lower <= diff) and np.all(diff <= upper), trial


def test_head_bounds_are_tight_at_a_small_radius(tiny_model):
    """At eps 1e-4 the bound's width is a small multiple of the spread seen on corners (not loose)."""
    model, variables, x = tiny_model
    eps = 1e-4
    out = model.apply(variables, x, interval=Interval(x - eps, x + eps))
    width = np.asarray(out.logit_bounds.upper - out.logit_bounds.lower)
    k = np.asarray(out.logits).argmax(-1)
    seen = []
    for seed in range(16):
        delta = eps * jax.random.rademacher(jax.random.key(seed), x.shape, jnp.float32)
        z = np.asarray(model.apply(variables, x + delta).logits)
        seen.append(z - z[np.arange(4), k][:, None])
    spread = np.ptp(np.stack(seen), axis=0)
    others = np.ones_like(width, bool)
    others[np.arange(4), k] = False
    assert np.all(width[others] < 0.05)
    assert np.all(width[others] <= 200 * spread[others] + 1e-4)


def _random_box(seed, batch, size, scale=1.0):
    rng = np.random.default_rng(seed)
    center = rng.normal(size=(batch, size)).astype(np.float32) * scale
    radius = np.abs(rng.normal(size=(batch, size))).astype(np.float32) * 0.1 * scale
    return center - radius, center + radius


def test_linear_and_tanh_bounds_contain_the_float64_layer_and_the_float32_forward():
    rng = np.random.default_rng(3)
    lower, upper = _random_box(4, 6, 300, scale=3.0)
    kernel = (rng.normal(size=(20, 300)) / math.sqrt(300)).astype(np.float32)
    bias = rng.normal(size=20).astype(np.float32)
    lo, hi = (np.asarray(e, np.float64) for e in bounds.linear_bounds(lower, upper, kernel, bias))
    k64, l64, u64 = kernel.astype(np.float64), lower.astype(np.float64), upper.astype(np.float64)
    pos, neg = np.maximum(k64, 0), np.minimum(k64, 0)
    assert np.all(lo <= l64 @ pos.T + u64 @ neg.T + bias) and np.all(u64 @ pos.T + l64 @ neg.T + bias <= hi)
    size = np.maximum(np.abs(l64), np.abs(u64)) @ np.abs(k64).T + np.abs(bias)
    allowance = 2 * gamma(2 * 300 + 2, np.float32) * size * 1.01  # only the rounding allowance added
    assert np.all(hi - lo <= (u64 - l64) @ np.abs(k64).T + 2 * allowance + 1e-6)
    t_lo, t_hi = (
        np.asarray(e, np.float64) for e in bounds.tanh_bounds(lo.astype(np.float32), hi.astype(np.float32))
    )
    for _ in range(50):
        x = rng.uniform(lower, upper).astype(np.float32)
        a32 = np.asarray(bounds.dense(jnp.asarray(x), kernel) + bias)
        assert np.all(lo <= a32) and np.all(a32 <= hi)
        a64 = x.astype(np.float64) @ k64.T + bias
        assert np.all(lo <= a64) and np.all(a64 <= hi)
        t32, t64 = np.asarray(jnp.tanh(a32)), np.tanh(a64)
        assert np.all(t_lo <= np.minimum(t32, t64)) and np.all(np.maximum(t32, t64) <= t_hi)


def test_pair_bounds_contain_the_float64_pair_bound_and_beat_interval_subtraction():
    rng = np.random.default_rng(5)
    lower, upper = _random_box(6, 5, 64)
    lower, upper = np.tanh(lower), np.tanh(upper)
    kernel = (rng.normal(size=(7, 64)) / 8).astype(np.float32)
    bias = rng.normal(size=7).astype(np.float32)
    classes = np.array([0, 3, 6, 2, 2], np.int32)
    lo, hi = (
        np.asarray(e, np.float64) for e in bounds.pair_linear_bounds(lower, upper, kernel, bias, classes)
    )
    k64, l64, u64 = kernel.astype(np.float64), lower.astype(np.float64), upper.astype(np.float64)
    rows = k64[None] - k64[classes][:, None]  # [B, C, I]: w_j - w_k
    exact_hi = np.einsum("bci,bi->bc", np.maximum(rows, 0), u64) + np.einsum(
        "bci,bi->bc", np.minimum(rows, 0), l64
    )
    exact_lo = np.einsum("bci,bi->bc", np.maximum(rows, 0), l64) + np.einsum(
        "bci,bi->bc", np.minimum(rows, 0), u64
    )
    shift = bias[None] - bias[classes][:, None]
    assert np.all(lo <= exact_lo + shift) and np.all(exact_hi + shift <= hi)
    assert np.all(hi - (exact_hi + shift) <= 1e-3)  # the float64 bound up to rounding allowances
    np.testing.assert_array_equal(hi[np.arange(5), classes], 0.0)
    z_lo, z_hi = bounds.linear_bounds(lower, upper, kernel, bias)
    subtracted = np.asarray(z_hi) - np.take_along_axis(np.asarray(z_lo), classes[:, None], 1)
    assert np.all(hi <= subtracted + 1e-4) and np.mean(hi < subtracted - 1e-3) > 0.5


def test_float32_tanh_error_is_far_below_the_bound():
    grid = np.concatenate(
        [np.linspace(-12, 12, 2_000_001), np.geomspace(1e-30, 12, 200_001), -np.geomspace(1e-30, 12, 200_001)]
    ).astype(np.float32)
    error = np.abs(np.asarray(jnp.tanh(grid), np.float64) - np.tanh(grid.astype(np.float64)))
    assert error.max() <= bounds.TANH_ABSOLUTE_ERROR / 16


def test_margin_certifies_nothing(tiny_model):
    model, variables, x = tiny_model
    logits, error = certified_logits(model, variables, x)
    assert np.all(np.isinf(np.asarray(error)))
    labels = jnp.argmax(logits, -1)
    result = linf_certify(logits, labels, 0.0, (0.2276,) * 3, logit_error=error)
    assert not np.any(np.asarray(result["certified"])) and np.all(np.asarray(result["radius"]) == 0)
    family = get_family("sortnet_hybrid")
    assert family.threat_model == "linf" and family.interval_bounds


def _original_ce_hinge(outputs, worst_outputs, targets, lam):
    """zbh2047/SortNet main.py ce_hinge, transcribed to float64 numpy (outputs, worst already times s)."""
    correct = (outputs.argmax(1) == targets).astype(np.float64)
    margin = worst_outputs - worst_outputs[np.arange(len(targets)), targets][:, None]
    margin = margin + 1
    margin[np.arange(len(targets)), targets] = 0
    shifted = outputs - outputs.max(1, keepdims=True)
    ce = -(shifted[np.arange(len(targets)), targets] - np.log(np.exp(shifted).sum(1)))
    return (correct * margin.max(1)).mean() + lam * ce.mean()


def test_ce_hinge_matches_the_original_formula():
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(32, 6)).astype(np.float32)
    labels = np.where(rng.random(32) < 0.6, logits.argmax(1), rng.integers(0, 6, 32)).astype(np.int32)
    # bounds of z - z_k (k = prediction), as the model returns them
    k = logits.argmax(1)
    upper = np.abs(rng.normal(size=(32, 6))).astype(np.float32) - 0.8
    upper[np.arange(32), k] = 0
    lower = upper - 1.0
    lower[np.arange(32), k] = 0
    scale, lam = np.float32(1.7), 0.3
    ours = LOSSES["ce_hinge"](jnp.asarray(logits), scale, jnp.asarray(labels), {"lam": lam}, None,
                              logit_bounds=(jnp.asarray(lower), jnp.asarray(upper)))  # fmt: skip
    worst = scale * (upper - lower[np.arange(32), labels][:, None]).astype(np.float64)
    worst[np.arange(32), labels] = 0.0
    expected = _original_ce_hinge(scale * logits.astype(np.float64), worst, labels, lam)
    np.testing.assert_allclose(float(jnp.mean(ours)), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="loss.bound='ibp'"):
        LOSSES["ce_hinge"](jnp.asarray(logits), scale, jnp.asarray(labels), {"lam": lam}, None)


def _original_eps(ratio, smooth, eps_train):
    """zbh2047/SortNet main.py create_schedule's smooth eps."""
    k = 1 / ((4 - 3 * smooth) * smooth**3)
    if ratio < smooth:
        return k * ratio**4 * eps_train
    return ((1 - k * smooth**4) / (1 - smooth) * (ratio - 1) + 1) * eps_train


def test_eps_smooth_schedule_matches_the_original():
    config = ml_collections.ConfigDict(
        {"loss": {"eps_train": 0.00431, "lam0": 1.0, "lam_end": 0.01,
                  "eps_schedule": {"kind": "smooth", "start_fraction": 0.0, "end_fraction": 0.5,
                                   "smooth": 0.4}},
         "p_schedule": {"enabled": True, "p_start": 8.0, "p_end": 1000.0, "start_fraction": 0.1,
                        "end_fraction": 0.98},
         "train": {"epochs": 1000}}
    )  # fmt: skip
    total = 1000 * 196
    for step in (0, 1, 9800, 39_200, 39_300, 60_000, 97_999, 98_000, 150_000, total - 1):
        ratio = min(step / (0.5 * total), 1.0)
        values = schedule_values(config, step, total)
        assert values["eps_train"] == pytest.approx(_original_eps(ratio, 0.4, 0.00431), rel=1e-12, abs=1e-18)
        p_ratio = min(max((step - 0.1 * total) / (0.88 * total), 0.0), 1.0)
        assert values["lam"] == pytest.approx(math.exp(math.log(0.01) * p_ratio), rel=1e-9)
    # continuous with a continuous slope at r = smooth; "linear" and smooth 0 are the plain ramp
    below, above = eps_schedule_factor("smooth", 0.4 - 1e-9, 0.4), eps_schedule_factor("smooth", 0.4, 0.4)
    assert below == pytest.approx(above, abs=1e-8) and eps_schedule_factor("smooth", 1.0, 0.4) == 1.0
    assert eps_schedule_factor("linear", 0.3) == eps_schedule_factor("smooth", 0.3, 0.0) == 0.3
    with pytest.raises(ValueError, match="eps_schedule.kind"):
        eps_schedule_factor("cosine", 0.3)


def test_end_to_end_on_the_tiny_imagenet_fixture(tmp_path):
    """launch.py trains the tiny config a few steps and evaluates; the API and the export certify the same
    points alike; the audit breaks no certificate."""
    import certjax
    from certjax import audit
    from certjax.data.sources import make_real_source
    from certjax.inference.export import export_model
    from tests.data64 import write_tiny_imagenet

    tiny = write_tiny_imagenet(tmp_path)
    workdir = tmp_path / "run"
    config = str(REPO / "configs/sortnet_hybrid.py") + ":tiny"
    done = run_launch(config, workdir, f"--config.data.real={tiny}", "--config.certify.eps=0.0005")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (workdir / "results.jsonl").exists()
    images, labels = make_real_source(str(tiny), "test", "tiny_imagenet").read(np.arange(0, 200, 10))
    model = certjax.restore(str(workdir), "last")
    ours = model.certify(images, labels=labels)
    assert not ours["robust_margin"].any() and np.all(ours["radius"] == 0)  # no margin certificate
    np.testing.assert_array_equal(ours["robust"], ours["robust_ibp"])
    export_model(model, str(tmp_path / "export"), platforms=("cpu",))
    exported = certjax.load_exported(str(tmp_path / "export"))
    theirs = exported.certify(images, labels=labels)
    assert set(theirs) == set(ours)
    for key in ours:
        np.testing.assert_array_equal(theirs[key], ours[key], err_msg=key)
    np.testing.assert_array_equal(exported.logits(images), model.logits(images))
    report = audit.audit_workdir(str(workdir), "last", limit=40, steps=10, restarts=1, targets=2)
    assert report["broken"] == 0 and report.get("broken_ibp", 0) == 0
    # no Lipschitz claim to probe (every pair bound inf): the audit does not flag the tanh head as unsound
    assert report["sound"] and report["lipschitz"]["max_ratio_to_bound"] == 0.0


def test_weight_decay_reaches_the_head_and_the_scale_but_not_the_distance_layers():
    """The original's AdamW decays every non-distance parameter (main.py's parameter groups): with a zero
    gradient one step moves exactly the head's and the scale's parameters, each by lr * wd * value."""
    from certjax.optim import make_optimizer
    from configs.sortnet_hybrid import get_config

    config = get_config("tiny")
    model = get_family("sortnet_hybrid").build(config.model, 200)
    params = model.init(jax.random.key(0), jnp.zeros((2, 64, 64, 3)), train=False)["params"]
    tx, schedule = make_optimizer(config.optimizer, total_steps=10, steps_per_epoch=10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    lr, wd = float(schedule(0)), config.optimizer.weight_decay
    for path, update in jax.tree_util.tree_flatten_with_path(updates)[0]:
        name = jax.tree_util.keystr(path)
        value = params
        for key in path:
            value = value[key.key]
        decayed = "HeadLinear" in name or "logit_scale" in name
        expected = -lr * wd * value if decayed else jnp.zeros_like(value)
        np.testing.assert_allclose(update, expected, rtol=1e-5, atol=1e-12, err_msg=name)
