"""Losses against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from certjax.losses import margins, mixture


def test_mixture_loss_hand_computed():
    logits = jnp.array([[1.0, 0.8, -2.0], [0.0, 3.0, 0.5]])
    labels = jnp.array([0, 2])
    schedule = {"eps_train": jnp.float32(0.25), "lam": jnp.float32(0.1)}  # theta = 0.5
    scale = jnp.float32(2.0)
    got = np.asarray(mixture(logits, scale, labels, schedule, None))
    # example 0: smallest margin 1.0 - 0.8 = 0.2 -> hinge 1 - 0.2/0.5 = 0.6
    ce0 = -2.0 + math.log(math.exp(2.0) + math.exp(1.6) + math.exp(-4.0))
    # example 1: smallest margin 0.5 - 3.0 = -2.5 -> hinge clipped to 1
    ce1 = -1.0 + math.log(math.exp(0.0) + math.exp(6.0) + math.exp(1.0))
    np.testing.assert_allclose(got, [0.6 + 0.1 * ce0, 1.0 + 0.1 * ce1], rtol=1e-6)


def test_margins_mask_true_class_by_index_even_on_ties():
    logits = jnp.zeros((1, 4))
    m = np.asarray(margins(logits, jnp.array([2])))
    assert np.isinf(m[0, 2]) and np.all(m[0, [0, 1, 3]] == 0.0)


def test_v1_hinge_loss_hand_computed():
    from certjax.losses import hinge

    logits = jnp.array([[1.0, 0.8, -2.0], [0.0, 3.0, 0.5]])
    labels = jnp.array([0, 2])
    schedule = {"eps_train": jnp.float32(0.25)}  # u_j = z_j - z_y + 0.5, u_y = 0
    config = {"mix": 0.75, "bound": "lipschitz"}
    got = np.asarray(hinge(logits, jnp.float32(7.0), labels, schedule, config))
    # example 0: u = [0, 0.3, -2.5] -> relu [0, 0.3, 0]: 0.75 * 0.3 + 0.25 * 0.3 / 3
    # example 1: u = [0, 3.0, 0] (-0.5 + 0.5 = 0 for class 0): 0.75 * 3.0 + 0.25 * 3.0 / 3
    np.testing.assert_allclose(got, [0.75 * 0.3 + 0.25 * 0.1, 0.75 * 3.0 + 0.25 * 1.0], rtol=1e-6)


def test_v1_hinge_on_interval_bounds_hand_computed():
    from certjax.losses import hinge

    labels = jnp.array([1])
    lower = jnp.array([[-1.0, 0.5, -3.0, 0.0]])
    upper = jnp.array([[0.7, 2.0, -1.0, 0.4]])
    config = {"mix": 0.75, "bound": "ibp"}
    got = hinge(upper, None, labels, {"eps_train": 0.1}, config, logit_bounds=(lower, upper))
    # u_j = upper_j - lower_y (lower_y = 0.5) = [0.2, 0 (true class), -1.5, -0.1] -> relu [0.2, 0, 0, 0]
    np.testing.assert_allclose(np.asarray(got), [0.75 * 0.2 + 0.25 * 0.05], rtol=1e-5)


# ---------------------------------------------------------------------------------- exact EMMA (LiResNet++)


def _emma_exact_float64(logits, pair_bound, labels, eps):
    """hukkai/liresnet models/margin_layer.py emma_loss, transcribed in float64 numpy: (per-example loss,
    the detached fractions eps_i)."""
    z = np.asarray(logits, np.float64)
    gap = z - z[np.arange(len(z)), labels][:, None]
    bound = np.asarray(pair_bound, np.float64)[labels]
    fraction = np.clip(-gap / np.maximum(bound * eps, 1e-8), 0.01, 1.0)
    raised = gap + fraction * eps * bound
    top = raised.max(axis=1, keepdims=True)
    log_partition = top[:, 0] + np.log(np.exp(raised - top).sum(axis=1))
    return log_partition - raised[np.arange(len(z)), labels], fraction


def test_emma_exact_by_hand_hits_both_clip_bounds():
    from certjax.losses import emma_exact

    # true class 0; eps 0.5; m = [0, 1, 2, 4]; d = [0, -0.3, +0.2, -5]
    logits = jnp.array([[1.0, 0.7, 1.2, -4.0]])
    pair = jnp.array([[0.0, 1.0, 2.0, 4.0], [1.0, 0.0, 1.0, 1.0], [2.0, 1.0, 0.0, 1.0], [4.0, 1.0, 1.0, 0.0]])
    # class 1: 0.3 / (1 * 0.5) = 0.6 (inside);  class 2: -0.2 / 1.0 < 0 -> 0.01;  class 3: 5 / 2 -> 1
    # z' = [0, -0.3 + 0.6 * 0.5, 0.2 + 0.01 * 1.0, -5 + 1 * 2.0] = [0, 0, 0.21, -3]
    expected = math.log(1.0 + 1.0 + math.exp(0.21) + math.exp(-3.0))
    got = np.asarray(emma_exact(logits, pair, jnp.array([0]), {"eps_train": jnp.float32(0.5)}, None))
    np.testing.assert_allclose(got, [expected], rtol=1e-6)
    reference, fraction = _emma_exact_float64(logits, pair, np.array([0]), 0.5)
    np.testing.assert_allclose(fraction[0, 1:], [0.6, 0.01, 1.0])
    np.testing.assert_allclose(got, reference, rtol=1e-6)
    # eps = 0: the 1e-8 floor keeps the fractions finite and z' = d, plain cross-entropy
    plain = emma_exact(logits, pair, jnp.array([0]), {"eps_train": jnp.float32(0.0)}, None)
    expected_plain = math.log(1.0 + math.exp(-0.3) + math.exp(0.2) + math.exp(-5.0))
    np.testing.assert_allclose(np.asarray(plain), [expected_plain], rtol=1e-6)


def test_emma_exact_matches_float64_transcription_on_a_random_batch():
    from certjax.losses import emma_exact

    rng = np.random.default_rng(0)
    classes, batch = 10, 64
    rows = rng.normal(size=(classes, 6))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    pair = 1.7 * np.linalg.norm(rows[:, None] - rows[None], axis=-1)
    logits = rng.normal(scale=2.0, size=(batch, classes))
    labels = rng.integers(0, classes, batch)
    eps = 0.3
    got = emma_exact(jnp.asarray(logits, jnp.float32), jnp.asarray(pair, jnp.float32), jnp.asarray(labels),
                     {"eps_train": jnp.float32(eps)}, None)  # fmt: skip
    reference, fraction = _emma_exact_float64(logits, pair, labels, eps)
    np.testing.assert_allclose(np.asarray(got), reference, rtol=2e-5, atol=2e-6)
    wrong = ~np.eye(classes, dtype=bool)[labels]
    # the batch exercises both clip bounds and the inside
    assert np.any(fraction[wrong] == 0.01) and np.any(fraction[wrong] == 1.0)
    assert np.any((fraction[wrong] > 0.01) & (fraction[wrong] < 1.0))


def test_emma_exact_gradient_treats_eps_i_as_a_constant():
    """jax.grad equals the gradient of CE(z', y) with eps_i held fixed (closed form: dL/dz'_i = softmax(z')_i,
    z'_i = z_i - z_y + eps_i eps m_i), w.r.t. the logits and the pair bound, and differs from the gradient
    of the same formula with eps_i not detached."""
    from certjax.losses import emma_exact

    rng = np.random.default_rng(1)
    classes, batch = 5, 8
    rows = rng.normal(size=(classes, 4))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    pair = 2.0 * np.linalg.norm(rows[:, None] - rows[None], axis=-1)
    logits = rng.normal(size=(batch, classes))
    labels = rng.integers(0, classes, batch)
    eps = 0.4
    schedule = {"eps_train": jnp.float32(eps)}

    def mean_loss(z, p):
        return jnp.mean(emma_exact(z, p, jnp.asarray(labels), schedule, None))

    grad_z, grad_pair = jax.grad(mean_loss, argnums=(0, 1))(jnp.asarray(logits, jnp.float32),
                                                            jnp.asarray(pair, jnp.float32))  # fmt: skip

    _, fraction = _emma_exact_float64(logits, pair, labels, eps)
    gap = logits - logits[np.arange(batch), labels][:, None]
    raised = gap + fraction * eps * pair[labels]
    raised[np.arange(batch), labels] = 0.0
    soft = np.exp(raised - raised.max(1, keepdims=True))
    soft /= soft.sum(1, keepdims=True)
    is_true = np.eye(classes, dtype=bool)[labels]
    expected_z = np.where(is_true, -(soft * ~is_true).sum(1, keepdims=True), soft) / batch
    expected_pair = np.zeros_like(pair)
    np.add.at(expected_pair, labels, np.where(is_true, 0.0, soft * fraction * eps) / batch)
    np.testing.assert_allclose(np.asarray(grad_z), expected_z, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad_pair), expected_pair, atol=1e-6)

    # not detaching eps_i changes the gradient wherever it is inside its clip range: the test can tell
    def undetached(z, p):
        z_true = jnp.take_along_axis(z, jnp.asarray(labels)[:, None], axis=1)
        m = p[jnp.asarray(labels)]
        fraction = jnp.clip(-(z - z_true) / jnp.maximum(m * eps, 1e-8), 0.01, 1.0)
        raised = jnp.where(jnp.asarray(is_true), 0.0, z - z_true + fraction * eps * m)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(raised, jnp.asarray(labels)))

    inside = (fraction > 0.01) & (fraction < 1.0) & ~is_true
    assert inside.any()
    grad_z_undetached = jax.grad(undetached)(jnp.asarray(logits, jnp.float32), jnp.asarray(pair, jnp.float32))
    assert np.max(np.abs(np.asarray(grad_z_undetached) - expected_z)) > 1e-3


def test_eps_ramp_0_1_to_3_0_follows_the_original_eps_fn():
    """LiResNet++ (hukkai/liresnet train.py eps_fn, cifar10.yaml min_eps 0.1, max_eps 3.0): per epoch,
    eps * (0.1 + 2.9 * min(2 * epoch / epochs, 1)), expressed by config.loss.eps_ramp."""
    import ml_collections

    from certjax.optim import schedules

    epochs, steps_per_epoch, eps = 12, 5, 36 / 255
    config = ml_collections.ConfigDict(
        {
            "train": {"epochs": epochs},
            "loss": {"eps_train": eps, "eps_ramp": {"start": 0.1, "end": 3.0, "end_fraction": 0.5}},
        }
    )
    total = epochs * steps_per_epoch
    for step in range(total):
        epoch = step // steps_per_epoch
        original = eps * (0.1 + (3.0 - 0.1) * min(epoch / epochs * 2, 1))
        got = schedules.schedule_values(config, step, total)["eps_train"]
        assert got == pytest.approx(original, rel=1e-12)
