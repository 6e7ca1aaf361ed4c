"""LOT: orthogonality by exact SVD, FFT conv = direct conv, Newton-Schulz = eigen inverse square root, the
network is 1-Lipschitz in l_2, finite gradients, l_2 certificates hold against PGD and float64."""

import einops
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from certjax.attack import pgd
from certjax.certify.margins import l2_certify, smallest_margin
from certjax.kernels.orthogonal_conv import fft_conv, orthogonal_frequency_weights
from certjax.models import lot


def _perturbed_kernel(key, k, cin, cout, noise):
    """Identity-centred (square) or random (else) kernels: the well-conditioned regime of trained layers."""
    base = np.asarray(lot.identity_kernel(None, (k, k, cin, cout))) if cin == cout else 0.0
    return jnp.asarray(base + noise * np.asarray(jax.random.normal(key, (k, k, cin, cout))), jnp.float32)


CASES = {
    # name: (kernel size, cin as the layer sees it, cout, side before stride, stride)
    "square": (3, 8, 8, 6, 1),
    "wide": (3, 16, 6, 6, 1),
    "tall": (3, 3, 12, 6, 1),
    "stride2": (3, 4, 8, 8, 2),  # space-to-depth: 4 -> 16 channels, then 16 -> 8
    "last1x1": (1, 32, 10, 1, 1),
}


def _layer(case, key=0):
    k, cin, cout, side, stride = CASES[case]
    # square: identity + small noise, else random: both keep sigma(W(f))^2 >> 1e-4, where LOT's regulariser
    # leaves the singular values within 1e-4 of 1 (sigma / sqrt(sigma^2 + 1e-4))
    noise = 0.01 if cin * stride * stride == cout else 1.0
    layer = lot.LOTConv(cout, k, stride)
    x = jax.random.normal(jax.random.key(key + 1), (2, side, side, cin))
    variables = jax.jit(layer.init)(jax.random.key(key), x)
    seen_cin = cin * stride * stride
    kernel = _perturbed_kernel(jax.random.key(key + 2), k, seen_cin, cout, noise)
    variables = {"params": {"kernel": kernel, "bias": variables["params"]["bias"]}}
    n = side // stride + 2 * (k // 2)
    return layer, variables, x, n


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_singular_value_is_one_exact_per_frequency_svd(case):
    _, variables, _, n = _layer(case)
    w = orthogonal_frequency_weights(variables["params"]["kernel"], n, lot.NEWTON_SCHULZ_ITERATIONS)
    sv = np.linalg.svd(np.asarray(w).astype(np.complex128), compute_uv=False)
    assert sv.size >= n  # every frequency of the rfft2 half-spectrum
    np.testing.assert_allclose(sv, 1.0, atol=1e-4)


@pytest.mark.parametrize("case", ["square", "wide", "tall", "stride2"])
def test_dense_operator_of_the_layer_has_norm_one(case):
    """Independent of the Fourier picture: the layer's exact Jacobian (it is affine) as a dense matrix."""
    layer, variables, x, _ = _layer(case)
    one = x[:1]
    jac = jax.jacobian(lambda v: layer.apply(variables, v.reshape(one.shape)).ravel())(one.ravel())
    sv = np.linalg.svd(np.asarray(jac, np.float64), compute_uv=False)
    assert sv.max() <= 1 + 1e-4
    if case == "square":  # pad / orthogonal circular map / crop: most directions keep their norm
        assert np.median(sv) > 1 - 1e-3


def _direct_circular_conv(x, w_freq, n, pad, side):
    """The orthogonalised kernel in space (inverse FFT of W'), applied as a direct circular cross-correlation
    z[p] = sum_s K[s] x[p + s] on the padded grid in float64; then the crop."""
    w_freq = np.asarray(w_freq).astype(np.complex128)  # [n, n//2+1, cout, cin]
    spatial = np.fft.irfft2(np.conj(w_freq), s=(n, n), axes=(0, 1))  # [n, n, cout, cin], real
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    z = np.zeros(xp.shape[:3] + (spatial.shape[2],))
    for s1 in range(n):
        for s2 in range(n):
            shifted = np.roll(xp, (-s1, -s2), axis=(1, 2))  # shifted[p] = x[p + s]
            z += np.einsum("bhwi,oi->bhwo", shifted, spatial[s1, s2])
    return z[:, pad : pad + side, pad : pad + side]


