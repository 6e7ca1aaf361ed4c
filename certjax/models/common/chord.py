"""The pieces LiResNet++ and BRONet share (hukkai/liresnet models/model.py Map2Vec, models/blocks.py LiResMLP;
ntuaislab/BRONet bronet/models/neck.py, dense.py, a fork of the same code): the Cholesky-orthogonalised neck
conv and dense layers, and the running-mean collection of their centred layers.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from certjax.models.common.cholesky import cholesky_orthogonalize
from certjax.models.common.lipschitz import FROZEN, conv, dense, lipschitz_layer

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
