"""LiResNet++ (CHORD): the Cholesky orthogonalisation against its float64 definition and finite differences,
the centred block against its batch-mean definition, every layer's guaranteed bound against the exact dense
operator norm of the layer as applied, the whole network's empirical Lipschitz ratio (gradient ascent) under
the guaranteed bound, and a tiny net trained by launch.py: PGD through the audit breaks no certificate and
the rounding allowance covers a float64 numpy forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from certjax.models import liresnet, liresnet_pp
from certjax.models.common import cholesky, chord, lipschitz
from tests.test_liresnet import _conv64

# ------------------------------------------------------------------------------ Cholesky orthogonalisation


def _orthogonalize64(weight, eps=None):
    """L^{-1} W in float64 numpy, L = chol(W W^T + eps I), eps = mean(diag(W W^T)) / 1000 unless given."""
    weight = np.asarray(weight, np.float64)
    gram = weight @ weight.T
    eps = np.mean(np.diag(gram)) * 1e-3 if eps is None else eps
    lower = np.linalg.cholesky(gram + eps * np.eye(len(gram)))
    return np.linalg.solve(lower, weight), eps


def _random_weights():
    rng = np.random.default_rng(0)
    square = np.eye(48) + rng.normal(size=(48, 48)) / 48 * 3.0  # CHORD's I + V gamma / sqrt(n)
    wide = rng.normal(size=(24, 96))  # the neck: rows fewer than columns
    tall = rng.normal(size=(64, 16))  # a tiny width's neck dense layer: rank 16 < 64 rows
    skewed = rng.normal(size=(32, 32)) * np.logspace(0, 3, 32)[None, :]  # ill-conditioned columns
    return {"square": square, "wide": wide, "tall": tall, "skewed": skewed}


@pytest.mark.parametrize("name", ["square", "wide", "tall", "skewed"])
def test_cholesky_orthogonalisation_is_a_contraction_equal_to_its_float64_definition(name):
    weight = _random_weights()[name].astype(np.float32)
    got = np.asarray(jax.jit(cholesky.cholesky_orthogonalize)(weight), np.float64)
    expected, eps = _orthogonalize64(weight)
    singular = np.linalg.svd(got, compute_uv=False)
    assert singular[0] <= 1 + 1e-5, singular[0]
    np.testing.assert_allclose(got, expected, atol=2e-4 * np.abs(expected).max())
    # exact arithmetic: singular values s / sqrt(s^2 + eps) of W (module docstring)
    s = np.linalg.svd(np.asarray(weight, np.float64), compute_uv=False)
    predicted = np.sort(np.concatenate([s / np.sqrt(s**2 + eps), np.zeros(len(got) - len(s))]))[::-1]
    np.testing.assert_allclose(singular[: len(predicted)], predicted[: len(singular)], atol=1e-4)
    if name in ("square", "wide"):  # well conditioned: rows orthonormal up to the regulariser
        assert singular[-1] > 0.97


def test_cholesky_orthogonalisation_is_batched():
    weights = np.stack([_random_weights()["square"], np.eye(48) * 3.0]).astype(np.float32)
    got = np.asarray(cholesky.cholesky_orthogonalize(weights))
    for w, g in zip(weights, got):
        np.testing.assert_allclose(g, _orthogonalize64(w)[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[1], np.eye(48) / np.sqrt(1 + 1e-3), rtol=1e-6)  # 3 I -> I / sqrt(1.001)


@pytest.mark.parametrize("name", ["wide", "tall"])
def test_cholesky_gradient_matches_float64_finite_differences(name):
    """The gradient treats the regulariser eps as a constant (the original's `.item()` / hand-written
    backward): central differences of the float64 numpy map with eps frozen at the base point."""
    weight = _random_weights()[name][:16, :24] if name == "wide" else _random_weights()[name][:24, :8]
    rng = np.random.default_rng(1)
    cotangent = rng.normal(size=weight.shape)
    _, eps = _orthogonalize64(weight)
    with jax.enable_x64(True):
        grad = jax.grad(lambda w: jnp.sum(cholesky.cholesky_orthogonalize(w) * cotangent))(
            jnp.asarray(weight)
        )
        grad = np.asarray(grad, np.float64)
    assert grad.dtype == np.float64 and np.abs(grad).max() > 0
    step = 1e-6
    for _ in range(6):
        direction = rng.normal(size=weight.shape)
        plus = np.sum(_orthogonalize64(weight + step * direction, eps)[0] * cotangent)
        minus = np.sum(_orthogonalize64(weight - step * direction, eps)[0] * cotangent)
        numeric = (plus - minus) / (2 * step)
        assert np.sum(grad * direction) == pytest.approx(numeric, rel=1e-6, abs=1e-8)


def test_cholesky_rejects_a_vector():
    with pytest.raises(ValueError, match=r"matrix \[..., m, n\]"):
        cholesky.cholesky_orthogonalize(jnp.ones(5))


# -------------------------------------------------------------------------------------------- centred block


def _random_variables(module, inputs, seed: int, **kwargs):
    """Variables of the module's structure filled from numpy (no PRNG compilation: fast on CPU): weights
    N(0, 0.1^2), per-channel scales 1 + N(0, 0.3^2), biases N(0, 0.1^2), running means 0.2 + N(0, 0.1^2),
    power-iteration vectors N(0, 1)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), inputs, **kwargs))

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        noise = rng.normal(size=leaf.shape).astype(np.float32)
        if "gamma" in name:
            return jnp.asarray(1.0 + 0.3 * noise)
        if lipschitz.POWER in name:
            return jnp.asarray(noise)
        if "batch_stats" in name:
            return jnp.asarray(0.2 + 0.1 * noise)
        return jnp.asarray(0.1 * noise)

    return jax.tree_util.tree_map_with_path(fill, dict(shapes))