@pytest.mark.parametrize("case", ["square", "wide", "stride2"])
def test_fft_layer_equals_direct_convolution_with_the_orthogonal_kernel(case):
    layer, variables, x, n = _layer(case)
    k, _, _, side, stride = CASES[case]
    # the definition, not the fast path the layer runs: the test also checks that the two agree
    w = lot.orthogonalize(lot.frequency_weights(variables["params"]["kernel"], n))
    inputs = (
        einops.rearrange(np.asarray(x), "b (h a) (w c) ch -> b h w (ch a c)", a=2, c=2) if stride == 2 else x
    )
    expected = _direct_circular_conv(inputs, w, n, k // 2, side // stride)
    expected = expected + np.asarray(variables["params"]["bias"], np.float64)
    np.testing.assert_allclose(np.asarray(layer.apply(variables, x), np.float64), expected, atol=2e-5)


def test_kernel_in_space_is_the_ordinary_conv_before_orthogonalisation():
    """frequency_weights's convention: with W (not W'), the FFT layer is the usual 'same' cross-correlation
    (zero padding k//2), as lax.conv computes it."""
    k, cin, cout, side = 3, 4, 5, 6
    kernel = jax.random.normal(jax.random.key(3), (k, k, cin, cout))
    x = jax.random.normal(jax.random.key(4), (2, side, side, cin))
    n = side + 2
    w = np.asarray(lot.frequency_weights(kernel, n))
    fft_path = _direct_circular_conv(x, w, n, 1, side)
    conv = jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest"
    )
    np.testing.assert_allclose(fft_path, np.asarray(conv, np.float64), atol=1e-4)


def test_newton_schulz_matches_eigendecomposition_inverse_square_root():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 6, 6)) + 1j * rng.normal(size=(3, 6, 6))
    q, _ = np.linalg.qr(a)
    eigenvalues = rng.uniform(0.05, 1.0, size=(3, 6))
    s = q @ (eigenvalues[..., None] * np.conj(np.swapaxes(q, -1, -2)))
    expected = q @ (eigenvalues[..., None] ** -0.5 * np.conj(np.swapaxes(q, -1, -2)))
    z = lot.newton_schulz_inverse_sqrt(jnp.asarray(s, jnp.complex64), 10)
    np.testing.assert_allclose(np.asarray(z), expected, atol=2e-4)
    # and through orthogonalize: (W W^H + 1e-4 I)^(-1/2) W, computed independently by eigh in float64
    w = rng.normal(size=(4, 5, 9)) + 1j * rng.normal(size=(4, 5, 9))
    gram = w @ np.conj(np.swapaxes(w, -1, -2)) + 1e-4 * np.eye(5)
    vals, vecs = np.linalg.eigh(gram)
    inv_sqrt = vecs @ (vals[..., None] ** -0.5 * np.conj(np.swapaxes(vecs, -1, -2)))
    np.testing.assert_allclose(
        np.asarray(lot.orthogonalize(jnp.asarray(w, jnp.complex64))), inv_sqrt @ w, atol=2e-4
    )


# The fast path (certjax/kernels/orthogonal_conv.py) against lot.py's definition. Grids cover odd and even n,
# n = 1 (one real bin) and n = 2 (real bins only), rows (cout <= cin) and columns (cout > cin) Gram matrices.
FAST_CASES = [(3, 8, 8, 8), (3, 16, 6, 7), (3, 3, 12, 8), (1, 32, 10, 1), (1, 12, 6, 2)]


