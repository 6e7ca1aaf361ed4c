"""SortNet's hybrid model for 64x64 data (Zhang et al., NeurIPS'22; zbh2047/SortNet ell_inf_models.py
`SortHybridModel`, commands/tinyimagenet1_255_mlp.sh, imagenet1_255_mlp.sh; shared/RECIPES.md "64x64
datasets"), and with `body="dist"` the l_inf-dist Net+MLP of the ICML'21 paper (zbh2047/L_inf-dist-net
model/mlp.py `MLPFeature` + model/bound_module.py `Predictor`, command/ell_inf_dist_net++_tinyimagenet.sh).

The network, with the original's `depth` (7 in both recipes) counting every layer:
* a body of depth - 2 distance layers: one l_inf-dist layer (pixels -> width, no bias, mean shift), then
  depth - 3 sort layers (width -> width, q, no bias, mean shift) (certjax.models.linf_dist.DistLayer,
  certjax.models.sortnet.SortLayer, the same dropout training as SortNet); with body "dist", depth - 2
  l_inf-dist layers (no bias, mean shift, identity init where in <= out: MLPFeature's NormDist layers,
  `MLPFeature(depth=5)` is depth 7 here) and no dropout (model.mode "exact");
* a head: a plain linear layer width -> hidden with bias, tanh, and a linear layer hidden -> classes with
  bias; weights stored N(0, 1) and multiplied by 1 / sqrt(fan_in) in the forward, biases 0 (the original's
  BoundLinear / BoundFinalLinear w_scale), so Adam steps the stored weights as the original does;
* a learnable scalar s times the logits in the loss (certification uses the raw logits z).

The head is not 1-Lipschitz, so the l_inf margin rule (every logit 1-Lipschitz) must never certify it. The
certifying forward sows an infinite rounding bound: every margin certificate (evaluation, --mode=certify, the
API, the export) gets radius 0 and certifies nothing; certificates come from interval bounds only
(config certify.method "ibp", as in the original).

Interval bounds (`apply(..., interval=box)`), at evaluation (train=False): the box through the distance layers
(certjax.certify.interval, p = inf), widened by a bound of the body's float32 forward error over the box, then
`linear_bounds`, `tanh_bounds` and `pair_linear_bounds` (certjax.certify.interval: each contains the exact
layer and its float32 forward). The last layer bounds z_j - z_k with rows w_j - w_k for k = the clean
prediction (argmax of the logits of the same forward; a point is certified only if it is the label), so
`logit_bounds` is the interval of z - z_k (a common shift of every logit, 0 at k): every difference
upper_j - lower_y of it bounds z_j - z_y, and for y = k it is the original's tight bound. In training, as in
the original, the body's output interval is y +- eps (the box's l_inf radius; the body is 1-Lipschitz at
p = inf), not propagated through the distance layers.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from certjax.certify import interval as bounds
from certjax.certify.interval import Interval
from certjax.certify.rounding import FLOAT32_SPACING_AT_ONE
from certjax.models import Family, ModelOutput
from certjax.models.common.layers import MeanShift, check_certifying
from certjax.models.linf_dist import DistLayer
from certjax.models.sortnet import (
    MODES,
    SortLayer,
    dropout_mask,
    float32_sort_weights,
    recalibrates_statistics,
)

# model.body: the distance layers after the first one (module docstring)
BODIES = ("sort", "dist")


def _largest(interval: Interval):
    """Per example, max over units of max(|lower|, |upper|): a bound of |value| anywhere in the box."""
    return jnp.max(jnp.maximum(jnp.abs(interval.lower), jnp.abs(interval.upper)), axis=1)


class HeadLinear(nn.Module):
    """y = (w / sqrt(fan_in)) x + b, w ~ N(0, 1) stored, b = 0 (the original's BoundLinear); the effective
    kernel is computed once per call and shared by the forward and the bounds."""

    features: int
    in_features: int

    @nn.compact
    def __call__(self):
        """(effective kernel [features, in_features], bias [features])."""
        w = self.param("kernel", nn.initializers.normal(1.0), (self.features, self.in_features))
        b = self.param("bias", nn.initializers.zeros, (self.features,))
        return w * jnp.float32(1.0 / self.in_features**0.5), b


class SortHybridNet(nn.Module):
    depth: int = 7
    width: int = 5120
    hidden: int = 512
    num_classes: int = 200
    q: float = 0.7
    mode: str = "dropout"
    distance_kernel: str = "auto"
    body: str = "sort"  # BODIES

    def _layers(self):
        """The distance layers of the body (module docstring)."""
        if self.body == "dist":  # every NormDist of MLPFeature: identity init where in <= out
            return [
                DistLayer(self.width, mean_shift=False, identity=True, distance_kernel=self.distance_kernel)
                for _ in range(self.depth - 2)
            ]
        layers = [DistLayer(self.width, mean_shift=False, distance_kernel=self.distance_kernel)]
        return layers + [
            SortLayer(self.width, q=self.q, mean_shift=False, distance_kernel=self.distance_kernel)
            for _ in range(self.depth - 3)
        ]

    def _body(self, h, p, *, train, masks, interval, certify):
        """(y, its Interval or None, bound of the float32 forward's error over the box [B] or None).

        Every op of the body errs by at most FLOAT32_SPACING_AT_ONE |its result| (the layers' own sown
        bounds: the distance once, the sort neuron K + 1 times, the mean shift once), and every later layer is
        1-Lipschitz in l_inf, so the sum of those bounds at the box's largest values bounds the error of every
        output anywhere in the box (at p = inf, where certification runs). A body of l_inf-dist layers only
        is the case of the first layer repeated: one op per distance layer."""
        error = None if interval is None else jnp.zeros(h.shape[:1], jnp.float32)
        sort_terms = len(float32_sort_weights(self.q, self.width)) if self.body == "sort" else 0
        for index, layer in enumerate(self._layers()):
            extra = {} if index == 0 or self.body == "dist" else {"in_mask": masks[index - 1]}
            h, interval = layer(h, p, train=train, interval=interval, certify=certify, **extra)
            if interval is not None:
                ops = 1 if index == 0 or self.body == "dist" else sort_terms + 1
                error = error + FLOAT32_SPACING_AT_ONE * ops * _largest(interval)
            stat_mask = masks[index] if index < len(masks) else None
            h, interval = MeanShift()(h, train=train, stat_mask=stat_mask, interval=interval, certify=certify)
            if interval is not None:
                error = error + FLOAT32_SPACING_AT_ONE * _largest(interval)
        return h, interval, error

    @nn.compact
    def __call__(
        self, x, p=jnp.inf, *, train: bool = False, dropout: bool | None = None, interval=None, certify=False
    ):
        """A ModelOutput: raw logits z, the learnable scale s, and with `interval` (the Interval of the
        inputs) logit_bounds = bounds of z - z_k, k = argmax z (module docstring).

        dropout: None = the configured mode in training, never at evaluation; False forces the deterministic
        path (running means are recomputed through it). certify: the certifying forward
        (certjax.models.certified_logits): it sows an infinite bound, so no margin certificate is claimed.
        """
        certify = check_certifying(self, certify)
        if self.mode not in MODES:
            raise ValueError(f"model.mode {self.mode!r}; valid: {MODES}")
        if self.body not in BODIES:
            raise ValueError(f"model.body {self.body!r}; valid: {BODIES}")
        if self.body == "dist" and self.mode != "exact":
            raise ValueError("model.body 'dist' has no sort layers to drop inputs of: use model.mode 'exact'")
        if self.depth < 3:
            raise ValueError(f"model.depth {self.depth}: needs >= 3 (1 l_inf-dist layer + the 2 head layers)")
        use_dropout = train and self.mode == "dropout" if dropout is None else dropout
        h = x.reshape(x.shape[0], -1)
        sizes = [self.width] * (self.depth - 3) if self.body == "sort" else []  # inputs of the sort layers
        masks = [None] * len(sizes)
        if use_dropout and self.q < 1.0 and not self.is_initializing():
            rngs = jax.random.split(self.make_rng("dropout"), max(len(sizes), 1))
            masks = [dropout_mask(r, h.shape[0], n, self.q) for r, n in zip(rngs, sizes, strict=False)]
        box = None if interval is None else interval.per_example()
        # training: the original's relaxation y +- eps after the body (no bounds through distance layers)
        h, body_interval, error = self._body(
            h, p, train=train, masks=masks, interval=None if train else box, certify=certify
        )
        hidden_kernel, hidden_bias = HeadLinear(self.hidden, h.shape[-1])()
        out_kernel, out_bias = HeadLinear(self.num_classes, self.hidden)()
        a = bounds.dense(h, hidden_kernel) + hidden_bias
        t = jnp.tanh(a)
        z = bounds.dense(t, out_kernel) + out_bias
        scale = self.param("logit_scale", nn.initializers.ones, ())
        if certify:
            # no margin certificate: the head is not 1-Lipschitz (module docstring)
            self.sow(
                "rounding",
                "abs_error",
                jnp.full(z.shape[:1], jnp.inf, jnp.float32),
                init_fn=lambda: 0.0,
                reduce_fn=lambda a, b: a + b,
            )
        if box is None:
            return ModelOutput(z, logit_scale=scale)
        if train:
            flat = x.reshape(x.shape[0], -1)
            radius = jnp.max(jnp.maximum(flat - box.lower, box.upper - flat), axis=1, keepdims=True)
            body_interval = Interval(h - radius, h + radius)
        else:
            body_interval = Interval(
                *bounds.round_outward(
                    body_interval.lower - error[:, None], body_interval.upper + error[:, None]
                )
            )
        hidden_interval = bounds.tanh_bounds(
            *bounds.linear_bounds(*body_interval, hidden_kernel, hidden_bias)
        )
        prediction = jnp.argmax(z, axis=-1)
        pairs = bounds.pair_linear_bounds(*hidden_interval, out_kernel, out_bias, prediction)
        return ModelOutput(z, logit_scale=scale, logit_bounds=pairs)


def build(model_config, num_classes: int) -> nn.Module:
    """The SortHybridNet of `config.model` (depth, width, hidden, q, mode, kernel, body; q only for the sort
    body, body "sort" when absent)."""
    return SortHybridNet(
        depth=model_config.depth,
        width=model_config.width,
        hidden=model_config.hidden,
        num_classes=num_classes,
        q=model_config.get("q", 0.7),
        mode=model_config.mode,
        distance_kernel=model_config.get("kernel", "auto"),
        body=model_config.get("body", "sort"),
    )


def certificate_bounds(model, variables, image_shape, **options) -> dict:
    """No Lipschitz bound of the margins is claimed (the tanh head's is not 1): every pair bound is inf, so
    a margin certificate proves nothing here even without the certifying forward's infinite error, and the
    audit probes no Lipschitz claim (certjax.certify.threat_models). Certificates are interval bounds.

    Args: as `certjax.models.Family.certificate_bounds`. Returns: its dict, pair_lipschitz [C, C] of inf off
    the diagonal."""
    del variables, image_shape, options
    pair = np.full((model.num_classes, model.num_classes), np.inf, np.float32)
    np.fill_diagonal(pair, 0.0)
    return {"variables": {}, "pair_lipschitz": pair, "assumed_pair_lipschitz": None, "report": {}}


FAMILY = Family(
    name="sortnet_hybrid",
    threat_model="linf",
    build=build,
    certificate_bounds=certificate_bounds,
    interval_bounds=True,
    recalibrates_statistics=recalibrates_statistics,
)
