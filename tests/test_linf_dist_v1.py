"""The l_inf-dist Net v1 recipe (zbh2047/L_inf-dist-net): its config, its l_p AdamW, its lr schedule, its
certification by margin / IBP / both, and the config errors around them."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from certjax.config_checks import ConfigError, check_config
from certjax.optim.optimizers import adamw_lp, lp_decay_direction


def test_v1_config_is_the_original_recipe_and_composes():
    from configs.linf_dist import get_config

    config = get_config("v1")
    assert (config.model.depth, config.model.width, config.train.batch_size) == (6, 5120, 512)
    assert config.optimizer.name == "adamw_lp" and config.optimizer.lr == 0.02
    assert config.optimizer.weight_decay == 5e-3 and (config.optimizer.b1, config.optimizer.b2) == (0.9, 0.99)
    assert config.optimizer.schedule == "hold_cosine" and config.optimizer.hold_fraction == 100 / 800
    assert config.loss.name == "hinge" and config.loss.mix == 0.75 and config.loss.eps_train == 0.1568
    assert (config.p_schedule.start_fraction, config.p_schedule.end_fraction) == (100 / 800, 750 / 800)
    assert (config.augment.pad, config.augment.pad_mode) == (4, "constant")
    assert config.certify.method == "both"
    assert get_config("v2").to_dict() == dict(get_config("").to_dict(), variant="v2")
    small = get_config("v1,demo,cifar100")
    assert small.loss.name == "hinge" and small.model.width == 256 and small.data.dataset == "cifar100"
    for variant in ("v1", "v2", "v1,cifar100", "v1,demo"):
        check_config(get_config(variant))
    with pytest.raises(ValueError, match="one of 'v1' and 'v2'"):
        get_config("v1,v2")


def test_lp_weight_decay_is_the_gradient_of_half_the_squared_row_norm():
    w = jax.random.normal(jax.random.key(0), (4, 9))
    for p in (2.0, 8.0, 50.0):
        grad = jax.grad(lambda w, p=p: 0.5 * jnp.sum(jnp.sum(jnp.abs(w) ** p, axis=1) ** (2 / p)))(w)
        np.testing.assert_allclose(lp_decay_direction(w, jnp.float32(p), 0.0), grad, rtol=2e-4, atol=1e-6)
    # p = inf: only each row's largest |w| decays; a one-element row (bias) decays plainly
    direction = np.asarray(lp_decay_direction(w, jnp.float32(jnp.inf), 0.0))
    largest = np.argmax(np.abs(np.asarray(w)), axis=1)
    np.testing.assert_array_equal(direction[np.arange(4), largest], np.asarray(w)[np.arange(4), largest])
    assert np.count_nonzero(direction) == 4
    bias = jnp.array([0.5, -2.0])
    np.testing.assert_allclose(lp_decay_direction(bias, jnp.float32(8.0), 1e-10), bias, rtol=1e-6)


def test_adamw_lp_step_by_hand():
    """One step against the original adamw.py's arithmetic: decay in place with lr * wd first, then the
    bias-corrected Adam step (eps added to sqrt(v_hat))."""
    lr, wd, b1, b2, eps = 0.02, 5e-3, 0.9, 0.99, 1e-10
    w = jnp.array([[1.0, -3.0, 2.0]])
    g = jnp.array([[0.1, 0.2, -0.3]])
    tx = adamw_lp(lr, b1, b2, eps, wd)
    updates, _ = tx.update(g, tx.init(w), w, p_norm=jnp.float32(jnp.inf))
    new = np.asarray(optax.apply_updates(w, updates))
    decayed = np.array([[1.0, -3.0 * (1 - lr * wd), 2.0]])  # only the largest |w| at p = inf
    m_hat = np.asarray(g)  # (1 - b1) g / (1 - b1)
    v_hat = np.asarray(g) ** 2
    expected = decayed - lr * m_hat / (np.sqrt(v_hat) + eps)
    np.testing.assert_allclose(new, expected, rtol=1e-6)


def test_hold_then_cosine_learning_rate():
    import ml_collections

    from certjax.optim import learning_rate_schedule

    config = ml_collections.ConfigDict(dict(schedule="hold_cosine", hold_fraction=0.125, warmup_epochs=0))
    schedule = learning_rate_schedule(config, 0.02, 800, 10)
    for step in (0, 50, 99, 100):
        assert float(schedule(step)) == pytest.approx(0.02)
    # main.py: 0.5 lr (1 + cos(pi (step - 100) / 700))
    for step in (250, 450, 799):
        expected = 0.01 * (1 + np.cos(np.pi * (step - 100) / 700))
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-4, abs=1e-8)


def test_bad_certify_method_and_ibp_for_an_l2_family_are_config_errors():
    from configs.linf_dist import get_config
    from configs.lot import get_config as lot_config

    config = get_config("demo")
    config.certify.method = "interval"
    with pytest.raises(ConfigError, match=r"certify.method 'interval'; use one of margin, ibp, both"):
        check_config(config)
    config = lot_config("S")
    config.certify.method = "ibp"
    with pytest.raises(
        ConfigError, match=r"interval bounds exist only for the l_inf families.*method=margin"
    ):
        check_config(config)
    config = lot_config("S")
    config.loss.bound = "ibp"
    with pytest.raises(ConfigError):
        check_config(config, unknown_keys=False)
    config = get_config("v1")
    config.loss.bound = "box"
    with pytest.raises(ConfigError, match=r"loss.bound: 'box'; use one of lipschitz, ibp"):
        check_config(config)


@pytest.mark.parametrize("family, seed", [("linf_dist", 0), ("sortnet", 1)])
def test_combined_certification_contains_the_margin_certification(family, seed):
    """Random networks (random weights and running means) on real test images: the IBP certificate is at
    least as strong as the margin one (each interval lies within logit +- eps), so combined = margin | IBP
    contains the margin's certified set, at eps and at every radius of the record."""
    import importlib

    from certjax.data import pipeline
    from certjax.evaluate import by_method_records, certified_accuracy_at, radii_of
    from certjax.experiment import Experiment

    config = importlib.import_module(f"configs.{family}").get_config("demo")
    config.model.depth, config.model.width = 3, 32
    config.seed = seed
    exp = Experiment(config, data="test")
    state = exp.init_state()
    key = jax.random.key(seed)
    model_state = jax.tree.map(lambda m: m + jax.random.normal(key, m.shape), state.model_state)
    batches = list(pipeline.eval_batches(exp.sources.test, 100, 300, seed=seed))
    # labels := the predictions, and eps := the median margin radius: half the points certify by the margin
    probe = exp.certifier.certify_batches(state.params, model_state, batches)
    batches = [dict(b, label=p) for b, p in zip(batches, np.split(probe["prediction"], 3), strict=True)]
    config.certify.eps = float(
        np.median(exp.certifier.certify_batches(state.params, model_state, batches)["radius"])
    )
    results = exp.certifier.certify_batches(state.params, model_state, batches, every_radius=True)
    margin, ibp, combined = results["certified_margin"], results["certified_ibp"], results["certified"]
    assert 0.2 < margin.mean() < 0.8
    np.testing.assert_array_equal(combined, margin | ibp)
    assert np.all(combined >= margin)
    # IBP alone proves every margin certificate that is not within rounding of the boundary
    clear = results["radius"] > config.certify.eps * (1 + 1e-3)
    assert np.all(ibp[clear])
    records = by_method_records(exp.certifier, results, radii_of(config))
    margin_at = certified_accuracy_at(results["correct"], results["radius"], radii_of(config))
    for radius, accuracy in records["certified_at"].items():
        assert accuracy >= margin_at[radius] and accuracy >= records["certified_at_ibp"][radius]