@pytest.mark.parametrize("k, cin, cout, n", FAST_CASES)
def test_fast_orthogonal_weights_equal_the_definition_with_gradients(k, cin, cout, n):
    noise = 0.05 if cin == cout else 0.3
    kernel = _perturbed_kernel(jax.random.key(n + cin), k, cin, cout, noise)
    shape = (n, n // 2 + 1, cout, cin)
    probe = jax.random.normal(jax.random.key(1), shape) + 1j * jax.random.normal(jax.random.key(2), shape)
    iterations = (0, 1, 2, lot.NEWTON_SCHULZ_ITERATIONS)  # each branch of the fast loop

    @jax.jit  # one program per case (op by op, the unrolled iterations take minutes to dispatch)
    def both(kernel):
        definition = [lot.orthogonalize(lot.frequency_weights(kernel, n), i) for i in iterations]
        fast = [orthogonal_frequency_weights(kernel, n, i) for i in iterations]
        grads = [
            jax.grad(lambda kk, f=f: jnp.sum(jnp.real(probe * f(kk))))(kernel)
            for f in (
                lambda kk: lot.orthogonalize(lot.frequency_weights(kk, n)),
                lambda kk: orthogonal_frequency_weights(kk, n, lot.NEWTON_SCHULZ_ITERATIONS),
            )
        ]
        return definition, fast, grads

    definition, fast, (grad_definition, grad_fast) = both(kernel)
    for want, got in zip(definition, fast, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
    scale = float(jnp.max(jnp.abs(grad_definition)))
    np.testing.assert_allclose(np.asarray(grad_fast), np.asarray(grad_definition), atol=1e-5 * scale)


@pytest.mark.parametrize("pad, side", [(1, 6), (0, 1), (0, 2), (1, 3)])
def test_fast_fft_conv_equals_the_nhwc_einsum_with_gradients(pad, side):
    cin, cout = 5, 7
    n = side + 2 * pad
    kernel = jax.random.normal(jax.random.key(0), (2 * pad + 1,) * 2 + (cin, cout))
    w = lot.orthogonalize(lot.frequency_weights(kernel, n))
    x = jax.random.normal(jax.random.key(1), (3, side, side, cin))
    probe = jax.random.normal(jax.random.key(2), (3, side, side, cout))

    def einsum_conv(x, w):
        spectrum = jnp.fft.rfft2(jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))), axes=(1, 2))
        out = jnp.einsum("hwoi,bhwi->bhwo", w, spectrum, precision="highest")
        return jnp.fft.irfft2(out, s=(n, n), axes=(1, 2))[:, pad : pad + side, pad : pad + side]

    @jax.jit
    def value_and_grads(x, w):
        return [
            (conv(x, w), jax.grad(lambda x, w, c=conv: jnp.sum(probe * c(x, w)), argnums=(0, 1))(x, w))
            for conv in (einsum_conv, lambda x, w: fft_conv(x, w, pad))
        ]

    (want, want_grads), (got, got_grads) = value_and_grads(x, w)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    for g, gw in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(gw), atol=1e-5 * float(jnp.max(jnp.abs(gw))))


def _tiny_net(lln=False, noise=0.05, seed=0):
    model = lot.LipConvNet(blocks=2, init_channels=4, num_classes=10, lln=lln)
    x = jnp.zeros((1, 32, 32, 3))
    variables = jax.jit(model.init)(jax.random.key(seed), x)  # one program (op by op: a minute of dispatch)
    # move square layers off the identity so that the test exercises non-trivial orthogonal maps
    leaves, tree = jax.tree.flatten(variables["params"])
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [leaf + noise * jax.random.normal(key, leaf.shape) for leaf, key in zip(leaves, keys)]
    return model, {"params": jax.tree.unflatten(tree, leaves)}


@pytest.mark.parametrize("lln", [False, True])
def test_lipconvnet_is_1_lipschitz_in_l2_on_random_pairs(lln):
    model, variables = _tiny_net(lln=lln)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 32, 32, 3)).astype(np.float32)
    near = x + 1e-2 * rng.normal(size=x.shape).astype(np.float32)
    far = rng.normal(size=x.shape).astype(np.float32)
    apply = jax.jit(lambda v, x: model.apply(v, x).logits)  # one program (op by op, minutes of tiny compiles)
    fx = np.asarray(apply(variables, x), np.float64)
    bounds = lot.certificate_bounds(model, variables, (1, 32, 32, 3))
    body = bounds["report"]["lipschitz_body_measured"]
    assert 0.99 < body <= 1.0 + 1e-4
    for y in (near, far):
        fy = np.asarray(apply(variables, y), np.float64)
        ratio = np.linalg.norm(fx - fy, axis=1) / np.linalg.norm(
            (x - y).reshape(64, -1).astype(np.float64), axis=1
        )
        limit = body * (1.0 if not lln else 1.0)
        assert ratio.max() <= limit * (1 + 1e-4), ratio.max()
        # and every margin respects its pairwise bound
        pair = bounds["pair_lipschitz"]
        for c in range(3):
            dm = np.abs((fx[:, c : c + 1] - fx) - (fy[:, c : c + 1] - fy))
            allowed = pair[c][None] * np.linalg.norm((x - y).reshape(64, -1), axis=1)[:, None]
            assert np.all(dm <= allowed * (1 + 1e-4) + 1e-5)


