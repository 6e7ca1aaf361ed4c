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