def _centred_block(width=8, side=8, seed=0):
    block = liresnet_pp.CentredResidualConv(width, depth=4)
    x = jnp.asarray(np.random.default_rng(seed).normal(size=(6, side, side, width)), jnp.float32)
    variables = _random_variables(block, x[:1], seed + 1, train=False)
    variables["params"]["weight"] = variables["params"]["weight"] * 2.0  # a merged kernel far from I
    return block, variables, x


def test_centred_block_training_output_equals_its_definition_and_evaluation_with_the_batch_mean():
    block, variables, x = _centred_block()
    params = variables["params"]
    old_mean = np.full(8, 0.25, np.float32)
    variables = {**variables, "batch_stats": {"mean": jnp.asarray(old_mean)}}
    train_apply = jax.jit(lambda v: block.apply(v, x, train=True, mutable=["batch_stats", lipschitz.POWER]))
    eval_apply = jax.jit(lambda v: block.apply(v, x, train=False)[0])
    (y_train, _, _), updates = train_apply(variables)
    # definition (blocks.py LiResConv, training): x + conv_V(x) - mean(conv_V(x)) + bias, float64
    x64 = np.asarray(x, np.float64)
    residual_kernel = np.asarray(params["weight"] * params["gamma"], np.float64) / 2.0  # 1 / sqrt(depth 4)
    residual = _conv64(x64, residual_kernel, 1, 1)
    batch_mean = residual.mean(axis=(0, 1, 2))
    expected = x64 + residual - batch_mean + np.asarray(params["bias"], np.float64)
    np.testing.assert_allclose(np.asarray(y_train), expected, atol=1e-5)
    # running mean: momentum 0.1
    np.testing.assert_allclose(
        np.asarray(updates["batch_stats"]["mean"]), 0.9 * old_mean + 0.1 * batch_mean, atol=1e-6
    )
    # evaluation with the exact batch mean as the running mean gives the training output
    exact = {**variables, "batch_stats": {"mean": jnp.asarray(batch_mean, jnp.float32)}}
    y_eval = eval_apply(exact)
    np.testing.assert_allclose(np.asarray(y_eval), np.asarray(y_train), atol=1e-5)
    # ... and with another running mean, a different constant shift
    y_old = eval_apply(variables)
    np.testing.assert_allclose(
        np.asarray(y_old - y_eval), np.broadcast_to(batch_mean - old_mean, x.shape), atol=1e-5
    )