def test_gradients_are_finite():
    model, variables = _tiny_net()
    x = jax.random.normal(jax.random.key(5), (4, 32, 32, 3))
    labels = jnp.arange(4)

    def loss(params):
        logits = model.apply({"params": params}, x).logits
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels])

    grads = jax.jit(jax.grad(loss))(variables["params"])
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 0


def test_l2_certificate_by_hand():
    logits = jnp.array([[3.0, 1.0, 2.0], [0.0, 1.0, 0.2]])
    labels = jnp.array([0, 1])
    pair = np.full((3, 3), np.sqrt(2.0), np.float32)
    out = l2_certify(logits, labels, 0.1, (0.5, 0.5, 0.5), None, pair)
    slack0 = min(2 - 1e-5 * 4 - 1e-5, 1 - 1e-5 * 5 - 1e-5)
    slack1 = min(1 - 1e-5 - 1e-5, 0.8 - 1e-5 * 1.2 - 1e-5)
    np.testing.assert_allclose(out["radius"], np.array([slack0, slack1]) / np.sqrt(2) * 0.5, rtol=1e-6)
    # a larger pairwise constant for one pair lowers that example's radius
    pair[1, 2] = 4.0
    out2 = l2_certify(logits, labels, 0.1, (0.5, 0.5, 0.5), None, pair)
    assert float(out2["radius"][1]) == pytest.approx(
        slack1 * 0 + (0.8 - 1e-5 * 1.2 - 1e-5) / 4.0 * 0.5, rel=1e-6
    )
    with pytest.raises(ValueError, match="pair_lipschitz"):
        l2_certify(logits, labels, 0.1, (0.5,) * 3)


@pytest.fixture(scope="module")
def tiny_trained_lot():
    """LOT-S at init_channels 4, trained for a few epochs on 1,024 embedded real CIFAR-10 images."""
    from certjax.experiment import Experiment
    from certjax.optim import schedules
    from certjax.train import Trainer
    from configs.lot import get_config

    config = get_config("S,demo,cosine")
    config.model.init_channels = 4
    config.train.batch_size = 128
    config.train.epochs = 6
    config.data.real_subset = 1024
    config.optimizer.lr = 0.05
    exp = Experiment(config)
    trainer = Trainer(exp)
    state = exp.init_state()
    batches = exp.batches.iterate(0, exp.total_steps)
    for step in range(exp.total_steps):
        values = schedules.schedule_values(config, step, exp.total_steps)
        state, _ = trainer.train_step(
            state, exp.global_batch(next(batches)), {k: np.float32(v) for k, v in values.items()}
        )
    return exp, state


def test_pgd_l2_never_breaks_a_certified_lot_point(tiny_trained_lot):
    exp, state = tiny_trained_lot
    config = exp.config
    images, labels = exp.sources.test.read(np.arange(0, 1000, 4))
    pixels = jnp.asarray(images, jnp.float32) / 255.0
    mean, std = jnp.asarray(config.data.mean), jnp.asarray(config.data.std)

    # the network as evaluated: the cached orthogonalised weights (no Newton-Schulz in every PGD step)
    frozen = exp.certifier.certificate_bounds(state.params, state.model_state)["variables"]

    def logits_fn(x):
        return exp.model.apply({"params": state.params, **frozen}, (x - mean) / std).logits

    eps = config.certify.eps
    cert = exp.certifier.certify_batches(
        state.params, state.model_state, [{"image": images, "label": labels}]
    )
    assert cert["certified"].sum() >= 5, "the tiny model certifies too few points for a meaningful test"
    _, adv_margin = pgd(
        lambda _, x: logits_fn(x), None, pixels, jnp.asarray(labels), eps, jax.random.key(0),
        threat_model="l2", steps=50, restarts=2,
    )  # fmt: skip
    adv_margin = np.asarray(adv_margin)
    clean_margin = np.asarray(smallest_margin(logits_fn(pixels), jnp.asarray(labels)))
    assert np.all(adv_margin[cert["certified"]] > 0)
    # no margin drops by more than sqrt(2) * L * eps / std
    bound = (
        np.sqrt(2)
        * exp.certifier.last_bounds_report["lipschitz_body_measured"]
        * eps
        / float(min(config.data.std))
    )
    assert np.all(clean_margin - adv_margin <= bound * (1 + 1e-4) + 1e-5)
    assert np.mean(clean_margin - adv_margin) > 0.1 * bound  # the attack does work
    vulnerable = cert["correct"] & ~cert["certified"]
    if vulnerable.sum() >= 5:
        assert np.any((adv_margin <= 0) & vulnerable)
    # measured and assumed certificates agree closely for a freshly orthogonalised net
    assert abs(cert["certified"].mean() - cert["certified_assumed"].mean()) <= 0.02


