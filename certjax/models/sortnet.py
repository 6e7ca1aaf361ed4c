"""SortNet (Zhang et al., NeurIPS'22; recipe of zbh2047/SortNet, shared/RECIPES.md): an l_inf-dist first
layer, then sort-neuron layers (`certjax.kernels.sort_neuron`), mean shift on hidden layers, bias on the last
layer and a learnable logit scale. Every unit is 1-Lipschitz in l_inf at p = inf, so the l_inf margin
certificate applies.

Training modes (`model.mode`):
* "dropout" (the original): a sort layer in training evaluates the l_p / l_inf distance over a random subset
  of its inputs instead of the sort formula. One subset size ~ Binomial(n, q) per layer and step, one random
  subset of that size per group of 32 consecutive samples, shared by all units of the layer (zbh2047/SortNet
  core/models/norm_dist.py `sample_mask`). The k-th largest |d_i| is the max of the kept ones iff exactly the
  k larger ones are dropped (probability q (1-q)^k), so the max over the subset equals the sort neuron in
  expectation (up to the K-term truncation). Mean-shift statistics count only the samples whose next layer
  keeps the unit, and running means are recomputed by one deterministic pass before evaluation
  (`recalibrates_statistics`).
* "exact" (the seed paper's "without dropout"): the deterministic sort neuron in training too, gradient c_k to
  the k-th largest coordinate. The original code has no such training switch; this is certjax's reading. Both
  share the l_p relaxation phase of the p schedule: while p < inf, sort layers use ||x - w||_p over all (or,
  with dropout, the kept) coordinates.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from certjax.certify import interval as bounds
from certjax.certify.interval import Interval
from certjax.kernels.linf_dist import lp_distance, masked_lp_distance
from certjax.kernels.sort_neuron import sort_distance, sort_weights
from certjax.models import Family, ModelOutput
from certjax.models.common.layers import MeanShift, check_certifying, sow_rounding_error
from certjax.models.linf_dist import DistLayer

DROPOUT_GROUP = 32  # samples sharing one dropout subset (zbh2047/SortNet SUB_BATCH)
MODES = ("dropout", "exact")


def float32_sort_weights(q: float, num_inputs: int) -> np.ndarray:
    """sort_weights rounded to float32 so that their sum is <= 1: the neuron stays 1-Lipschitz as computed."""
    weights = sort_weights(q, num_inputs).astype(np.float32)
    while float(np.sum(weights.astype(np.float64))) > 1.0:
        weights = np.nextafter(weights, np.float32(0))
    return weights


def dropout_mask(rng, batch: int, num_inputs: int, q: float) -> jax.Array:
    """[batch, num_inputs] 0/1: per group of 32 samples a random subset of size ~ Binomial(num_inputs, q)."""
    count_rng, subset_rng = jax.random.split(rng)
    count = jnp.sum(jax.random.bernoulli(count_rng, q, (num_inputs,)))
    groups = -(-batch // DROPOUT_GROUP)
    ranks = jnp.argsort(jnp.argsort(jax.random.uniform(subset_rng, (groups, num_inputs)), axis=1), axis=1)
    mask = (ranks < count).astype(jnp.float32)
    return jnp.repeat(mask, DROPOUT_GROUP, axis=0)[:batch]


class SortLayer(nn.Module):
    features: int
    q: float
    use_bias: bool = False
    mean_shift: bool = True
    distance_kernel: str = "auto"  # l_p / masked distances: certjax.kernels.linf_dist.KERNELS

    @nn.compact
    def __call__(self, x, p, *, train: bool, in_mask=None, stat_mask=None, interval=None, certify=False):
        """(y [B, O], the Interval of y or None): with `interval` (the Interval of x), y's bounds
        (certjax.certify.interval): the l_p / masked distance's where y is that distance, else the sort
        neuron's."""
        w = self.param("kernel", nn.initializers.normal(1.0), (self.features, x.shape[-1]))
        if in_mask is not None:
            y = masked_lp_distance(x, w, in_mask, p, kernel=self.distance_kernel)
            if interval is not None:
                interval = Interval(
                    *bounds.lp_distance_bounds(*interval, w, p, mask=in_mask, kernel=self.distance_kernel)
                )
        else:
            weights = jnp.asarray(float32_sort_weights(self.q, x.shape[-1]))
            # the sort neuron's top-K stays on jax.lax.top_k on every backend (no Pallas kernel)
            y = jax.lax.cond(
                jnp.isinf(p),
                lambda: sort_distance(x, w, weights),
                lambda: lp_distance(x, w, p, kernel=self.distance_kernel),
            )
            # |x_i - w_i| rounds once per term, c_k s_k once, and the K-term sum K - 1 times: <= (K + 1) u y.
            sow_rounding_error(self, y * (len(weights) + 1), certify)
            if interval is not None:
                interval = Interval(
                    *jax.lax.cond(
                        jnp.isinf(p),
                        lambda: bounds.sort_distance_bounds(*interval, w, weights),
                        lambda: bounds.lp_distance_bounds(*interval, w, p, kernel=self.distance_kernel),
                    )
                )
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,))
            y = y + bias
            sow_rounding_error(self, y, certify)
            if interval is not None:
                interval = bounds.shift_bounds(*interval, bias)
        if self.mean_shift:
            return MeanShift()(y, train=train, stat_mask=stat_mask, interval=interval, certify=certify)
        return y, interval


