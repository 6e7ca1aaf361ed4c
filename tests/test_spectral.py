"""The fast guaranteed layer bounds (certjax/certify/spectral.py, issue 23) against the exact float64 SVD, on
random and adversarial kernels; its rounding allowances against extended-precision computations; and the
two methods side by side on launched checkpoints of every l_2 family."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import scipy.linalg.lapack as lapack

from certjax.certify import norms, spectral
from certjax.certify.certificate import cholesky_bound
from certjax.certify.rounding import FLOAT64_UNIT_ROUNDOFF, gamma

RNG = np.random.default_rng(23)


def _conv_kernel(kind: str, k=3, cin=12, cout=12):
    kernel = RNG.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin)
    if kind == "near_identity":  # LiResNet's residual blocks: Dirac + a small random part
        kernel *= 0.05
        kernel[k // 2, k // 2] += np.eye(cin, cout)
    elif kind == "repeated_top":  # one tap only, orthogonal: every frequency block has all sigma = 1.5
        kernel = np.zeros((k, k, cin, cout))
        q, _ = np.linalg.qr(RNG.standard_normal((max(cin, cout),) * 2))
        kernel[k // 2, k // 2] = 1.5 * q[:cin, :cout]
    elif kind == "nearly_repeated_top":
        kernel[k // 2, k // 2] += 3.0 * np.eye(cin, cout) * (1 + 1e-9 * RNG.standard_normal(cout))
    elif kind == "rank_deficient":  # rank 2 in every tap
        kernel = np.einsum("hwr,hwo->hwro", RNG.standard_normal((k, k, 2)), RNG.standard_normal((k, k, cout)))
        kernel = np.einsum("ir,hwro->hwio", RNG.standard_normal((cin, 2)), kernel)
    elif kind == "tiny":
        kernel *= 1e-30
    elif kind == "huge":
        kernel *= 1e30
    elif kind == "zero":
        kernel = np.zeros_like(kernel)
    return kernel


KINDS = ["random", "near_identity", "repeated_top", "nearly_repeated_top", "rank_deficient", "tiny", "huge"]
GEOMETRIES = [
    (3, 1, 1, 8),
    (3, 1, 1, 7),
    (5, 2, 2, 8),
    (4, 4, 0, 8),
    (3, 2, 1, 8),
]  # k, stride, padding, side


def _check(fast: float, exact: float) -> None:
    """exact x its safety factor <= fast <= exact (1 + the stated tolerance)."""
    assert fast >= exact * norms.SVD_SAFETY, (fast, exact)
    assert fast <= exact * (1.0 + spectral.RELATIVE_EXCESS), (fast, exact, fast / exact - 1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "k{}_s{}_p{}_n{}".format(*g))
def test_fast_conv_bound_is_above_the_exact_svd_and_within_the_tolerance(kind, geometry):
    k, stride, padding, side = geometry
    kernel = _conv_kernel(kind, k=k, cin=6 if stride > 1 else 12, cout=12)
    exact = norms.conv_norm_bound(kernel, stride, padding, side)
    _check(spectral.conv_sigma_bound(kernel, stride, padding, side), exact)


@pytest.mark.parametrize("kind", KINDS)
def test_fast_dense_and_stack_bounds_are_above_the_exact_svd(kind):
    matrix = _conv_kernel(kind, k=1, cin=40, cout=24)[0, 0]
    _check(spectral.dense_sigma_bound(matrix), float(np.linalg.svd(matrix, compute_uv=False)[0]))
    stack = _conv_kernel(kind, k=3, cin=10, cout=7).reshape(9, 10, 7) * (1 + 0.5j)
    stack[3] += 1j * RNG.standard_normal((10, 7))
    exact = float(np.max(np.linalg.svd(stack, compute_uv=False)))
    _check(spectral.stack_sigma_bound(stack), exact)


def test_a_zero_kernel_is_bounded_by_zero():
    kernel = _conv_kernel("zero")
    assert spectral.conv_sigma_bound(kernel, 1, 1, 8) == 0.0
    assert spectral.stack_sigma_bound(np.zeros((3, 4, 4), np.complex64)) == 0.0


def test_the_certificate_refuses_a_shift_below_the_largest_eigenvalue():
    """No bound below the truth: mu I - H is not positive definite for mu < lambda_max, so the Cholesky
    factorisation stops and no figure is returned; at lambda_max (1 + 1e-6) it runs and bounds from above."""
    g = RNG.standard_normal((30, 20)) + 1j * RNG.standard_normal((30, 20))
    h = np.conj(g.T) @ g
    top = float(np.linalg.eigvalsh(h)[-1])
    assert cholesky_bound(-h, top * (1 - 1e-6)) is None
    assert cholesky_bound(-h, top * (1 - 1e-12)) is None or top * (1 - 1e-12) >= top - 1e-9 * top
    bound = cholesky_bound(-h, top * (1 + 1e-6))
    assert bound is not None and top <= bound <= top * (1 + 2e-6)


@pytest.mark.parametrize("n,complex_", [(8, False), (64, True), (200, True), (200, False)])
def test_cholesky_backward_error_is_within_the_allowance_in_extended_precision(n, complex_):
    """Point 2 of spectral.py: R^H R = A~ + E with |E| <= kappa_C |R^H| |R| entrywise and ||E||_2 <= rho,
    E computed in extended precision (numpy's long double) from the float64 factor LAPACK returned."""
    g = RNG.standard_normal((n + 5, n)) + (1j * RNG.standard_normal((n + 5, n)) if complex_ else 0)
    h = np.conj(g.T) @ g
    shifted = -h
    diagonal = float(np.linalg.eigvalsh(h)[-1]) * (1 + 1e-3) - np.real(np.diagonal(h))
    shifted[np.diag_indices(n)] = diagonal
    potrf = lapack.zpotrf if complex_ else lapack.dpotrf
    factor, info = potrf(shifted, lower=1, clean=1)
    assert info == 0
    wide = np.clongdouble if complex_ else np.longdouble
    lower = np.tril(factor).astype(wide)
    target = np.tril(shifted) + np.conj(np.tril(shifted, -1).T)  # the Hermitian matrix potrf factored
    error = lower @ np.conj(lower.T) - target.astype(wide)
    kappa = 2.0 * gamma(2 * n + 4, np.float64)
    allowed = kappa * (np.abs(lower) @ np.abs(lower.T))
    assert np.all(np.abs(error) <= allowed.astype(np.longdouble))
    rho = kappa / (1 - kappa) * float(np.sum(diagonal))
    assert float(np.sqrt(np.sum(np.abs(error) ** 2))) <= rho
    assert float(np.max(np.abs(error))) > 0  # the factorisation did round: the check is not vacuous


def test_gram_rounding_allowance_covers_an_extended_precision_gram():
    """Point 1 of spectral.py: the Gram matrices of all frequencies, formed in float64 from C_d and the
    twiddles, differ from the long-double ones by at most kappa_H ||A||_F^2 (Frobenius, so also in norm)."""
    kernel = _conv_kernel("near_identity", cin=16, cout=16)
    taps, positions, grid = norms.conv_taps(kernel, 1, 1, 8)
    count, a, b = taps.shape
    offset_grams, pairs = spectral._offset_grams(
        taps, positions, grid, False
    )  # as taps_sigma_bound forms them
    keys = list(offset_grams)
    frequencies = spectral._frequencies(grid)
    c_d = np.stack([offset_grams[d].reshape(-1) for d in keys]).astype(np.complex128)
    grams = spectral._twiddles(frequencies, keys, grid) @ c_d
    wide_taps = taps.astype(np.longdouble)
    angle = (-2 * np.pi * (np.asarray(positions) @ frequencies.T % grid) / grid).astype(np.longdouble)
    twiddles = np.cos(angle) + 1j * np.sin(angle)  # [T, F] in long double
    blocks = np.einsum("tf,tab->fab", twiddles.astype(np.clongdouble), wide_taps.astype(np.clongdouble))
    exact = blocks @ np.conj(np.swapaxes(blocks, 1, 2))
    worst = np.max(np.sqrt(np.sum(np.abs(grams.reshape(exact.shape) - exact) ** 2, axis=(1, 2))))
    kappa = (
        2 * gamma(pairs * (b + 1), np.float64)
        + spectral.TWIDDLE_ERROR
        + 2 * gamma(2 * len(keys) + 2, np.float64)
    )
    allowance = kappa * float(np.sum(np.sum(np.abs(taps), axis=0) ** 2))
    assert 0 < float(worst) <= allowance
    assert spectral.TWIDDLE_ERROR >= 16 * FLOAT64_UNIT_ROUNDOFF


def test_config_check_names_the_bound_methods():
    from certjax.config_checks import ConfigError, check_config
    from configs.liresnet import get_config

    config = get_config("demo")
    config.certify.bound_method = "svd"
    with pytest.raises(ConfigError, match=r"certify.bound_method.*'exact', 'fast'"):
        check_config(config)


# ------------------------------------------------------------------------- launched checkpoints


@pytest.mark.parametrize("family", ["lot", "liresnet", "liresnet_pp"])
def test_launched_checkpoints_certify_the_same_points_with_either_method(tiny_run, family, tmp_path):
    """The tiny launched run of every l_2 family: the fast method's layer bounds lie within its tolerance
    above the exact ones, and both certify the same test points (a point in between would need its margin
    within RELATIVE_EXCESS of the threshold: none is, and the test says which if one ever is)."""
    from certjax.data import pipeline
    from certjax.experiment import Experiment

    workdir = tmp_path / family
    shutil.copytree(tiny_run(family), workdir)
    exp, state, _ = Experiment.from_checkpoint(str(workdir), "last", data="test")
    certifier = exp.certifier
    results, reports = {}, {}
    for method in spectral.BOUND_METHODS:
        bounds = certifier.certificate_bounds(state.params, state.model_state, method)
        batches = pipeline.eval_batches(exp.sources.test, 250, 500)
        results[method] = certifier.certify_batches(state.params, state.model_state, batches, bounds)
        reports[method] = bounds["report"]
        assert reports[method]["bound_method"] == method
    exact, fast = reports["exact"]["lipschitz_body_measured"], reports["fast"]["lipschitz_body_measured"]
    assert exact <= fast <= exact * (1 + spectral.RELATIVE_EXCESS) ** 40
    differ = np.flatnonzero(results["exact"]["certified"] != results["fast"]["certified"])
    radius = results["exact"]["radius"][differ]
    assert differ.size == 0, f"points {differ} (radii {radius}) certified by one method only"
    assert np.all(results["fast"]["radius"] <= results["exact"]["radius"])  # a larger bound, a smaller radius


def test_training_evaluates_with_the_fast_bound_and_the_record_names_the_method(tiny_run, tmp_path):
    """The per-epoch evaluation bounds by "fast" without the assumed figure; evaluate_checkpoint writes the
    configured method into results.jsonl, with every layer's value."""
    from certjax.evaluate import evaluate_checkpoint
    from certjax.experiment import Experiment

    workdir = tmp_path / "liresnet"
    shutil.copytree(tiny_run("liresnet"), workdir)
    exp, state, _ = Experiment.from_checkpoint(str(workdir), "last", data="test")
    exp.certifier.evaluate_source(state, exp.sources.test, 100, during_training=True)
    bounds = exp.certifier.certificate_bounds(state.params, state.model_state, "fast", assumed=False)
    assert bounds["report"]["bound_method"] == "fast" and bounds["assumed_pair_lipschitz"] is None
    record = evaluate_checkpoint(str(workdir), "last", train_subset=100)
    assert record["bound_method"] == "exact"
    written = json.loads((workdir / "results.jsonl").read_text().splitlines()[-1])
    assert written["bound_method"] == "exact" and written["lipschitz"]["bound_method"] == "exact"
    assert set(written["lipschitz"]["layer_sigma_bound"]) >= {"stem", "block1", "neck_conv", "neck_linear"}
