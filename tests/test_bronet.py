"""BRONet: the BRO matrices and layer against float64 definitions, gradients against finite differences, the
LA loss by hand and by the original's formula, every layer bound against the dense norm of the layer as
applied, the network's Lipschitz ratio by gradient ascent, the parameter count, and a launched net: PGD breaks
no certificate, and a SIGKILLed run resumes bit for bit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from certjax import losses
from certjax.models import bronet
from certjax.models.common import lipschitz
from certjax.models.common.lot_certify import lot_layer

SIDE = 16  # 8 x 8 maps after the stem: an even grid (10)


def _spectrum64(rng, shape, width, rank):
    real = rng.normal(size=(*shape, width, rank)) + 1j * rng.normal(size=(*shape, width, rank))
    return real / np.sqrt(width)


def _bro64(v, regulariser=bronet.REGULARISER):
    """W = I - 2 V (V^H V + d I)^{-1} V^H in numpy float64, one frequency."""
    gram = v.conj().T @ v
    d = regulariser * np.mean(np.real(np.diag(gram)))
    return np.eye(len(v)) - 2.0 * v @ np.linalg.inv(gram + d * np.eye(gram.shape[0])) @ v.conj().T


def test_bro_matrices_equal_their_float64_definition_and_are_hermitian_contractions():
    rng = np.random.default_rng(0)
    v = _spectrum64(rng, (3, 2), 12, 5)
    with jax.enable_x64(True):
        w = np.asarray(bronet.bro_matrices(jnp.asarray(v)))
    for index in np.ndindex(3, 2):
        expected = _bro64(v[index])
        np.testing.assert_allclose(w[index], expected, atol=1e-12)
        assert np.linalg.norm(w[index], 2) <= 1 + 1e-6
        np.testing.assert_allclose(w[index], w[index].conj().T, atol=1e-12)  # Hermitian
        # full column rank V: as d -> 0, W -> a Hermitian unitary (eigenvalues -1 on range(V), 1 elsewhere)
        unitary = _bro64(v[index], regulariser=1e-14)
        np.testing.assert_allclose(unitary @ unitary.conj().T, np.eye(12), atol=1e-10)
        eigenvalues = np.sort(np.linalg.eigvalsh(unitary))
        np.testing.assert_allclose(eigenvalues, [-1.0] * 5 + [1.0] * 7, atol=1e-10)
    # float32, as training computes it
    w32 = np.asarray(bronet.bro_matrices(jnp.asarray(v, jnp.complex64)))
    assert np.max(np.linalg.norm(w32, 2, axis=(-2, -1))) <= 1 + 1e-5


def _direct64(x, kernel):
    """The layer by its definition in numpy float64: pad, rfft2 (ortho), W(f) per frequency, irfft2, crop."""
    side = x.shape[1]
    grid = side + 2
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    spectrum = np.fft.rfft2(padded, axes=(1, 2), norm="ortho")
    v = np.fft.rfft2(kernel, s=(grid, grid), axes=(0, 1), norm="ortho")
    out = np.empty_like(spectrum)
    for f in np.ndindex(*v.shape[:2]):
        out[:, f[0], f[1], :] = spectrum[:, f[0], f[1], :] @ _bro64(v[f]).T
    return np.fft.irfft2(out, s=(grid, grid), axes=(1, 2), norm="ortho")[:, 1 : 1 + side, 1 : 1 + side]


@pytest.mark.parametrize("side", [7, 8])  # grids 9 (odd) and 10 (even)
def test_bro_layer_equals_a_direct_float64_computation(side):
    rng = np.random.default_rng(side)
    width, rank = 6, 3
    kernel = rng.normal(size=(3, 3, width, rank)) / 3.0
    kernel[1, 1, :rank, :rank] += np.eye(rank)
    x = rng.normal(size=(2, side, side, width))
    expected = _direct64(x, kernel)
    with jax.enable_x64(True):
        trained = np.asarray(bronet.bro_apply(jnp.asarray(x), jnp.asarray(kernel)))
        weights = bronet.bro_matrices(bronet.kernel_spectrum(jnp.asarray(kernel), side + 2))
        cached = np.asarray(bronet.cached_apply(jnp.asarray(x), weights))
        # the certifying forward's explicit-DFT layer (LOT's) applies the same operator
        certifying, error = lot_layer(jnp.asarray(x), weights, jnp.zeros(width), 3, 1.0)
    np.testing.assert_allclose(trained, expected, atol=1e-12)
    np.testing.assert_allclose(cached, expected, atol=1e-12)
    np.testing.assert_allclose(np.asarray(certifying), expected, atol=1e-12)
    # its proven allowance covers the difference and stays negligible
    difference = np.sqrt(np.sum(np.square(np.asarray(certifying) - expected), axis=(1, 2, 3)))
    assert np.all(difference <= np.asarray(error)) and np.all(np.asarray(error) < 1e-10)


def test_bro_layer_gradients_match_finite_differences():
    from jax.test_util import check_grads

    rng = np.random.default_rng(3)
    kernel = rng.normal(size=(3, 3, 4, 2)) / 3.0
    kernel[1, 1, :2, :2] += np.eye(2)
    x = rng.normal(size=(2, 5, 5, 4))
    with jax.enable_x64(True):
        check_grads(
            lambda x, k: jnp.sum(jnp.sin(bronet.bro_apply(x, k))),
            (jnp.asarray(x), jnp.asarray(kernel)),
            order=1,
            modes=["rev"],
            atol=1e-6,
            rtol=1e-6,
        )


def _la_original64(z, pair, labels, eps, beta=5.0, temperature=0.75, offset=2.0):
    """A float64 transcription of bronet/models/margin_layer.py (EMMA logits, then LA), per sample."""
    out = []
    for logits, y in zip(z, labels):
        d = logits - logits[y]
        m = pair[y]
        e = np.clip(-d / np.maximum(m * eps, 1e-8), 0.01, 1.0)
        zp = d + e * eps * m
        zp[y] = 0.0
        u = (zp - offset * np.eye(len(zp))[y]) / temperature
        ce = -(u[y] - np.log(np.sum(np.exp(u - u.max()))) - u.max())
        p = np.exp(-ce)
        out.append((1.0 - p) ** beta * ce * temperature)
    return np.asarray(out)


def test_logit_annealing_by_hand_and_by_the_original_formula():
    config = {"la_beta": 5.0, "la_temperature": 0.75, "la_offset": 2.0}
    # by hand: two classes, K = 0 (no margin raise): z' = (0, z1 - z0), u = (-2/0.75, (z1 - z0)/0.75)
    logits, pair = jnp.array([[1.0, 0.5]]), jnp.zeros((2, 2))
    loss = losses.logit_annealing(logits, pair, jnp.array([0]), {"eps_train": 0.1}, config)
    u0, u1 = -2.0 / 0.75, -0.5 / 0.75
    ce = np.log(np.exp(u0) + np.exp(u1)) - u0
    assert float(loss[0]) == pytest.approx(0.75 * (1 - np.exp(-ce)) ** 5 * ce, rel=1e-5)
    # against the transcription, with margins
    rng = np.random.default_rng(4)
    z = rng.normal(size=(16, 10)) * 3
    rows = rng.normal(size=(10, 5))
    pair = 1.7 * np.linalg.norm(rows[:, None] - rows[None], axis=-1)
    labels = rng.integers(0, 10, 16)
    expected = _la_original64(z, pair, labels, 0.3)
    with jax.enable_x64(True):
        got = losses.logit_annealing(
            jnp.asarray(z), jnp.asarray(pair), jnp.asarray(labels), {"eps_train": 0.3}, config
        )
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-10)
    assert losses.LOSSES["logit_annealing"] is losses.logit_annealing


def test_paper_size_parameter_count_is_the_recipes():
    from configs.bronet import get_config

    for arg, classes, expected in [("cifar10", 10, 68_788_234), ("cifar100", 100, 68_972_644)]:
        model = bronet.build(get_config(arg).model, classes)
        shapes = jax.eval_shape(
            lambda m=model: m.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
        )
        assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes["params"])) == expected


# ------------------------------------------------------------------------------------------------ tiny net


@pytest.fixture(scope="module")
def tiny():
    """A tiny BRONet (random parameters, nonzero running means) on 16 x 16 inputs and its exact bounds."""
    model = bronet.BRONet(depth=2, width=8, rank=4, num_classes=10, neck_features=32, mlp_depth=2)
    variables = model.init(jax.random.key(0), jnp.zeros((1, SIDE, SIDE, 3)), train=False)
    leaves, tree = jax.tree.flatten(variables["params"])
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = [leaf + 0.1 * jax.random.normal(key, leaf.shape) for leaf, key in zip(leaves, keys)]
    stats = jax.tree.map(lambda a: a + 0.05, variables["batch_stats"])
    variables = {**variables, "params": jax.tree.unflatten(tree, noisy), "batch_stats": stats}
    bounds = bronet.certificate_bounds(model, variables, (1, SIDE, SIDE, 3))
    return model, variables, bounds


def test_every_bro_layer_bound_is_above_the_dense_norm_of_the_layer_as_applied(tiny):
    model, variables, bounds = tiny
    frozen, sigmas = bounds["variables"][lipschitz.FROZEN], bounds["report"]["layer_sigma_bound"]
    assert set(sigmas) == {"stem", "bro1", "bro2", "neck_conv", "neck_linear", "mlp1", "mlp2"}
    half = SIDE // 2
    for name in ("bro1", "bro2"):
        layer = bronet.BROConv(8, 4, 2)
        params = {**variables["params"][name], "bias": jnp.zeros(8)}
        layer_variables = {
            "params": params,
            "batch_stats": {"mean": jnp.zeros(8)},
            lipschitz.FROZEN: frozen[name],
        }
        basis = jnp.eye(half * half * 8).reshape(-1, half, half, 8)
        matrix = layer.apply(layer_variables, basis, train=False)[0].reshape(len(basis), -1)
        true_norm = float(np.linalg.svd(np.asarray(matrix, np.float64), compute_uv=False)[0])
        assert true_norm <= sigmas[name] <= 1 + 1e-5, (name, true_norm, sigmas[name])
    report = bounds["report"]
    assert report["lipschitz_body_measured"] == pytest.approx(np.prod(list(sigmas.values())), rel=1e-12)
    assert set(report["layer_sigma_power"]) == {"stem"}  # the original estimates the stem only
    assert -1e-3 < report["bro_largest_excess_over_1"] <= 1e-5
    # the fast method proves the same layers within its tolerance
    fast = bronet.certificate_bounds(model, variables, (1, SIDE, SIDE, 3), bound_method="fast")["report"]
    for name, sigma in sigmas.items():
        assert sigma * (1 - 1e-9) <= fast["layer_sigma_bound"][name] <= sigma * (1 + 1e-4), name


def test_network_lipschitz_ratio_by_gradient_ascent_is_below_the_guaranteed_bound(tiny):
    model, variables, bounds = tiny
    evaluated = {**variables, **bounds["variables"]}
    guaranteed = bounds["report"]["lipschitz_body_measured"]

    def log_ratio(x, y):
        distance = jnp.sqrt(jnp.sum(jnp.square(x - y), axis=(1, 2, 3)))
        fx, fy = (model.apply(evaluated, v, return_features=True) for v in (x, y))
        return jnp.log(jnp.sqrt(jnp.sum(jnp.square(fx - fy), axis=1))) - jnp.log(distance)

    def unit(g):
        return g / jnp.sqrt(jnp.sum(jnp.square(g), axis=(1, 2, 3), keepdims=True) + 1e-30)

    @jax.jit
    def ascend(x, y):
        def step(pair, _):
            gx, gy = jax.grad(lambda a, b: jnp.sum(log_ratio(a, b)), argnums=(0, 1))(*pair)
            return (pair[0] + 0.02 * unit(gx), pair[1] + 0.02 * unit(gy)), None

        (x, y), _ = jax.lax.scan(step, (x, y), None, length=20)
        return jnp.exp(log_ratio(x, y))

    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.uniform(-0.5, 0.5, size=(16, SIDE, SIDE, 3)), jnp.float32)
    y = x + jnp.asarray(0.05 * rng.normal(size=x.shape), jnp.float32)
    first = np.asarray(jnp.exp(log_ratio(x, y)))
    last = np.asarray(ascend(x, y))
    assert last.mean() > 1.05 * first.mean()  # the ascent works
    assert last.max() <= guaranteed, (last.max(), guaranteed)
    assert last.max() > 0.1 * guaranteed


# ----------------------------------------------------------------------- a tiny net trained by launch.py


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """BRONet at width 8 trained by launch.py with its whole recipe (LA loss, NAdam in Lookahead, cosine with
    its floor, 25 % real per batch with real-pass epochs, RandAugment on the real rows, pad 2 on the
    generated ones from a generated-format .npz of other embedded training images), restored as the audit
    does: (stdout, Experiment, state)."""
    from certjax import checkpoints
    from certjax.data import sources
    from certjax.experiment import Experiment
    from tests.conftest import run_launch

    workdir = tmp_path_factory.mktemp("bronet")
    train = sources.make_real_source("demo", "train", "cifar10")
    images, labels = train.read(np.arange(len(train) - 1000, len(train)))
    npz = workdir / "generated.npz"
    np.savez(npz, image=np.asarray(images, np.uint8), label=np.asarray(labels, np.int64))
    result = run_launch(
        "configs/bronet.py:demo",
        workdir / "run",
        f"--config.data.generated={npz}",
        "--config.data.real_fraction=0.25",
        "--config.model.width=8",
        "--config.model.neck_features=32",
        "--config.train.epochs=2",
        "--config.train.batch_size=64",
        "--config.data.real_subset=256",
        "--config.train.eval_batch_size=250",
        "--config.train.eval_every_epochs=2",
        "--config.optimizer.warmup_epochs=0",
        "--config.certify.eps=0.02",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "steps/epoch=16 (real_pass)" in result.stdout, result.stdout[-2000:]
    manager = checkpoints.make_manager(str(workdir / "run"), read_only=True)
    step = checkpoints.select_step(manager, "last")
    exp = Experiment(checkpoints.restore_config(manager, step), data="test")
    state = checkpoints.restore_state(manager, step, exp.abstract_restore_target())
    manager.close()
    return result.stdout, exp, state


def test_audit_breaks_no_certificate_of_the_launched_net(launched):
    from certjax import audit

    stdout, exp, state = launched
    assert "certified" in stdout and exp.family.threat_model == "l2"
    images, labels = exp.sources.test.read(np.arange(0, 1000, 10))
    report = audit.audit_model(exp, state, images, labels, steps=20, restarts=1, targets=2, batch_size=100)
    assert report["certified_points"] >= 5, "the tiny model certifies too few points for a meaningful audit"
    assert report["broken"] == 0 and report["margin_drop_violations"] == 0 and report["sound"]
    assert report["certified_accuracy"] <= report["pgd_accuracy"] < report["clean_accuracy"]
    assert report["lipschitz"]["max_ratio_to_bound"] <= 1 + audit.RATIO_TOLERANCE
    bounds = exp.certifier.last_bounds_report
    assert bounds["lipschitz_body_assumed"] <= bounds["lipschitz_body_measured"] * (1 + 1e-5)
    assert set(bounds["layer_sigma_bound"]) >= {"bro1", "bro2"}


def test_resume_after_sigkill_of_bronet_is_bit_exact(tmp_path):
    """The whole recipe (LA loss, NAdam in Lookahead with k = 3 and epoch-end syncs, the BRO layers' running
    means, half of every batch generated with real-pass epochs, RandAugment): a resumed run is bitwise the
    uninterrupted one."""
    from tests.conftest import launch_command
    from tests.test_train import resume_after_sigkill_matches

    rng = np.random.default_rng(0)
    npz = tmp_path / "generated.npz"
    np.savez(
        npz, image=rng.integers(0, 256, (512, 32, 32, 3), dtype=np.uint8), label=rng.integers(0, 10, 512)
    )
    args = [
        f"--config.data.generated={npz}", "--config.data.real_fraction=0.5",
        "--config.optimizer.lookahead.k=3", "--config.model.width=8", "--config.model.neck_features=32",
        "--config.optimizer.warmup_epochs=1", "--config.certify.eps=0.02", "--config.train.epochs=3",
        "--config.train.batch_size=64", "--config.data.real_subset=256", "--config.train.eval_batch_size=100",
        "--config.train.eval_subset=100", "--config.checkpoint.every_epochs=1",
        "--config.train.log_every_steps=1000",
    ]  # fmt: skip

    def command(workdir):
        return launch_command("configs/bronet.py:demo", workdir, *args)

    state = resume_after_sigkill_matches(tmp_path, command, 8, 3 * 8)
    assert int(state["opt_state"]["count"]) == 3 * 8


def test_no_file_but_the_model_and_config_files_names_the_family():
    """One model file and one config file (issue 21's contract): no other code of certjax or launch.py holds
    the family's name as a string (comments citing the original's files are fine)."""
    from tests.conftest import REPO

    files = [REPO / "launch.py", *(REPO / "certjax").rglob("*.py")]
    naming = [
        str(path.relative_to(REPO))
        for path in files
        if path != REPO / "certjax" / "models" / "bronet.py"
        and any(quoted in path.read_text() for quoted in ('"bronet"', "'bronet'"))
    ]
    assert not naming, naming
