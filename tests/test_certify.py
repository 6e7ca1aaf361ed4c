"""Certification: the margin rule by hand, safe rounding, and an attack that never breaks a certificate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from certjax.attack import pgd
from certjax.certify.margins import linf_certify, pixel_radius_scale, smallest_margin
from certjax.certify.rounding import round_up_float32

STD = (0.2, 0.25, 0.3)


def test_linf_radius_hand_computed():
    logits = jnp.array([[3.0, 1.0, 2.0], [0.0, 1.0, 0.2], [5.0, 4.0, 0.0]])
    labels = jnp.array([0, 1, 0])
    out = linf_certify(logits, labels, eps=0.05, std=STD)
    # radius (pixels) = min_j (m_j - slack_j) / 2 * min(std), slack_j = 1e-5 (|z_y| + |z_j|) + 1e-5
    expected = [
        min(2 - 1e-5 * 4 - 1e-5, 1 - 1e-5 * 5 - 1e-5) / 2 * 0.2,
        min(1 - 1e-5 * 1 - 1e-5, 0.8 - 1e-5 * 1.2 - 1e-5) / 2 * 0.2,
        min(1 - 1e-5 * 9 - 1e-5, 5 - 1e-5 * 5 - 1e-5) / 2 * 0.2,
    ]
    np.testing.assert_allclose(out["radius"], expected, rtol=1e-6)
    np.testing.assert_array_equal(out["certified"], [True, True, True])
    out = linf_certify(logits, labels, eps=0.09, std=STD)
    np.testing.assert_array_equal(out["certified"], [True, False, True])


def test_misclassified_and_ties_are_never_certified():
    logits = jnp.array([[0.0, 0.0, 0.0], [1.0, 2.0, 0.0], [2.0, 2.0, 1.0]])
    labels = jnp.array([0, 0, 1])
    out = linf_certify(logits, labels, eps=0.0, std=STD)
    np.testing.assert_array_equal(out["certified"], [False, False, False])
    np.testing.assert_array_equal(out["radius"], [0.0, 0.0, 0.0])


def test_boundary_point_is_not_certified():
    # margin exactly 2 * eps in normalised units: the exact radius equals eps, so not certified.
    eps = 8 / 255
    std = (0.2009,) * 3
    margin = 2 * eps / 0.2009
    logits = jnp.array([[margin, 0.0]], jnp.float32)
    out = linf_certify(logits, jnp.array([0]), eps=eps, std=std)
    assert not bool(out["certified"][0])
    assert float(out["radius"][0]) <= eps


def test_rounding_helpers_round_the_safe_way():
    for value in (8 / 255, 36 / 255, 0.1, 1 / 3):
        assert float(round_up_float32(value)) >= value
    assert pixel_radius_scale(STD) <= 0.2


@pytest.fixture(scope="module")
def tiny_trained_model():
    """A small l_inf-dist Net trained for a few hundred steps on the embedded real CIFAR-10 sample."""
    from configs.linf_dist import get_config

    return train_tiny(get_config("demo"))


def train_tiny(config, *, depth=3, width=64, epochs=6):
    """Train a small model of any l_inf family on 1,024 embedded real images; returns (experiment, state)."""
    from certjax.experiment import Experiment
    from certjax.optim import schedules
    from certjax.train import Trainer

    config.model.depth = depth
    config.model.width = width
    config.train.batch_size = 128
    config.train.epochs = epochs
    config.data.real_subset = 1024
    config.p_schedule.start_fraction = 0.1
    config.p_schedule.end_fraction = 0.5
    # a small budget, so that a model this small and this briefly trained certifies enough points
    config.certify.eps = 2 / 255
    config.loss.eps_train = 6 / 255
    exp = Experiment(config)
    trainer = Trainer(exp)
    state = exp.init_state()
    batches = exp.batches.iterate(0, exp.total_steps)
    for step in range(exp.total_steps):
        values = schedules.schedule_values(config, step, exp.total_steps)
        batch = exp.global_batch(next(batches))
        state, _ = trainer.train_step(state, batch, {k: np.float32(v) for k, v in values.items()})
    if trainer.recalibrates_statistics:
        state = trainer.recalibrate(state)
    return exp, state


def test_pgd_never_breaks_a_certified_point(tiny_trained_model):
    audit_with_pgd(*tiny_trained_model)


def audit_with_pgd(exp, state):
    """PGD (50 steps, 2 restarts) against the certificates of a trained l_inf model."""
    config = exp.config
    images, labels = exp.sources.test.read(np.arange(0, 1000, 4))
    pixels = jnp.asarray(images, jnp.float32) / 255.0
    mean = jnp.asarray(config.data.mean)
    std = jnp.asarray(config.data.std)

    def logits_fn(x):
        return exp.model.apply(
            {"params": state.params, **state.model_state},
            (x - mean) / std,
            jnp.float32(jnp.inf),
            train=False,
        ).logits

    eps = config.certify.eps
    cert = exp.certifier.certify_batches(
        state.params, state.model_state, [{"image": images, "label": labels}]
    )
    assert cert["certified"].sum() >= 5, "the tiny model certifies too few points for a meaningful test"
    _, adv_margin = pgd(
        lambda _, x: logits_fn(x), None, pixels, jnp.asarray(labels), eps, jax.random.key(0),
        threat_model="linf", steps=50, restarts=2,
    )  # fmt: skip
    adv_margin = np.asarray(adv_margin)
    clean_margin = np.asarray(smallest_margin(logits_fn(pixels), jnp.asarray(labels)))
    # 1) no certified point is broken
    assert np.all(adv_margin[cert["certified"]] > 0)
    # 2) no margin drops by more than the Lipschitz bound allows: 2 * eps / min(std)
    bound = 2 * eps / float(min(config.data.std))
    assert np.all(clean_margin - adv_margin <= bound * (1 + 1e-4) + 1e-5)
    # 3) the attack is not idle: it lowers margins, and breaks some uncertified correct points if there are
    #    any (a tiny model that collapsed onto one class has none: its correct points are all certified)
    assert np.mean(clean_margin - adv_margin) > 0.1 * bound
    vulnerable = cert["correct"] & ~cert["certified"]
    if vulnerable.sum() >= 5:
        assert np.any((adv_margin <= 0) & vulnerable)


def _float64_logits(params, model_state, images_uint8, mean, std):
    """The l_inf-dist Net evaluated independently in numpy float64 (exact up to ~1e-16 relative)."""
    x = (images_uint8.astype(np.float64) / 255.0 - np.asarray(mean)) / np.asarray(std)
    h = x.reshape(len(x), -1)
    names = sorted((k for k in params if k.startswith("DistLayer_")), key=lambda k: int(k.split("_")[1]))
    for name in names:
        w = np.asarray(params[name]["kernel"], np.float64)
        h = np.max(np.abs(h[:, None, :] - w[None]), axis=-1)
        if "bias" in params[name]:
            h = h + np.asarray(params[name]["bias"], np.float64)
        stats = model_state.get("batch_stats", {}).get(name)
        if stats is not None:
            h = h - np.asarray(stats["MeanShift_0"]["mean"], np.float64)
    return -h


def test_rounding_bound_covers_the_exact_float64_logits(tiny_trained_model):
    exp, state = tiny_trained_model
    images, labels = exp.sources.test.read(np.arange(0, 1000, 5))
    batch = {"image": images, "label": labels}
    logits, logit_error = exp.certifier.eval_step(state.params, state.model_state, batch)
    mean, std = exp.config.data.mean, exp.config.data.std
    exact = _float64_logits(state.params, state.model_state, images, mean, std)
    deviation = np.abs(np.asarray(logits, np.float64) - exact).max(axis=1)
    bound = np.asarray(logit_error, np.float64)
    assert np.all(deviation <= bound), (deviation.max(), bound.min())
    assert bound.max() < 1e-3  # and the bound is small enough not to cost accuracy
    assert deviation.max() > 0  # float32 really did round: the comparison is not vacuous


def test_pair_lipschitz_matrix_rounds_up_and_ignores_the_diagonal():
    from certjax.certify.margins import pair_lipschitz_matrix

    rng = np.random.default_rng(0)
    bounds = rng.uniform(0.5, 2.0, (10, 10))  # float64: most values lie between two float32s
    k = pair_lipschitz_matrix(bounds)
    assert k.dtype == np.float32
    off = ~np.eye(10, dtype=bool)
    assert np.all(k[off].astype(np.float64) >= bounds[off])  # never below the float64 bound
    assert np.all(np.nextafter(k[off], np.float32(0)).astype(np.float64) < bounds[off])  # the least such
    assert np.all(np.diag(k) == 1.0) and bounds[0, 0] != 1.0  # the input is not modified


def test_a_nan_or_an_unbounded_margin_never_certifies():
    """inf / inf (a family claiming no margin bound, with an infinite forward error) and NaN logits give NaN
    ratios; XLA:CPU's min drops NaNs, so before the guard such a point came out with a radius of 3.4e38."""
    from certjax.certify.interval import ibp_certified
    from certjax.certify.margins import certify_from_margins, linf_certify

    logits = jnp.array([[3.0, 0.0, 0.0], [0.0, 5.0, jnp.nan]])
    labels = jnp.array([0, 1])
    out = certify_from_margins(logits, labels, jnp.full((2, 3), 2.0), 0.01, jnp.zeros(2), pixel_scale=0.2)
    assert out["radius"][0] > 0.01 and out["radius"][1] == 0.0 and not out["certified"][1]
    unbounded = np.full((3, 3), np.inf, np.float32)
    np.fill_diagonal(unbounded, 0.0)
    out = linf_certify(logits[:1], labels[:1], 0.01, (0.2, 0.2, 0.2), jnp.array([jnp.inf]), unbounded)
    assert out["radius"][0] == 0.0 and not out["certified"][0]
    assert list(ibp_certified(logits, logits - 0.1, logits + 0.1, labels)) == [True, False]
