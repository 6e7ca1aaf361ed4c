"""The pieces LiResNet++ and BRONet share (hukkai/liresnet models/model.py Map2Vec, models/blocks.py LiResMLP;
ntuaislab/BRONet bronet/models/neck.py, dense.py, a fork of the same code): the Cholesky-orthogonalised neck
conv and dense layers, the running-mean collection of their centred layers, and the whole forward around a
family's body (`chord_forward`).
"""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp

from certjax.models.common.cholesky import cholesky_orthogonalize
from certjax.models.common.layers import NormalizedLinear, check_certifying, max_min, normalized_rows
from certjax.models.common.lipschitz import (
    FROZEN,
    LipschitzConv,
    certified_features,
    conv,
    dense,
    lipschitz_layer,
    pairwise_distances,
)
from certjax.models.common.output import ModelOutput

STATS = "batch_stats"  # the running means of centred layers (Trainer.recalibrate's collection)
MOMENTUM = 0.1  # blocks.py LiResConv, backbone.py: running_mean += (mean - running_mean) * 0.1
NECK_PATCH = 4  # Map2Vec: 4x4 conv, stride 4


def frozen_or(module: nn.Module, orthogonalized):
    """The frozen weight certificate_bounds measured (evaluation) or, without it, orthogonalized(): the
    Cholesky factorisation is skipped where its result would be discarded (jax.export, eager calls)."""
    if module.has_variable(FROZEN, "kernel"):
        return module.get_variable(FROZEN, "kernel")
    return orthogonalized()


class CholeskyConv(nn.Module):
    """Map2Vec's conv: `features` x (4 x 4 x cin) weight, rows Cholesky-orthogonalised, stride 4, no bias."""

    features: int

    @nn.compact
    def __call__(self, x, *, train: bool, certify: bool = False):
        cin, k = x.shape[-1], NECK_PATCH
        if x.shape[1] % k or x.shape[2] % k:
            raise ValueError(f"the neck's {k}x{k}/{k} conv needs a side divisible by {k}, got {x.shape}")
        weight = self.param(  # model.py Map2Vec: randn(W, 16 W) / sqrt(W) / 4; columns ordered (h, w, in)
            "weight",
            lambda key, shape: jax.random.normal(key, shape, jnp.float32) / (4.0 * cin**0.5),
            (self.features, k * k * cin),
        )
        kernel = frozen_or(
            self,
            lambda: cholesky_orthogonalize(weight).reshape(self.features, k, k, cin).transpose(1, 2, 3, 0),
        )

        def linear(v, w, precision, fast_gradient=False):
            return conv(v, w, k, 0, precision, fast_gradient)

        no_bias = jnp.zeros((self.features,), jnp.float32)
        return lipschitz_layer(
            self,
            x,
            kernel,
            no_bias,
            linear,
            reuse=1,
            train=train,
            iterations=0,
            estimate=False,
            certify=certify,
        )


class CholeskyDense(nn.Module):
    """A Cholesky-orthogonalised dense layer (rows of the [out, in] weight): Map2Vec's dense layer
    (residual_depth 0: weight N(0, 1) / sqrt(in)) or one CHORD MLP layer (residual_depth n: weight
    I + V gamma / sqrt(n), V ~ N(0, 1) / features, gamma per output row; blocks.py LiResMLP)."""

    features: int
    residual_depth: int = 0

    @nn.compact
    def __call__(self, x, *, train: bool, certify: bool = False):
        fan_in = x.shape[-1]
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        if self.residual_depth:
            if fan_in != self.features:
                raise ValueError(f"a CHORD layer maps {self.features} features to themselves, got {fan_in}")
            weight = self.param(
                "weight",
                lambda key, shape: jax.random.normal(key, shape, jnp.float32) / self.features,
                (self.features, fan_in),
            )
            gamma = self.param("gamma", nn.initializers.ones, (self.features,))
            weight = jnp.eye(fan_in, dtype=weight.dtype) + weight * gamma[:, None] * (
                self.residual_depth**-0.5
            )
        else:
            weight = self.param(
                "weight",
                lambda key, shape: jax.random.normal(key, shape, jnp.float32) / fan_in**0.5,
                (self.features, fan_in),
            )
        kernel = frozen_or(self, lambda: cholesky_orthogonalize(weight).T)  # [in, out] for x @ kernel
        return lipschitz_layer(
            self, x, kernel, bias, dense, reuse=1, train=train, iterations=0, estimate=False, certify=certify
        )


def chord_forward(module: nn.Module, body: list, x, *, train: bool, return_features: bool, certify):
    """The forward of a stem -> body -> Cholesky neck -> CHORD MLP -> LLN head network (model.py GloroNet,
    Map2Vec and LiResMLP; BRONet's model.py is the same with BRO layers as the body), called from the
    module's compact __call__ so that the layers are its children under the names they always had.

    Args:
      module: the network (fields width, iterations, neck_features, mlp_depth, num_classes).
      body: the body's layers in order (each returns (y, sigma, rounding) and is followed by MinMax).
      x: the input batch [B, H, W, 3].
      train, return_features, certify: as the network's __call__.

    Returns:
      A ModelOutput (logits, pair_bound = K ||w_i - w_j||, K the product of the layers' sigmas), or the
      features before the head with return_features.
    """
    # (layer, MinMax after it): model.py GloroNet.forward / Map2Vec.forward / LiResMLP.forward
    layers = [(LipschitzConv(module.width, 5, 2, 2, module.iterations, name="stem"), True)]
    layers += [(layer, True) for layer in body]
    layers += [
        (CholeskyConv(module.width, name="neck_conv"), False),
        (CholeskyDense(module.neck_features, name="neck_linear"), True),
    ]
    layers += [
        (CholeskyDense(module.neck_features, module.mlp_depth, name=f"mlp{i + 1}"), True)
        for i in range(module.mlp_depth)
    ]
    certifying = check_certifying(module, certify)
    with jax.enable_x64(True) if certifying else contextlib.nullcontext():
        h = jnp.asarray(x, jnp.float64) if certifying else jnp.asarray(x)  # numpy float64 -> float32
        lipschitz, error = 1.0, None
        for layer, activate in layers:
            if isinstance(layer, CholeskyDense) and h.ndim > 2:
                h = h.reshape(h.shape[0], -1)
            h, sigma, rounding = layer(h, train=train, certify=certifying)
            if activate:
                h = max_min(h)
            lipschitz = lipschitz * sigma
            if rounding is not None:  # a rounding error e before a layer leaves it as <= sigma e
                local, sigma_bound = rounding
                error = local if error is None else sigma_bound * error + local
        if certifying:
            h = certified_features(module, h, error)
            lipschitz = lipschitz.astype(jnp.float32)
    if return_features:
        return h
    head = NormalizedLinear(module.num_classes, name="head")
    logits = head(h, certify=certifying)
    rows = normalized_rows(head.variables["params"]["kernel"])
    return ModelOutput(logits, pair_bound=lipschitz * pairwise_distances(rows))
