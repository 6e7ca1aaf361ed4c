"""LiResNet (GloroNet): guaranteed layer bounds against dense operator norms, power iteration from below, the
network's empirical Lipschitz ratio, EMMA / GloRo-TRADES losses and the eps ramp by hand, l_2 certificates
against PGD and a float64 forward, and launch.py end to end."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from certjax.attack import pgd
from certjax.certify import norms
from certjax.certify.margins import smallest_margin
from certjax.losses import emma, gloro_trades
from certjax.models import liresnet
from certjax.models.common import lipschitz
from certjax.optim import schedules


def _dense_norm(fn, shape) -> float:
    """Largest singular value of the linear map fn at `shape`, from its exact Jacobian (float64 SVD)."""
    size = int(np.prod(shape))
    jac = jax.jit(jax.jacfwd(lambda v: fn(v.reshape(shape)).ravel()))(jnp.zeros(size, jnp.float32))
    return float(np.linalg.svd(np.asarray(jac, np.float64), compute_uv=False)[0])


def _residual_block(width=4, side=16, depth=2, scale=1.0, seed=0):
    """A LinearResidualConv whose V is `scale` / 3 times a unit-variance kernel: the merged conv's norm is
    ~4.2 (scale 1), ~1.9 (0.3) and ~1.03 (0.01, near the init's scale). Measured gaps of the bound: 0.4 %,
    0.5 %, 0.03 %."""
    block = liresnet.LinearResidualConv(width, depth)
    x = jnp.zeros((1, side, side, width))
    variables = block.init(jax.random.key(seed), x, train=False)
    params = dict(variables["params"])
    params["weight"] = scale * jax.random.normal(jax.random.key(seed + 1), params["weight"].shape) / 3.0
    params["affine"] = 1.0 + 0.2 * jax.random.normal(jax.random.key(seed + 2), params["affine"].shape)
    return block, {**variables, "params": params}, x.shape


def _merged_kernel(block, variables, shape):
    _, state = block.apply(variables, jnp.zeros(shape), train=False, mutable=[lipschitz.FROZEN])
    return state[lipschitz.FROZEN]["kernel"]


@pytest.mark.parametrize("seed,scale", [(0, 1.0), (1, 0.3), (2, 0.01)])
def test_merged_residual_conv_bound_is_above_and_within_1_percent_of_the_dense_norm(seed, scale):
    block, variables, shape = _residual_block(seed=seed, scale=scale)
    kernel = _merged_kernel(block, variables, shape)

    def operator(v):  # the block as applied, minus its bias (it is affine)
        return block.apply(variables, v, train=False)[0] - variables["params"]["bias"]

    true_norm = _dense_norm(operator, shape)
    bound = norms.conv_norm_bound(kernel, 1, 1, shape[1])
    assert true_norm <= bound
    assert bound <= 1.01 * true_norm, (bound, true_norm)
    if scale == 1.0:
        assert true_norm > 1.2  # a non-trivial merged kernel (not just the identity)


@pytest.mark.parametrize(
    "kernel_size,stride,padding,side,cin,cout",
    [(5, 2, 2, 16, 3, 8), (5, 2, 2, 8, 3, 16), (4, 4, 0, 8, 4, 8), (3, 1, 1, 6, 5, 3)],
)
def test_strided_conv_bounds_hold_against_the_dense_norm(kernel_size, stride, padding, side, cin, cout):
    """Stem (5x5/2, space-to-depth), neck (4x4/4, disjoint patches: exact) and a non-square 3x3."""
    kernel = jax.random.normal(jax.random.key(side + cin), (kernel_size, kernel_size, cin, cout))
    shape = (1, side, side, cin)
    true_norm = _dense_norm(lambda v: lipschitz.conv(v, kernel, stride, padding, "highest"), shape)
    bound = norms.conv_norm_bound(kernel, stride, padding, side)
    assert true_norm <= bound * (1 + 1e-6)  # float32 Jacobian entries are exact kernel values
    if stride == kernel_size:
        assert bound == pytest.approx(true_norm, rel=1e-6)
    else:
        assert bound <= 1.25 * true_norm  # boundary effects on tiny grids with random kernels


def test_power_iteration_converges_to_the_dense_norm_from_below():
    block, variables, shape = _residual_block(seed=3, side=8)
    kernel = _merged_kernel(block, variables, shape)
    true_norm = _dense_norm(lambda v: lipschitz.conv(v, kernel, 1, 1, "highest"), shape)

    def operator(v):
        return lipschitz.conv(v, kernel, 1, 1, "highest")

    @jax.jit
    def five_more(u):
        u = lipschitz.power_iteration(operator, u, 5)
        return u, jnp.linalg.norm(operator(u))

    u = jax.random.normal(jax.random.key(4), shape)
    estimates = []
    for _ in range(60):
        u, sigma = five_more(u)
        estimates.append(float(sigma))
    estimates = np.asarray(estimates)
    assert np.all(estimates <= true_norm * (1 + 1e-5))
    assert np.all(np.diff(estimates) >= -1e-5 * true_norm)  # Rayleigh quotients of A^T A never decrease
    assert estimates[0] < estimates[-1]
    assert estimates[-1] >= true_norm * (1 - 1e-3)

    # the layer itself: training steps warm-start from the stored vector and climb towards the same norm
    @jax.jit
    def training_step(state):
        (_, sigma, _), state = block.apply(
            {"params": variables["params"], **state}, jnp.zeros(shape), train=True, mutable=[lipschitz.POWER]
        )
        return sigma, state

    state = {lipschitz.POWER: variables[lipschitz.POWER]}
    layer_estimates = []
    for _ in range(30):
        sigma, state = training_step(state)
        layer_estimates.append(float(sigma))
    assert np.all(np.asarray(layer_estimates) <= true_norm * (1 + 1e-5))
    assert layer_estimates[-1] >= true_norm * (1 - 1e-3) > layer_estimates[0] * (1 - 1e-6)


@pytest.mark.parametrize("geometry", [(3, 1, 1, 8, 4), (5, 2, 2, 8, 3), (4, 4, 0, 8, 4), None])
def test_lanczos_stays_below_the_dense_norm_and_above_power_iteration(geometry):
    """The assumed figure's Lanczos (model.assumed_estimator "lanczos") on the merged residual conv, the
    stem's strided conv, the neck's patch conv and a dense layer: never above the exact norm, never below
    the power iteration after one step fewer from the same vector, and converged long before it."""
    key = jax.random.key(5)
    if geometry is None:  # the neck's dense layer
        kernel = jax.random.normal(key, (48, 16)) / 7.0
        shape, operator = (1, 48), lambda v: lipschitz.dense(v, kernel, "highest")
    else:
        size, stride, padding, side, channels = geometry
        kernel = jax.random.normal(key, (size, size, channels, 4)) / size
        if size == 3:  # near the identity, as the residual blocks: a clustered top of the spectrum
            kernel = lipschitz.dirac_kernel(4) + 0.05 * kernel
        shape = (1, side, side, channels)
        operator = lambda v: lipschitz.conv(v, kernel, stride, padding, "highest")  # noqa: E731
    true_norm = _dense_norm(operator, shape)
    u = jax.random.normal(jax.random.key(6), shape)

    def both(u, steps):
        ritz = lipschitz.lanczos_iterate(operator, u, steps)
        power = lipschitz.power_iteration(operator, u, steps - 1)
        return jnp.linalg.norm(operator(ritz)), jnp.linalg.norm(operator(power))

    for steps in (2, 4, 8, 16):
        lanczos, power = both(u, steps)
        assert float(lanczos) <= true_norm * (1 + 1e-5)
        assert float(lanczos) >= float(power) * (1 - 1e-5)
    assert float(lanczos) >= true_norm * (1 - 1e-4)  # converged after 16 steps


def test_certificate_bounds_by_lanczos_agree_with_long_power_iteration(tiny_trained_liresnet):
    exp, state, _ = tiny_trained_liresnet
    variables = {"params": state.params, **state.model_state}
    model = exp.model.clone(assumed_estimator="lanczos", eval_lanczos_steps=24)
    by_lanczos = liresnet.certificate_bounds(model, variables, (1, 32, 32, 3), bound_method="fast")["report"]
    power = model.clone(assumed_estimator="power", eval_iterations=1000)
    by_power = liresnet.certificate_bounds(power, variables, (1, 32, 32, 3), bound_method="fast")["report"]
    assert by_lanczos["assumed_estimator"] == "lanczos" and by_power["assumed_estimator"] == "power"
    for name, sigma in by_lanczos["layer_sigma_power"].items():
        assert sigma >= by_power["layer_sigma_power"][name] * (1 - 1e-5), name
        assert sigma <= by_lanczos["layer_sigma_bound"][name], name
    assert by_lanczos["lipschitz_body_assumed"] == pytest.approx(by_power["lipschitz_body_assumed"], rel=1e-3)


def _tiny_net(seed=0, noise=0.05):
    model = liresnet.LiResNet(depth=2, width=8, num_classes=10, neck_features=32, eval_iterations=300)
    variables = model.init(jax.random.key(seed), jnp.zeros((1, 32, 32, 3)))
    leaves, tree = jax.tree.flatten(variables["params"])
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [leaf + noise * jax.random.normal(key, leaf.shape) for leaf, key in zip(leaves, keys)]
    return model, {**variables, "params": jax.tree.unflatten(tree, leaves)}


def test_network_empirical_lipschitz_ratio_is_below_the_guaranteed_bound():
    model, variables = _tiny_net()
    bounds = liresnet.certificate_bounds(model, variables, (1, 32, 32, 3))
    report = bounds["report"]
    guaranteed, power = report["lipschitz_body_measured"], report["lipschitz_body_assumed"]
    assert power <= guaranteed <= 1.05 * power  # the estimate converged to within the FFT bound's slack
    for name, sigma in report["layer_sigma_power"].items():
        assert sigma <= report["layer_sigma_bound"][name]
    rng = np.random.default_rng(1)

    @jax.jit
    def features_and_logits(v):
        return model.apply(variables, v, return_features=True), model.apply(variables, v).logits

    x = rng.uniform(-0.5, 0.5, size=(64, 32, 32, 3)).astype(np.float32)
    distance_sets = []
    for y in (x + 1e-2 * rng.normal(size=x.shape), rng.uniform(-0.5, 0.5, size=x.shape)):
        y = y.astype(np.float32)
        distance = np.linalg.norm((x - y).reshape(64, -1).astype(np.float64), axis=1)
        fx, zx = (np.asarray(a, np.float64) for a in features_and_logits(x))
        fy, zy = (np.asarray(a, np.float64) for a in features_and_logits(y))
        ratio = np.linalg.norm(fx - fy, axis=1) / distance
        assert ratio.max() <= guaranteed, (ratio.max(), guaranteed)
        distance_sets.append(ratio.max())
        for c in range(10):  # every margin z_c - z_j respects its pairwise bound
            change = np.abs((zx[:, c : c + 1] - zx) - (zy[:, c : c + 1] - zy))
            allowed = bounds["pair_lipschitz"][c][None].astype(np.float64) * distance[:, None]
            assert np.all(change <= allowed * (1 + 1e-5) + 1e-6)
    assert max(distance_sets) > 0.01 * guaranteed  # the test exercises the network, not just zeros


def test_emma_loss_by_hand():
    logits = jnp.array([[2.0, 1.0, 0.5], [0.0, 0.3, 1.0]])
    labels = jnp.array([0, 2])
    pair = jnp.array([[0.0, 1.2, 2.0], [1.2, 0.0, 0.7], [2.0, 0.7, 0.0]])
    eps = 0.25
    got = np.asarray(emma(logits, pair, labels, {"eps_train": jnp.float32(eps)}, None))
    # example 0: z' = [2, 1 + 0.3, 0.5 + 0.5]; example 1: z' = [0 + 0.5, 0.3 + 0.175, 1.0]
    ce0 = -2.0 + math.log(math.exp(2.0) + math.exp(1.3) + math.exp(1.0))
    ce1 = -1.0 + math.log(math.exp(0.5) + math.exp(0.475) + math.exp(1.0))
    np.testing.assert_allclose(got, [ce0, ce1], rtol=1e-6)
    # eps = 0: plain cross-entropy
    plain = np.asarray(emma(logits, pair, labels, {"eps_train": jnp.float32(0.0)}, None))
    np.testing.assert_allclose(plain[0], -2.0 + math.log(math.exp(2.0) + math.exp(1.0) + math.exp(0.5)), 1e-6)


def test_gloro_trades_loss_is_ce_plus_kl_to_the_bottom_logit():
    import ml_collections

    logits = jnp.array([[2.0, 1.0, 0.5], [0.0, 0.3, 1.0]])
    labels = jnp.array([1, 2])
    pair = jnp.array([[0.0, 1.2, 2.0], [1.2, 0.0, 0.7], [2.0, 0.7, 0.0]])
    eps, lam = 0.25, 0.7
    config = ml_collections.ConfigDict({"trades_lambda": lam})
    got = np.asarray(gloro_trades(logits, pair, labels, {"eps_train": jnp.float32(eps)}, config))
    z = np.asarray(logits, np.float64)
    for b, expected_bottom in enumerate([max(1.0 + 0.3, 0.5 + 0.5), max(0.0 + 0.5, 0.3 + 0.175)]):
        p = np.exp(z[b]) / np.exp(z[b]).sum()  # prediction 0 then 2, as argmax
        augmented = np.append(z[b], expected_bottom)
        q = np.exp(augmented) / np.exp(augmented).sum()
        kl = np.sum(p * np.log(p / q[:3]))  # the bottom class has probability 0 under p
        ce = -np.log(p[int(labels[b])])
        assert got[b] == pytest.approx(ce + lam * kl, rel=1e-5)


def test_eps_ramp_is_0_1_to_1_5_eps_over_the_first_half_per_epoch():
    from configs.liresnet import get_config

    config = get_config("XS")
    config.train.epochs = 10
    steps_per_epoch = 7
    total = 10 * steps_per_epoch
    eps = 36 / 255

    def eps_at(epoch, within=0):
        return schedules.schedule_values(config, epoch * steps_per_epoch + within, total)["eps_train"]

    assert eps_at(0) == pytest.approx(0.1 * eps)
    assert eps_at(0, 6) == pytest.approx(0.1 * eps)  # constant within an epoch (the snapshot's eps_fn)
    assert eps_at(1) == pytest.approx(eps * (0.1 + 1.4 * 2 / 10))
    assert eps_at(5) == pytest.approx(1.5 * eps)
    assert eps_at(9, 6) == pytest.approx(1.5 * eps)


@pytest.fixture(scope="module")
def tiny_trained_liresnet():
    """LiResNet at width 16, depth 2, trained for 8 epochs on 1,024 embedded real CIFAR-10 images."""
    from certjax.experiment import Experiment
    from certjax.train import Trainer
    from configs.liresnet import get_config

    config = get_config("XS,demo")
    config.train.epochs = 8
    config.data.real_subset = 1024
    config.model.eval_power_iterations = 200
    exp = Experiment(config)
    trainer = Trainer(exp)
    state = exp.init_state()
    initial_vectors = jax.tree.map(np.asarray, state.model_state[lipschitz.POWER])
    batches = exp.batches.iterate(0, exp.total_steps)
    for step in range(exp.total_steps):
        values = schedules.schedule_values(config, step, exp.total_steps)
        state, _ = trainer.train_step(
            state, exp.global_batch(next(batches)), {k: np.float32(v) for k, v in values.items()}
        )
    return exp, state, initial_vectors


def test_training_updates_the_power_iteration_vectors(tiny_trained_liresnet):
    exp, state, initial = tiny_trained_liresnet
    final = state.model_state[lipschitz.POWER]
    for name, value in initial.items():
        assert not np.allclose(np.asarray(final[name]["u"]), value["u"])
        assert np.linalg.norm(np.asarray(final[name]["u"])) == pytest.approx(1.0, rel=1e-4)  # normalised


def test_pgd_l2_never_breaks_a_certified_liresnet_point(tiny_trained_liresnet):
    exp, state, _ = tiny_trained_liresnet
    config = exp.config
    images, labels = exp.sources.test.read(np.arange(0, 1000, 4))
    pixels = jnp.asarray(images, jnp.float32) / 255.0
    mean, std = jnp.asarray(config.data.mean), jnp.asarray(config.data.std)
    variables = {"params": state.params, **state.model_state}

    def logits_fn(x):
        return exp.model.apply(variables, (x - mean) / std).logits

    eps = config.certify.eps
    cert = exp.certifier.certify_batches(
        state.params, state.model_state, [{"image": images, "label": labels}]
    )
    report = exp.certifier.last_bounds_report
    assert cert["certified"].sum() >= 5, "the tiny model certifies too few points for a meaningful test"
    assert report["lipschitz_body_assumed"] <= report["lipschitz_body_measured"]
    assert np.all(cert["certified"] <= cert["certified_assumed"])  # the guaranteed K is the larger
    # attack every certified point and 16 correct uncertified ones (the attack must break some of those)
    vulnerable = np.flatnonzero(cert["correct"] & ~cert["certified"])[:16]
    chosen = np.concatenate([np.flatnonzero(cert["certified"]), vulnerable])
    pixels, labels = pixels[chosen], jnp.asarray(labels[chosen])
    certified = cert["certified"][chosen]
    _, adv_margin = pgd(
        lambda _, x: logits_fn(x), None, pixels, labels, eps, jax.random.key(0),
        threat_model="l2", steps=100, restarts=3,
    )  # fmt: skip
    adv_margin = np.asarray(adv_margin)
    clean_margin = np.asarray(smallest_margin(logits_fn(pixels), labels))
    assert np.all(adv_margin[certified] > 0)
    # no margin drops by more than the largest pairwise bound allows: K * max ||w_i - w_j|| <= 2 K
    largest = 2.0 * report["lipschitz_body_measured"]
    assert np.all(clean_margin - adv_margin <= largest * eps * (1 + 1e-4) + 1e-5)
    assert np.mean(clean_margin - adv_margin) > 0.05 * largest * eps  # the attack does work
    if len(vulnerable) >= 5:
        assert np.any(adv_margin[~certified] <= 0)


def _conv64(x, kernel, stride, padding):
    """Direct cross-correlation in float64 numpy, PyTorch geometry."""
    k = kernel.shape[0]
    x = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    side = (x.shape[1] - k) // stride + 1
    out = np.zeros((x.shape[0], side, side, kernel.shape[-1]))
    for a1 in range(k):
        for a2 in range(k):
            patch = x[:, a1 : a1 + stride * side : stride, a2 : a2 + stride * side : stride]
            out += patch @ kernel[a1, a2]
    return out


def _float64_logits(model, params, frozen, images_uint8, mean, std):
    """LiResNet in float64 numpy with the kernels as applied (the frozen collection)."""

    def max_min(h):
        a, b = np.split(h, 2, axis=-1)
        return np.concatenate([np.maximum(a, b), np.minimum(a, b)], axis=-1)

    def kernel(name):
        return np.asarray(frozen[name]["kernel"], np.float64)

    def bias(name):
        return np.asarray(params[name]["bias"], np.float64)

    h = (images_uint8.astype(np.float64) / 255.0 - np.asarray(mean)) / np.asarray(std)
    h = max_min(_conv64(h, kernel("stem"), 2, 2) + bias("stem"))
    for i in range(model.depth):
        h = max_min(_conv64(h, kernel(f"block{i + 1}"), 1, 1) + bias(f"block{i + 1}"))
    h = max_min(_conv64(h, kernel("neck_conv"), 4, 0) + bias("neck_conv"))
    h = max_min(h.reshape(len(h), -1) @ kernel("neck_linear") + bias("neck_linear"))
    rows = np.asarray(params["head"]["kernel"], np.float64)
    rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return h @ rows.T + bias("head"), rows


def test_rounding_allowance_covers_the_float64_logits(tiny_trained_liresnet):
    exp, state, _ = tiny_trained_liresnet
    images, labels = exp.sources.test.read(np.arange(0, 1000, 5))
    bounds = exp.certifier.certificate_bounds(state.params, state.model_state)
    logits, logit_error = exp.certifier.eval_step(
        state.params,
        {**state.model_state, **bounds["variables"]},
        {"image": images, "label": labels},
        np.float32(bounds["input_error_gain"]),
    )
    exact, rows = _float64_logits(
        exp.model,
        state.params,
        bounds["variables"][lipschitz.FROZEN],
        images,
        exp.config.data.mean,
        exp.config.data.std,
    )
    logits = np.asarray(logits, np.float64)
    bound = np.asarray(logit_error, np.float64)
    # every margin z_c - z_j may move by up to 2 * logit_error (what the certifier subtracts)
    margins, exact_margins = logits[:, :, None] - logits[:, None, :], exact[:, :, None] - exact[:, None, :]
    deviation = np.max(np.abs(margins - exact_margins), axis=(1, 2))
    assert deviation.max() > 0
    assert np.all(deviation <= 2 * bound), (deviation.max(), bound.min())
    # and the logit vector by up to the head's norm times the body's allowance plus the head's own
    assert np.all(np.linalg.norm(logits - exact, axis=1) <= np.linalg.norm(rows, 2) * bound)
    assert bound.max() < 1e-3  # float64 body: the float32 head dominates
    # the frozen kernels give the same logits as the merged kernels on the fly
    fresh = exp.model.apply(
        {"params": state.params, **state.model_state},
        (images / 255.0 - np.asarray(exp.config.data.mean)) / np.asarray(exp.config.data.std),
    ).logits
    np.testing.assert_allclose(np.asarray(fresh), logits, atol=1e-5)


def test_launch_trains_and_evaluates_liresnet_with_guaranteed_and_power_bounds(tmp_path):
    import json

    from tests.conftest import run_launch

    workdir = tmp_path / "liresnet"
    result = run_launch(
        "configs/liresnet.py:XS,demo",
        workdir,
        "--config.model.width=8",
        "--config.model.neck_features=32",
        "--config.model.eval_power_iterations=50",
        "--config.train.epochs=2",
        "--config.train.batch_size=64",
        "--config.data.real_subset=256",
        "--config.train.eval_batch_size=250",
        mode="train_and_evaluate",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "measured Lipschitz bound of the body" in result.stdout
    (record,) = [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]
    assert record["family"] == "liresnet" and record["eps"] == pytest.approx(36 / 255)
    lipschitz = record["lipschitz"]
    assert lipschitz["lipschitz_body_assumed"] <= lipschitz["lipschitz_body_measured"]
    assert set(lipschitz["layer_sigma_bound"]) == {"stem", "block1", "block2", "neck_conv", "neck_linear"}
    assert lipschitz["assumed_estimator"] == "lanczos" and lipschitz["eval_lanczos_steps"] == 24
    assert 0.0 <= record["certified_accuracy"] <= record["certified_accuracy_assumed"]
    assert record["certified_accuracy_assumed"] <= record["clean_accuracy"] <= 1.0
    radii = np.load(record["radii_path"])
    assert np.all(radii["certified_radius"][radii["certified"]] > record["eps"])


def test_emma_gradient_equals_the_plain_xla_convolution_path(monkeypatch):
    """The chunked kernel gradient (certjax/kernels/conv.py) changes only the summation order: the loss
    gradient of a whole LiResNet matches the one through XLA's own convolution gradient (the previous
    implementation) to float32 rounding, <= 1e-4 of each leaf's largest entry (rounding differences are
    amplified a little through the MinMax and power-iteration steps; they are ~1e-6 per convolution)."""
    model = liresnet.LiResNet(depth=2, width=8, neck_features=16, num_classes=10)
    images = jax.random.uniform(jax.random.key(1), (6, 32, 32, 3), minval=-0.5, maxval=0.5)
    labels = jnp.arange(6) % 10
    variables = model.init(jax.random.key(0), images[:1])
    params, state = variables["params"], {lipschitz.POWER: variables[lipschitz.POWER]}

    def gradient():
        def loss(params):
            output, _ = model.apply(
                {"params": params, **state}, images, train=True, mutable=[lipschitz.POWER]
            )
            return jnp.mean(emma(output.logits, output.pair_bound, labels, {"eps_train": 0.3}, None))

        return jax.jit(jax.grad(loss))(params)

    fast = gradient()

    def xla_conv(x, kernel, stride, padding, precision=None):
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            (stride, stride),
            ((padding, padding),) * 2,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=precision,
        )

    monkeypatch.setattr(lipschitz, "conv2d", xla_conv)  # the conv the LiResNet layers call
    previous = gradient()
    for path, value in jax.tree_util.tree_leaves_with_path(previous):
        new = jax.tree_util.tree_leaves_with_path(fast)
        actual = dict(new)[path]
        scale = float(jnp.max(jnp.abs(value)))
        assert float(jnp.max(jnp.abs(actual - value))) <= 1e-4 * scale, path