class SortNet(nn.Module):
    depth: int = 6
    width: int = 5120
    num_classes: int = 10
    q: float = 0.85
    mode: str = "dropout"
    distance_kernel: str = "auto"  # "auto" | "pallas" | "jnp" | "interpret" (config.model.kernel)

    @nn.compact
    def __call__(
        self, x, p=jnp.inf, *, train: bool = False, dropout: bool | None = None, interval=None, certify=False
    ):
        """A ModelOutput: raw logits z, each 1-Lipschitz in l_inf at p = inf, and the logit scale s.

        dropout: None = the configured mode in training, never at evaluation; False forces the deterministic
        path (used to recompute running means).
        interval: optional Interval of the inputs (their shape); then logit_bounds are interval bounds of the
        raw logits over it (certjax.certify.interval), of the same path (dropout subsets included).
        certify: the certifying forward (certjax.models.certified_logits): every op sows its rounding bound.
        """
        certify = check_certifying(self, certify)
        if self.mode not in MODES:
            raise ValueError(f"model.mode {self.mode!r}; valid: {MODES}")
        use_dropout = train and self.mode == "dropout" if dropout is None else dropout
        h = x.reshape(x.shape[0], -1)
        batch = h.shape[0]
        sizes = [self.width] * (self.depth - 1)  # inputs of sort layers 2..depth
        masks = [None] * len(sizes)
        if use_dropout and self.q < 1.0 and not self.is_initializing():
            rngs = jax.random.split(self.make_rng("dropout"), len(sizes))
            masks = [dropout_mask(r, batch, n, self.q) for r, n in zip(rngs, sizes, strict=True)]
        interval = None if interval is None else interval.per_example()
        h, interval = DistLayer(self.width, mean_shift=True, distance_kernel=self.distance_kernel)(
            h, p, train=train, stat_mask=masks[0], interval=interval, certify=certify
        )
        for layer in range(1, self.depth):
            last = layer == self.depth - 1
            h, interval = SortLayer(
                self.num_classes if last else self.width,
                q=self.q,
                use_bias=last,
                mean_shift=not last,
                distance_kernel=self.distance_kernel,
            )(
                h,
                p,
                train=train,
                in_mask=masks[layer - 1],
                stat_mask=None if last else masks[layer],
                interval=interval,
                certify=certify,
            )
        scale = self.param("logit_scale", nn.initializers.ones, ())
        return ModelOutput(
            -h, logit_scale=scale, logit_bounds=None if interval is None else interval.negated()
        )


def build(model_config, num_classes: int) -> nn.Module:
    """The SortNet of `config.model` (depth, width, q, mode, kernel)."""
    return SortNet(
        depth=model_config.depth,
        width=model_config.width,
        num_classes=num_classes,
        q=model_config.q,
        mode=model_config.mode,
        distance_kernel=model_config.get("kernel", "auto"),  # configs saved before the switch: "auto"
    )


def recalibrates_statistics(model_config) -> bool:
    """Dropout training estimates mean-shift statistics on sub-networks: recompute them before evaluation."""
    return model_config.mode == "dropout"


FAMILY = Family(
    name="sortnet",
    threat_model="linf",
    build=build,
    interval_bounds=True,
    recalibrates_statistics=recalibrates_statistics,
)
