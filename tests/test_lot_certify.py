"""LOT's certifying forward is a proof: its error bound covers the exact logits (numpy in extended precision,
np.longdouble, an independent FFT evaluation of the same network), and PGD breaks no certificate."""

import einops
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import certjax
from certjax.attack import pgd
from certjax.data.sources import make_real_source
from certjax.models import lot
from certjax.models.common import lot_certify
from certjax.models.common.layers import normalized_rows


def _exact_logits(params, frozen, x, blocks, lln):
    """LipConvNet in np.longdouble (64-bit mantissa) with the cached orthogonal weights, by numpy's FFT."""
    wide = np.longdouble

    def layer(h, name, k, stride):
        if stride == 2:
            h = einops.rearrange(h, "b (h a) (w c) ch -> b h w (ch a c)", a=2, c=2)
        w = np.asarray(frozen[name]["weights"]).astype(np.clongdouble)
        pad = k // 2
        n = h.shape[1] + 2 * pad
        spectrum = np.fft.rfft2(np.pad(h, ((0, 0), (pad, pad), (pad, pad), (0, 0))), axes=(1, 2))
        z = np.fft.irfft2(np.einsum("hwoi,bhwi->bhwo", w, spectrum), s=(n, n), axes=(1, 2))
        z = z[:, pad : pad + h.shape[1], pad : pad + h.shape[2]]
        return z + np.asarray(params[name]["bias"]).astype(wide)

    def max_min(h):
        a, b = np.split(h, 2, axis=-1)
        return np.concatenate([np.maximum(a, b), np.minimum(a, b)], axis=-1)

    h = np.asarray(x).astype(wide)
    for stage in range(5):
        for block in range(blocks):
            last = block == blocks - 1
            name = f"stage{stage + 1}_block{block + 1}"
            h = max_min(layer(h, name, 1 if (stage == 4 and last) else 3, 2 if last else 1))
    if lln:
        rows = np.asarray(normalized_rows(jnp.asarray(params["last"]["kernel"]))).astype(wide)
        return h.reshape(len(h), -1) @ rows.T + np.asarray(params["last"]["bias"]).astype(wide)
    return layer(h, "last", 1, 1).reshape(len(h), -1)


def _inputs(config, seed=0):
    """16 real test images and 16 uniformly random ones, uint8."""
    real, labels = make_real_source("demo", "test", "cifar10").read(np.arange(0, 1000, 63))
    noise = np.random.default_rng(seed).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    return np.concatenate([real, noise]), np.concatenate([labels, labels])


@pytest.fixture(scope="module")
def lot_model(tiny_run):
    return certjax.restore(str(tiny_run("lot")))


def test_float64_body_bound_covers_the_extended_precision_logits(lot_model):
    model = lot_model
    images, _ = _inputs(model.config)
    config = model.config
    x = (images / 255.0 - np.asarray(config.data.mean)) / np.asarray(config.data.std)
    x = np.asarray(x, np.float32)  # the network's input as the certifying forward receives it
    variables = {"params": model._params, lot.FROZEN: model._bounds["variables"][lot.FROZEN]}
    with jax.enable_x64(True):
        logits64, error = jax.jit(
            lambda v, x: lot_certify.certified_logits64(v, x, lot.FROZEN, normalized_rows)
        )(variables, x)
        logits64, error = np.asarray(logits64), np.asarray(error)
    assert logits64.dtype == np.float64
    exact = _exact_logits(model._params, variables[lot.FROZEN], x, model._exp.model.blocks, False)
    deviation = np.max(np.abs(logits64.astype(np.longdouble) - exact), axis=1).astype(np.float64)
    assert deviation.max() > 0  # float64 really rounds: a bound of 0 would fail
    assert np.all(deviation <= error), (deviation / error).max()
    scale = 1.0 + np.max(np.abs(logits64), axis=1)
    assert np.all(error < 1e-9 * scale)  # and the bound is small enough to be free


def test_certifying_logits_and_error_cover_the_exact_network_from_the_pixels(lot_model):
    """End to end: the float32 logits and logit_error that certification uses, against the exact network
    on the exactly normalised uint8 pixels (the normalisation's rounding is part of the bound)."""
    model = lot_model
    images, _ = _inputs(model.config, seed=1)
    config = model.config
    wide = np.longdouble
    x = (images.astype(wide) / wide(255) - np.asarray(config.data.mean, wide)) / np.asarray(
        config.data.std, wide
    )
    frozen = model._bounds["variables"][lot.FROZEN]
    exact = _exact_logits(model._params, frozen, x, model._exp.model.blocks, False)
    exp = model._exp
    logits, logit_error = exp.certifier.eval_step(
        model._params,
        {**model._model_state, **model._bounds["variables"]},
        {"image": images},
        np.float32(model._bounds["input_error_gain"]),
    )
    deviation = np.max(np.abs(np.asarray(logits).astype(wide) - exact), axis=1).astype(np.float64)
    bound = np.asarray(logit_error, np.float64)
    assert deviation.max() > 0
    assert np.all(deviation <= bound)
    assert bound.max() < 1e-4  # float32 rounding of the logits and the input: ~1e-6, far below margins


def test_pgd_breaks_no_certificate_of_the_float64_certifier(lot_model):
    model = lot_model
    config = model.config
    images, labels = make_real_source("demo", "test", "cifar10").read(np.arange(0, 1000, 4))
    out = model.certify(images, labels=labels)
    certified = out["certified"] & out["correct"]
    assert certified.sum() >= 5, "the tiny model certifies too few points for a meaningful test"
    certified &= np.cumsum(certified) <= 24  # the first 24: enough to catch a broken bound, and fast
    mean, std = jnp.asarray(config.data.mean), jnp.asarray(config.data.std)

    # the float32 network with the cached orthogonal weights (no Newton-Schulz per attack step)
    variables = {"params": model._params, lot.FROZEN: model._bounds["variables"][lot.FROZEN]}

    def logits_fn(pixels):
        return model._exp.model.apply(variables, (pixels - mean) / std).logits

    pixels = jnp.asarray(images[certified], jnp.float32) / 255.0
    _, margin = pgd(
        lambda _, x: logits_fn(x), None, pixels, jnp.asarray(labels[certified]), config.certify.eps,
        jax.random.key(0), threat_model="l2", steps=25, restarts=1,
    )  # fmt: skip
    assert np.all(np.asarray(margin) > 0)
    # the radii are those of the exact network: no margin falls faster than the certified Lipschitz bound
    clean = np.asarray(logits_fn(pixels))
    true = clean[np.arange(len(clean)), labels[certified]]
    drop = true - np.max(np.where(np.eye(clean.shape[1], dtype=bool)[labels[certified]], -np.inf, clean), 1)
    assert np.all(drop - np.asarray(margin) <= np.max(model.info["pair_lipschitz"]) * config.certify.eps /
                  min(config.data.std) * (1 + 1e-4) + 1e-5)  # fmt: skip
