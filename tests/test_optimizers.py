"""NAdam (torch's) and Lookahead (timm's, with the epoch-end sync) against float64 numpy transcriptions."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from certjax.optim import learning_rate_schedule, make_optimizer
from certjax.optim.lookahead import LookaheadState


def _params(rng):
    return {"conv": {"kernel": rng.normal(size=(3, 4))}, "head": {"bias": rng.normal(size=(5,))}}


def _as_f32(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in jax.tree.leaves(tree)])


def _run(tx, params, grads):
    """Params after each step, stepping as the trainer does (jitted update + optax.apply_updates)."""

    @jax.jit
    def step(params, opt_state, grad):
        updates, opt_state = tx.update(grad, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    out = []
    for grad in grads:
        params, opt_state = step(params, opt_state, grad)
        out.append((params, opt_state))
    return out


def _torch_nadam_float64(theta, grads, lrs, b1, b2, eps, psi, weight_decay, clip_norm):
    """torch.optim.NAdam's documented algorithm (torch/optim/nadam.py docstring), preceded by global-norm
    clipping as optax.clip_by_global_norm does it; theta and grads flat float64."""
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    mu_product = 1.0
    trajectory = []
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        norm = np.linalg.norm(g)
        g = g * (clip_norm / norm if norm > clip_norm else 1.0)
        g = g + weight_decay * theta
        mu_t = b1 * (1 - 0.5 * 0.96 ** (t * psi))
        mu_next = b1 * (1 - 0.5 * 0.96 ** ((t + 1) * psi))
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = mu_next * m / (1 - mu_product * mu_t * mu_next) + (1 - mu_t) * g / (1 - mu_product * mu_t)
        mu_product *= mu_t
        v_hat = v / (1 - b2**t)
        theta = theta - lr * m_hat / (np.sqrt(v_hat) + eps)
        trajectory.append(theta)
    return trajectory


def _opt_config(**overrides):
    config = dict(
        name="nadam", lr=1e-2, scale_lr=0.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
        schedule="cosine", warmup_epochs=1, clip_norm=3.0,
    )  # fmt: skip
    config.update(overrides)
    return ml_collections.ConfigDict(config)


@pytest.mark.parametrize("momentum_decay", [4e-3, 0.5])  # torch's default; one that moves mu_t fast
def test_nadam_matches_torch_algorithm_in_float64_and_differs_from_optax_nadam(momentum_decay):
    rng = np.random.default_rng(0)
    params = _params(rng)
    steps, steps_per_epoch = 12, 3
    # gradient norms from ~0.5 to ~8: some steps are clipped at 3
    grads = [
        jax.tree.map(lambda a: rng.normal(size=a.shape) * rng.uniform(0.1, 2.0), params) for _ in range(steps)
    ]
    config = _opt_config(weight_decay=0.05, momentum_decay=momentum_decay)
    tx, _ = make_optimizer(config, steps, steps_per_epoch)
    got = [_flat(p) for p, _ in _run(tx, _as_f32(params), _as_f32(grads))]

    lrs = [float(learning_rate_schedule(config, config.lr, steps, steps_per_epoch)(s)) for s in range(steps)]
    assert lrs[0] == 0.0 and lrs[3] == pytest.approx(1e-2)  # warmup, then cosine: the lr really varies
    hyper = dict(b1=0.9, b2=0.999, eps=1e-8, psi=momentum_decay, weight_decay=0.05, clip_norm=3.0)
    expected = _torch_nadam_float64(_flat(params), [_flat(g) for g in grads], lrs, **hyper)
    for step, (a, b) in enumerate(zip(got, expected)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6, err_msg=f"step {step + 1}")

    # optax.nadam (b1 in place of torch's warming mu_t) is measurably another optimiser on the same gradients
    plain = optax.chain(
        optax.clip_by_global_norm(3.0), optax.add_decayed_weights(0.05),
        optax.nadam(learning_rate_schedule(config, config.lr, steps, steps_per_epoch), b1=0.9, b2=0.999,
                    eps=1e-8),
    )  # fmt: skip
    other = [_flat(p) for p, _ in _run(plain, _as_f32(params), _as_f32(grads))]
    assert np.max(np.abs(other[-1] - expected[-1])) > 100 * (2e-5 * np.max(np.abs(expected[-1])) + 2e-6)


def _timm_lookahead_float64(theta, grads, lr, alpha, k, steps_per_epoch):
    """SGD inside timm.optim.Lookahead(alpha, k) (lookahead.py: slow buffer created as a copy of the fast
    weights at the first update_slow), plus hukkai/liresnet train.py's sync_lookahead() after every epoch's
    last step. Returns per step (fast, slow or None, synced this step)."""
    fast, slow = theta.copy(), None
    out = []

    def update_slow():
        nonlocal fast, slow
        if slow is None:
            slow = fast.copy()
        slow = slow + alpha * (fast - slow)
        fast = slow.copy()

    for step, g in enumerate(grads, start=1):
        fast = fast - lr * g
        synced = False
        if k and step % k == 0:  # Lookahead.step
            update_slow()
            synced = True
        if steps_per_epoch and step % steps_per_epoch == 0:  # sync_lookahead() at the epoch end
            update_slow()
            synced = True
        out.append((fast.copy(), None if slow is None else slow.copy(), synced))
    return out


@pytest.mark.parametrize("k", [3, 0])
def test_lookahead_synchronises_at_epoch_ends_and_every_k_steps(k):
    rng = np.random.default_rng(1)
    params = _params(rng)
    steps, steps_per_epoch, lr, alpha = 16, 5, 0.1, 0.5
    grads = [jax.tree.map(lambda a: rng.normal(size=a.shape), params) for _ in range(steps)]
    config = _opt_config(
        name="sgd", momentum=0.0, lr=lr, schedule="constant", warmup_epochs=0, clip_norm=0.0,
        lookahead=dict(alpha=alpha, k=k, sync_every_epoch=True),
    )  # fmt: skip
    tx, _ = make_optimizer(config, steps, steps_per_epoch)
    got = _run(tx, _as_f32(params), _as_f32(grads))
    expected = _timm_lookahead_float64(
        _flat(params), [_flat(g) for g in grads], lr, alpha, k, steps_per_epoch
    )

    sync_steps = {s for s in range(1, steps + 1) if s % steps_per_epoch == 0 or (k and s % k == 0)}
    assert sync_steps == {s for s, (_, _, synced) in enumerate(expected, start=1) if synced}
    previous_slow = None
    for step, ((params_now, state), (fast, slow, _)) in enumerate(zip(got, expected), start=1):
        assert isinstance(state, LookaheadState) and int(state.count) == step
        stored_slow = _flat(state.slow)
        np.testing.assert_allclose(_flat(params_now), fast, rtol=1e-5, atol=1e-6, err_msg=f"step {step}")
        if step in sync_steps:
            # fast == slow bitwise after the sync, and the slow weights are the formula's
            np.testing.assert_array_equal(_flat(params_now), stored_slow)
            np.testing.assert_allclose(stored_slow, slow, rtol=1e-5, atol=1e-6, err_msg=f"step {step}")
        elif previous_slow is not None:
            np.testing.assert_array_equal(stored_slow, previous_slow)  # no change between syncs
            assert np.max(np.abs(_flat(params_now) - stored_slow)) > 1e-3  # the fast weights moved on
        if step >= min(sync_steps):
            previous_slow = stored_slow
    # the slow weights really interpolate: after the second sync they differ from a plain SGD run
    plain = _flat(params) - lr * np.cumsum([_flat(g) for g in grads], axis=0)
    assert np.max(np.abs(_flat(got[-1][0]) - plain[-1])) > 1e-2


def test_lookahead_disabled_is_the_inner_optimiser_bitwise():
    rng = np.random.default_rng(2)
    params = _params(rng)
    grads = [jax.tree.map(lambda a: rng.normal(size=a.shape), params) for _ in range(4)]
    with_off = _opt_config(lookahead=dict(enabled=False, alpha=0.5, k=2, sync_every_epoch=True))
    without = _opt_config()
    a = _run(make_optimizer(with_off, 4, 2)[0], _as_f32(params), _as_f32(grads))
    b = _run(make_optimizer(without, 4, 2)[0], _as_f32(params), _as_f32(grads))
    np.testing.assert_array_equal(_flat(a[-1][0]), _flat(b[-1][0]))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"optimizer.name": "nadamw"}, "optimizer.name: 'nadamw'; use one of"),
        ({"optimizer.lookahead": {"alpha": 0.0, "k": 6}}, "optimizer.lookahead.alpha: 0.0; the slow"),
        ({"optimizer.lookahead": {"alpha": 1.5, "k": 6}}, "optimizer.lookahead.alpha: 1.5"),
        ({"optimizer.lookahead": {"alpha": 0.5, "k": -1}}, "optimizer.lookahead.k: -1"),
        ({"optimizer.lookahead": {"alhpa": 0.5}}, "optimizer.lookahead.alhpa: no such key"),
        ({"optimizer.lookahead": {"k": 0, "sync_every_epoch": False}}, "never synchronise"),
        ({"optimizer.name": "nadam", "optimizer.b2": 1.0}, "optimizer.b2: 1.0; NAdam's betas"),
        ({"optimizer.name": "nadam", "optimizer.momentum_decay": -1.0}, "optimizer.momentum_decay: -1.0"),
    ],
)
def test_bad_optimiser_values_are_config_errors_naming_the_fix(overrides, message):
    from certjax.config_checks import ConfigError, check_config
    from configs.liresnet import get_config

    config = get_config("XS,demo")
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        check_config(config)


def test_nadam_with_lookahead_is_a_valid_config():
    from certjax.config_checks import check_config
    from configs.liresnet import get_config

    config = get_config("XS,demo")
    config.optimizer.name = "nadam"
    config.optimizer.momentum_decay = 4e-3
    config.optimizer.lookahead = dict(alpha=0.5, k=6, sync_every_epoch=True)
    check_config(config)
