"""Lipschitz building blocks shared by the model families.

MeanShift is the normalisation of the l_inf-dist Net (Zhang et al., ICML'21, Sec. 5.1; reference
zbh2047/L_inf-dist-net-v2 model/norm_dist.py): subtract the per-neuron batch mean in training and a running
mean at evaluation. It has no scale, so at evaluation it is a constant shift and keeps every unit's Lipschitz
constant unchanged.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class MeanShift(nn.Module):
    """y = x - mean(x over the batch) in training, x - running_mean at evaluation (axis 0 is the batch)."""

    momentum: float = 0.1  # PyTorch convention: running = (1 - momentum) * running + momentum * batch_mean

    @nn.compact
    def __call__(self, x, *, train: bool):
        running_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(x.shape[1:], jnp.float32))
        if not train:
            return x - running_mean.value
        batch_mean = jnp.mean(x, axis=0)
        if not self.is_initializing():
            running_mean.value = (1.0 - self.momentum) * running_mean.value + self.momentum * batch_mean
        return x - batch_mean