def test_centred_block_keeps_the_batch_mean_in_the_gradient():
    """The original subtracts the undetached mean: the per-channel sum of the output over the batch is then
    x's sum + N bias whatever V is, so its gradient w.r.t. V and gamma is 0. With a constant mean (the
    running mean at evaluation, as a detached batch mean would act) it is not."""
    block, variables, x = _centred_block(seed=5)
    others = {k: v for k, v in variables.items() if k != "params"}
    channel_weights = jnp.arange(1.0, 9.0)  # a different weight per channel

    @jax.jit
    def gradients(params):
        def total(params, train):
            (y, _, _), _ = block.apply(
                {**others, "params": params}, x, train=train, mutable=["batch_stats", lipschitz.POWER]
            )
            return jnp.sum(y * channel_weights)

        return jax.grad(total)(params, True), jax.grad(total)(params, False)

    centred, constant_mean = gradients(variables["params"])
    scale = float(jnp.max(jnp.abs(constant_mean["weight"])))
    assert scale > 1.0
    assert float(jnp.max(jnp.abs(centred["weight"]))) <= 1e-5 * scale
    assert float(jnp.max(jnp.abs(centred["gamma"]))) <= 1e-5 * scale
    np.testing.assert_allclose(np.asarray(centred["bias"]), channel_weights * x[..., 0].size, rtol=1e-6)


# ---------------------------------------------------------------------------------------- tiny whole net

SIDE = 8  # stem 8 -> 4, blocks at 4 x 4, the neck conv 4 -> 1: every bound on a grid small enough to be dense


@pytest.fixture(scope="module")
def tiny():
    """A tiny LiResNet++ (random parameters, nonzero running means) on 8 x 8 inputs and its bounds."""
    model = liresnet_pp.LiResNetPP(depth=2, width=8, num_classes=10, neck_features=32, mlp_depth=2)
    variables = _random_variables(model, jnp.zeros((1, SIDE, SIDE, 3)), 0)
    bounds = liresnet_pp.certificate_bounds(model, variables, image_shape=(1, SIDE, SIDE, 3))
    return model, variables, bounds


