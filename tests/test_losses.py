"""Losses against hand-computed values."""

import math

import jax.numpy as jnp
import numpy as np

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