def _float64_logits(model, variables, frozen, images_uint8, mean, std):
    """LipConvNet evaluated independently in numpy float64 with the cached orthogonal weights."""
    x = (images_uint8.astype(np.float64) / 255.0 - np.asarray(mean)) / np.asarray(std)
    params = variables["params"]

    def layer(h, name, k, stride):
        if stride == 2:
            h = einops.rearrange(h, "b (h a) (w c) ch -> b h w (ch a c)", a=2, c=2)
        w = np.asarray(frozen[name]["weights"]).astype(np.complex128)
        pad = k // 2
        n = h.shape[1] + 2 * pad
        spectrum = np.fft.rfft2(np.pad(h, ((0, 0), (pad, pad), (pad, pad), (0, 0))), axes=(1, 2))
        z = np.fft.irfft2(np.einsum("hwoi,bhwi->bhwo", w, spectrum), s=(n, n), axes=(1, 2))
        z = z[:, pad : pad + h.shape[1], pad : pad + h.shape[2]]
        return z + np.asarray(params[name]["bias"], np.float64)

    def max_min(h):
        a, b = np.split(h, 2, axis=-1)
        return np.concatenate([np.maximum(a, b), np.minimum(a, b)], axis=-1)

    h = x
    for stage in range(5):
        for block in range(model.blocks):
            last = block == model.blocks - 1
            h = max_min(
                layer(
                    h,
                    f"stage{stage + 1}_block{block + 1}",
                    1 if (stage == 4 and last) else 3,
                    2 if last else 1,
                )
            )
    return layer(h, "last", 1, 1).reshape(len(h), -1)


def test_rounding_allowance_covers_the_float64_logits(tiny_trained_lot):
    exp, state = tiny_trained_lot
    images, labels = exp.sources.test.read(np.arange(0, 1000, 5))
    bounds = exp.certifier.certificate_bounds(state.params, state.model_state)
    logits, logit_error = exp.certifier.eval_step(
        state.params, {**state.model_state, **bounds["variables"]}, {"image": images, "label": labels}
    )
    variables = {"params": state.params}
    exact = _float64_logits(
        exp.model,
        variables,
        bounds["variables"][lot.FROZEN],
        images,
        exp.config.data.mean,
        exp.config.data.std,
    )
    deviation = np.linalg.norm(np.asarray(logits, np.float64) - exact, axis=1)
    bound = np.asarray(logit_error, np.float64)
    assert deviation.max() > 0
    assert np.all(deviation <= bound), (deviation.max(), bound.min())
    assert bound.max() < 1e-2
    # and the cached weights give the same logits as orthogonalising on the fly
    fresh = jax.jit(lambda params, x: exp.model.apply({"params": params}, x).logits)(  # one program
        state.params,
        (images / 255.0 - np.asarray(exp.config.data.mean)) / np.asarray(exp.config.data.std),
    )
    np.testing.assert_allclose(np.asarray(fresh), np.asarray(logits), atol=1e-4)


def test_launch_trains_and_evaluates_lot_with_measured_and_assumed_bounds(tmp_path):
    import json

    from tests.conftest import run_launch

    workdir = tmp_path / "lot"
    # the tests' tiny run for 2 epochs (its programs are in the session's compilation cache), paper's eps
    result = run_launch(
        "configs/lot.py:demo,tiny",
        workdir,
        "--config.train.epochs=2",
        f"--config.certify.eps={36 / 255!r}",
        mode="train_and_evaluate",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "measured Lipschitz bound of the body" in result.stdout
    (record,) = [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]
    assert record["family"] == "lot" and record["eps"] == pytest.approx(36 / 255)
    body = record["lipschitz"]["lipschitz_body_measured"]
    assert 0.99 < body <= 1 + 1e-4
    assert len(record["lipschitz"]["layer_sigma_max"]) == 10  # LipConvNet-10 body
    assert 0.0 <= record["certified_accuracy"] <= record["clean_accuracy"] <= 1.0
    assert 0.0 <= record["certified_accuracy_assumed"] <= record["clean_accuracy"]
    radii = np.load(record["radii_path"])
    assert np.all(radii["certified_radius"][radii["certified"]] > record["eps"])
