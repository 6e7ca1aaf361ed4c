"""SortNet: the sort neuron against a brute-force sort, the dropout estimator against its expectation,
finite-difference gradients, 1-Lipschitz logits, and exact recomputation of running means."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from certjax.certify.margins import rounding_slack
from certjax.kernels.linf_dist import lp_distance, masked_lp_distance
from certjax.kernels.sort_neuron import sort_distance, sort_weights
from certjax.models.sortnet import SortNet, dropout_mask, float32_sort_weights


def brute_force_sort_neuron(x, w, q, max_terms=10):
    """Python sorted() in float64, the weights written out from the formula."""
    n = x.shape[1]
    terms = min(n, max_terms)
    coeffs = [q * (1 - q) ** k / (1 - (1 - q) ** terms) for k in range(terms)]
    out = np.zeros((x.shape[0], w.shape[0]))
    for b in range(x.shape[0]):
        for o in range(w.shape[0]):
            d = sorted((abs(float(x[b, i]) - float(w[o, i])) for i in range(n)), reverse=True)
            out[b, o] = sum(c * s for c, s in zip(coeffs, d[:terms], strict=True))
    return out


@pytest.mark.parametrize("n", [6, 25])  # K = n < 10 and K = 10 < n
@pytest.mark.parametrize("q", [0.3, 0.75, 0.85, 1.0])
def test_sort_neuron_matches_brute_force(n, q):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(5, n)).astype(np.float32)
    w = rng.normal(size=(70, n)).astype(np.float32)  # 70 outputs: two blocks of 64, one padded
    weights = jnp.asarray(sort_weights(q, n), jnp.float32)
    got = np.asarray(sort_distance(jnp.asarray(x), jnp.asarray(w), weights))
    np.testing.assert_allclose(got, brute_force_sort_neuron(x, w, q), rtol=1e-5, atol=1e-6)


def test_q1_is_the_linf_dist_neuron():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(8, 30)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(9, 30)), jnp.float32)
    weights = jnp.asarray(sort_weights(1.0, 30), jnp.float32)
    np.testing.assert_array_equal(sort_distance(x, w, weights), lp_distance(x, w, jnp.float32(jnp.inf)))


def test_float32_weights_sum_to_at_most_one():
    for q in (0.3, 0.75, 0.85, 0.99):
        for n in (3, 10, 5120):
            weights = float32_sort_weights(q, n)
            assert np.all(weights >= 0) and float(np.sum(weights.astype(np.float64))) <= 1.0


def test_dropout_estimator_matches_the_sort_neuron_in_expectation():
    """E[max over a random subset] with each coordinate kept w.p. q = sum_k q (1-q)^k s_k (untruncated).

    With n = 10 coordinates and K = n the sort neuron is the truncated series renormalised by
    1 - (1-q)^n; the all-dropped event (prob (1-q)^n) gives 0 in the estimator, so
    E[estimator] = (1 - (1-q)^n) * sort_neuron. 20,000 masks; tolerance 6 standard errors (the chance that
    a correct implementation fails is < 1e-8).
    """
    q, n, draws = 0.6, 10, 20_000
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(1, n)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, n)), jnp.float32)
    keep = jax.random.bernoulli(jax.random.key(0), q, (draws, n)).astype(jnp.float32)
    estimates = masked_lp_distance(jnp.repeat(x, draws, 0), w, keep, jnp.float32(jnp.inf))
    mean = np.asarray(estimates.mean(0))
    stderr = np.asarray(estimates.std(0)) / np.sqrt(draws)
    expected = (1 - (1 - q) ** n) * brute_force_sort_neuron(np.asarray(x), np.asarray(w), q)[0]
    assert np.all(np.abs(mean - expected) < 6 * stderr + 1e-6), (mean, expected, stderr)


def test_dropout_masks_share_one_subset_per_group_of_32():
    mask = np.asarray(dropout_mask(jax.random.key(3), 100, 200, 0.85))
    sizes = mask.sum(1)
    assert np.all(sizes == sizes[0])  # one Binomial size per layer and step
    assert 140 < sizes[0] < 200
    for start in range(0, 100, 32):
        group = mask[start : start + 32]
        assert np.all(group == group[0])
    assert not np.array_equal(mask[0], mask[32])


def test_exact_mode_gradients_match_finite_differences():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 14))
    w = rng.normal(size=(4, 14))
    q = 0.75
    weights = jnp.asarray(sort_weights(q, 14), jnp.float32)

    def total(x):
        return jnp.sum(sort_distance(x, jnp.asarray(w, jnp.float32), weights))

    grad = np.asarray(jax.grad(total)(jnp.asarray(x, jnp.float32)))
    h = 1e-4
    for b, i in [(0, 0), (1, 7), (2, 13), (0, 5)]:
        e = np.zeros_like(x)
        e[b, i] = h
        fd = (brute_force_sort_neuron(x + e, w, q).sum() - brute_force_sort_neuron(x - e, w, q).sum()) / (
            2 * h
        )
        assert abs(fd - grad[b, i]) < 1e-3, (b, i, fd, grad[b, i])


def _net(mode="exact"):
    model = SortNet(depth=4, width=40, num_classes=10, q=0.85, mode=mode)
    x = jax.random.normal(jax.random.key(0), (64, 4, 4, 3))
    variables = model.init(jax.random.key(1), x, jnp.float32(jnp.inf))
    _, updates = model.apply(
        variables,
        x,
        jnp.float32(jnp.inf),
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": jax.random.key(2)},
    )
    return model, {**variables, **updates}


@pytest.mark.parametrize("mode", ["exact", "dropout"])
def test_every_logit_is_1_lipschitz_in_linf(mode):
    model, variables = _net(mode)
    x = jax.random.normal(jax.random.key(5), (512, 4, 4, 3))
    scale = jnp.where(jnp.arange(512)[:, None, None, None] < 256, 0.01, 1.0)
    x2 = x + scale * jax.random.uniform(jax.random.key(6), x.shape, minval=-1, maxval=1)
    z1 = model.apply(variables, x, jnp.float32(jnp.inf)).logits
    z2 = model.apply(variables, x2, jnp.float32(jnp.inf)).logits
    distance = jnp.max(jnp.abs(x - x2).reshape(512, -1), axis=1)[:, None]
    assert bool(jnp.all(jnp.abs(z1 - z2) <= distance + rounding_slack(z1, z2) / 2))
    assert float((jnp.abs(z1 - z2) / distance).max()) > 0.3


def test_trainer_recomputes_running_means_exactly_for_dropout():
    from certjax.experiment import Experiment
    from certjax.optim import schedules
    from certjax.train import Trainer
    from configs.sortnet import get_config

    config = get_config("demo")
    config.model.depth, config.model.width = 3, 16
    config.train.batch_size, config.train.epochs = 64, 1
    config.data.real_subset = 192
    exp = Experiment(config)
    trainer = Trainer(exp)
    assert trainer.recalibrates_statistics
    state = exp.init_state()
    for step, batch in zip(range(3), exp.batches.iterate(0, 3), strict=True):
        values = {k: np.float32(v) for k, v in schedules.schedule_values(config, step, 3).items()}
        state, _ = trainer.train_step(state, exp.global_batch(batch), values)
    state = trainer.recalibrate(state)
    # independent: per-batch means of the first hidden layer's output, averaged by hand
    means = []
    for batch in exp.batches.iterate(0, exp.steps_per_epoch):
        x = exp.inputs(jnp.asarray(batch["image"])).reshape(len(batch["image"]), -1)
        y = lp_distance(x, state.params["DistLayer_0"]["kernel"], jnp.float32(jnp.inf))
        means.append(np.asarray(y.mean(0)))
    running = state.model_state["batch_stats"]["DistLayer_0"]["MeanShift_0"]["mean"]
    np.testing.assert_allclose(running, np.mean(means, axis=0), rtol=1e-5)


@pytest.mark.parametrize("variant", ["nodropout", "dropout"])
def test_pgd_never_breaks_a_certified_sortnet_point(variant):
    from configs.sortnet import get_config
    from tests.test_certify import audit_with_pgd, train_tiny

    audit_with_pgd(*train_tiny(get_config(f"demo,{variant}"), width=128, epochs=8))