def test_every_layer_bound_is_above_the_dense_norm_of_the_layer_as_applied(tiny):
    """Each layer's linear part as the module applies it with the frozen weights (biases and running means
    zeroed), against the certificate's bound: above it, and equal for the exact SVDs."""
    model, variables, bounds = tiny
    frozen, sigmas = bounds["variables"][lipschitz.FROZEN], bounds["report"]["layer_sigma_bound"]
    assert set(sigmas) == {"stem", "block1", "block2", "neck_conv", "neck_linear", "mlp1", "mlp2"}
    half = SIDE // 2
    modules = {
        "stem": (lipschitz.LipschitzConv(8, 5, 2, 2), (1, SIDE, SIDE, 3)),
        "block1": (liresnet_pp.CentredResidualConv(8, 2), (1, half, half, 8)),
        "block2": (liresnet_pp.CentredResidualConv(8, 2), (1, half, half, 8)),
        "neck_conv": (chord.CholeskyConv(8), (1, half, half, 8)),
        "neck_linear": (chord.CholeskyDense(32), (1, 8 * (half // 4) ** 2)),
        "mlp1": (chord.CholeskyDense(32, 2), (1, 32)),
        "mlp2": (chord.CholeskyDense(32, 2), (1, 32)),
    }
    layer_variables = {}
    for name in modules:
        params = dict(variables["params"][name])
        if "bias" in params:
            params["bias"] = jnp.zeros_like(params["bias"])
        layer_variables[name] = {"params": params, lipschitz.FROZEN: frozen[name]}
        if name.startswith("block"):
            layer_variables[name]["batch_stats"] = jax.tree.map(
                jnp.zeros_like, variables["batch_stats"][name]
            )

    @jax.jit
    def matrices(layer_variables):  # every layer applied to every unit vector of its input (one compile)
        out = {}
        for name, (module, shape) in modules.items():
            size = int(np.prod(shape))
            basis = jnp.eye(size, dtype=jnp.float32).reshape((size,) + shape[1:])
            out[name] = module.apply(layer_variables[name], basis, train=False)[0].reshape(size, -1)
        return out

    for name, matrix in matrices(layer_variables).items():
        # each output sums one nonzero product: exact in float32; exact float64 SVD
        true_norm = float(np.linalg.svd(np.asarray(matrix, np.float64), compute_uv=False)[0])
        assert true_norm <= sigmas[name], (name, true_norm, sigmas[name])
        if name in ("neck_conv", "neck_linear", "mlp1", "mlp2"):  # exact SVDs of Cholesky-orthogonal weights
            assert sigmas[name] == pytest.approx(true_norm, rel=1e-5)
            assert true_norm <= 1 + 1e-5
        else:
            assert sigmas[name] <= 1.5 * true_norm  # the FFT bound on a 4 x 4 / 8 x 8 grid
    # the measured K is the product of the bounds, the assumed one (power iteration) is below it
    report = bounds["report"]
    assert report["lipschitz_body_measured"] == pytest.approx(np.prod(list(sigmas.values())), rel=1e-12)
    assert report["lipschitz_body_assumed"] <= report["lipschitz_body_measured"]
    assert np.all(bounds["assumed_pair_lipschitz"] <= bounds["pair_lipschitz"])


def test_network_lipschitz_ratio_by_gradient_ascent_is_below_the_guaranteed_bound(tiny):
    model, variables, bounds = tiny
    evaluated = {**variables, **bounds["variables"]}
    guaranteed = bounds["report"]["lipschitz_body_measured"]
    pair = np.asarray(bounds["pair_lipschitz"], np.float64)

    def log_ratio(x, y):
        distance = jnp.sqrt(jnp.sum(jnp.square(x - y), axis=(1, 2, 3)))
        fx, fy = (model.apply(evaluated, v, return_features=True) for v in (x, y))
        return jnp.log(jnp.sqrt(jnp.sum(jnp.square(fx - fy), axis=1))) - jnp.log(distance)

    def unit(g):
        return g / jnp.sqrt(jnp.sum(jnp.square(g), axis=(1, 2, 3), keepdims=True) + 1e-30)

    @jax.jit
    def ascend(x, y):  # normalised gradient ascent on log(||f(x) - f(y)|| / ||x - y||), both ends
        def step(pair, _):
            gx, gy = jax.grad(lambda a, b: jnp.sum(log_ratio(a, b)), argnums=(0, 1))(*pair)
            return (pair[0] + 0.02 * unit(gx), pair[1] + 0.02 * unit(gy)), None

        (x, y), _ = jax.lax.scan(step, (x, y), None, length=20)
        zx, zy = (model.apply(evaluated, v).logits for v in (x, y))
        return x, y, jnp.exp(log_ratio(x, y)), zx, zy

    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.uniform(-0.5, 0.5, size=(32, SIDE, SIDE, 3)), jnp.float32)
    y = x + jnp.asarray(0.05 * rng.normal(size=x.shape), jnp.float32)
    first = np.asarray(jnp.exp(log_ratio(x, y)))
    x, y, last, zx, zy = ascend(x, y)
    last = np.asarray(last)
    assert last.mean() > 1.1 * first.mean()  # the ascent works
    assert last.max() <= guaranteed, (last.max(), guaranteed)
    assert last.max() > 0.1 * guaranteed  # the test exercises the network
    # every margin z_c - z_j on the final pairs respects its pairwise bound
    zx, zy = np.asarray(zx, np.float64), np.asarray(zy, np.float64)
    distance = np.linalg.norm(np.asarray(x - y, np.float64).reshape(len(zx), -1), axis=1)
    change = np.abs((zx[:, :, None] - zx[:, None, :]) - (zy[:, :, None] - zy[:, None, :]))
    assert np.all(change <= pair[None] * distance[:, None, None] * (1 + 1e-5) + 1e-6)


def test_training_forward_uses_power_iteration_for_convs_and_one_for_cholesky_layers(tiny):
    model, variables, _ = tiny
    x = jnp.asarray(np.random.default_rng(3).uniform(-0.5, 0.5, size=(4, SIDE, SIDE, 3)), jnp.float32)
    output, state = jax.jit(
        lambda v, x: model.apply(
            v, x, train=True, mutable=[lipschitz.POWER, "batch_stats", lipschitz.ESTIMATES]
        )
    )(variables, x)
    estimates = {name: float(v["sigma"][0]) for name, v in state[lipschitz.ESTIMATES].items()}
    assert set(estimates) == {"stem", "block1", "block2"}  # no power iteration for the Cholesky layers
    assert set(state[lipschitz.POWER]) == {"stem", "block1", "block2"}
    rows = liresnet.normalized_rows(variables["params"]["head"]["kernel"])
    expected = np.prod(list(estimates.values())) * np.asarray(lipschitz.pairwise_distances(rows))
    np.testing.assert_allclose(np.asarray(output.pair_bound), expected, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------ a tiny net trained by launch.py


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """LiResNet++ at width 8 with a 2 x 32 CHORD MLP, trained by launch.py with the whole recipe (exact EMMA,
    NAdam in Lookahead, 25 % real per batch with real-pass epochs, RandAugment on the real rows, pad 2 on the
    generated ones) for 2 epochs of 256 embedded real images and a generated-format .npz on disk (other
    embedded training images), then restored from its checkpoint as certjax.evaluate / the audit do:
    (stdout, Experiment, state)."""
    from certjax import checkpoints
    from certjax.data import sources
    from certjax.experiment import Experiment
    from tests.conftest import run_launch

    workdir = tmp_path_factory.mktemp("liresnet_pp")
    train = sources.make_real_source("demo", "train", "cifar10")
    images, labels = train.read(np.arange(len(train) - 1000, len(train)))
    npz = workdir / "generated.npz"
    np.savez(npz, image=np.asarray(images, np.uint8), label=np.asarray(labels, np.int64))
    result = run_launch(
        "configs/liresnet_pp.py:demo",
        workdir / "run",
        f"--config.data.generated={npz}",
        "--config.data.real_fraction=0.25",
        "--config.model.width=8",
        "--config.model.neck_features=32",
        "--config.model.eval_power_iterations=50",
        "--config.train.epochs=2",
        "--config.train.batch_size=64",
        "--config.data.real_subset=256",
        "--config.train.eval_batch_size=250",
        "--config.train.eval_every_epochs=2",
        "--config.optimizer.warmup_epochs=0",
        "--config.certify.eps=0.02",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # real-pass epochs: 16 real images per batch of 64 -> 16 steps per epoch; the log shows the real part
    assert "steps/epoch=16 (real_pass)" in result.stdout and "(real " in result.stdout, result.stdout[-2000:]
    manager = checkpoints.make_manager(str(workdir / "run"), read_only=True)
    step = checkpoints.select_step(manager, "last")
    exp = Experiment(checkpoints.restore_config(manager, step), data="test")
    state = checkpoints.restore_state(manager, step, exp.abstract_restore_target())
    manager.close()
    return result.stdout, exp, state


TEST_POINTS = np.arange(0, 1000, 10)  # 100 test images: the audit and the float64 forward share the shapes


def test_audit_breaks_no_certificate_of_the_launched_net(launched):
    from certjax import audit

    stdout, exp, state = launched
    assert "certified" in stdout and exp.family.threat_model == "l2"
    images, labels = exp.sources.test.read(TEST_POINTS)
    report = audit.audit_model(exp, state, images, labels, steps=20, restarts=1, targets=2, batch_size=100)
    assert report["certified_points"] >= 5, "the tiny model certifies too few points for a meaningful audit"
    assert report["broken"] == 0 and report["margin_drop_violations"] == 0 and report["sound"]
    assert report["certified_accuracy"] <= report["pgd_accuracy"] < report["clean_accuracy"]  # PGD works
    assert report["lipschitz"]["max_ratio_to_bound"] <= 1 + audit.RATIO_TOLERANCE
    # the evaluation record's bounds: LiResNet's fields, the Cholesky layers measured (not assumed 1)
    bounds = exp.certifier.last_bounds_report
    assert bounds["lipschitz_body_assumed"] <= bounds["lipschitz_body_measured"]
    assert set(bounds["cholesky_sigma_max"]) == {"neck_conv", "neck_linear", "mlp1", "mlp2"}
    assert -0.01 < bounds["cholesky_largest_excess_over_1"] <= 1e-5
    assert set(bounds["layer_sigma_power"]) == {"stem", "block1", "block2"}


def _float64_logits(model, params, stats, frozen, images_uint8):
    """LiResNet++ at evaluation in float64 numpy with the frozen weights as applied."""

    def max_min(h):
        a, b = np.split(h, 2, axis=-1)
        return np.concatenate([np.maximum(a, b), np.minimum(a, b)], axis=-1)

    def kernel(name):
        return np.asarray(frozen[name]["kernel"], np.float64)

    def bias(name):
        return np.asarray(params[name]["bias"], np.float64)

    h = images_uint8.astype(np.float64) / 255.0 - 0.5
    h = max_min(_conv64(h, kernel("stem"), 2, 2) + bias("stem"))
    for i in range(model.depth):
        name = f"block{i + 1}"  # the model subtracts the running mean from the bias in float32
        shift = np.asarray(params[name]["bias"] - stats[name]["mean"], np.float64)
        h = max_min(_conv64(h, kernel(name), 1, 1) + shift)
    h = _conv64(h, kernel("neck_conv"), 4, 0).reshape(len(h), -1)
    for name in ["neck_linear"] + [f"mlp{i + 1}" for i in range(model.mlp_depth)]:
        h = max_min(h @ kernel(name) + bias(name))
    rows = np.asarray(params["head"]["kernel"], np.float64)
    rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return h @ rows.T + bias("head")


def test_rounding_allowance_covers_a_float64_forward(launched):
    _, exp, state = launched
    images, labels = exp.sources.test.read(TEST_POINTS)
    bounds = exp.certifier.certificate_bounds(state.params, state.model_state)
    logits, logit_error = exp.certifier.eval_step(
        state.params,
        {**state.model_state, **bounds["variables"]},
        {"image": images, "label": labels},
        np.float32(bounds["input_error_gain"]),
    )
    exact = _float64_logits(
        exp.model,
        state.params,
        state.model_state["batch_stats"],
        bounds["variables"][lipschitz.FROZEN],
        images,
    )
    logits, bound = np.asarray(logits, np.float64), np.asarray(logit_error, np.float64)
    margins, exact_margins = logits[:, :, None] - logits[:, None, :], exact[:, :, None] - exact[:, None, :]
    deviation = np.max(np.abs(margins - exact_margins), axis=(1, 2))
    assert deviation.max() > 0
    assert np.all(deviation <= 2 * bound), (deviation.max(), bound.min())
    assert bound.max() < 1e-3  # float64 body: the float32 head dominates
