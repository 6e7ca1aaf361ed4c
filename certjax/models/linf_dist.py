"""l_inf-dist Net (Zhang et al., "Towards certifying l_inf robustness using neural networks with l_inf-dist
neurons", ICML'21; recipe of zbh2047/L_inf-dist-net-v2, see shared/RECIPES.md).

Every unit is u(x) = ||x - w||_p (+ b); at p = inf each unit is 1-Lipschitz w.r.t. l_inf, and so is the whole
composition, so every raw logit z_j = -y_j is 1-Lipschitz (paper Sec. 3, Fact 3.4) and the margin certificate
of `certjax.certify.margins.linf_certify` applies. The learnable scale s only multiplies the logits fed to the
cross-entropy term of the loss; certification uses the raw z.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from certjax.certify import interval as bounds
from certjax.certify.interval import Interval
from certjax.kernels.linf_dist import lp_distance
from certjax.models import Family, ModelOutput
from certjax.models.common.layers import MeanShift, check_certifying, sow_rounding_error


def identity_init(scale: float = -10.0):
    """N(0, 1) weights with one coordinate per unit set to `scale`: unit o starts as a copy of input c(o).

    With w = -10 on that coordinate, |x_c + 10| dominates the max for normalised inputs (|x| < 3), so the
    layer starts as y_o = x_c(o) + 10: an identity map up to a shift (ICML'21 Sec. 5.1). c(o) = o mod in when
    in <= out (the recipe); for a narrowing layer (in > out, e.g. 3072 -> 1024 at CPU widths, which the recipe
    leaves at N(0, 1)) c(o) = floor(o * in / out), a subsampling of the input spread over the whole image.
    """

    def init(key, shape, dtype=jnp.float32):
        out_features, in_features = shape
        w = jax.random.normal(key, shape, dtype)
        rows = jnp.arange(out_features)
        if in_features <= out_features:
            cols = rows % in_features
        else:
            cols = (rows * in_features) // out_features
        return w.at[rows, cols].set(scale)

    return init


class DistLayer(nn.Module):
    """Fully connected l_p-dist layer: y[b, o] = ||x[b] - w[o]||_p (+ bias), then optional mean shift."""

    features: int
    use_bias: bool = False
    mean_shift: bool = True
    identity: bool = False
    identity_narrowing: bool = False  # also initialise an in > out layer as a subsampling (see identity_init)
    distance_kernel: str = "auto"  # implementation of the distance, certjax.kernels.linf_dist.KERNELS

    @nn.compact
    def __call__(self, x, p, *, train: bool, stat_mask=None, interval: Interval | None = None, certify=False):
        """(y [B, O], the Interval of y or None): with `interval` (the Interval of x), y's bounds
        (certjax.certify.interval: the same mean shift and bias on both ends, rounded outward)."""
        in_features = x.shape[-1]
        use_identity = self.identity and (in_features <= self.features or self.identity_narrowing)
        init = identity_init() if use_identity else nn.initializers.normal(1.0)
        w = self.param("kernel", init, (self.features, in_features))
        y = lp_distance(x, w, p, kernel=self.distance_kernel)
        sow_rounding_error(self, y, certify)  # |x_i - w_i| rounds once; the max itself is exact
        if interval is not None:
            interval = Interval(*bounds.lp_distance_bounds(*interval, w, p, kernel=self.distance_kernel))
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,))
            y = y + bias
            sow_rounding_error(self, y, certify)
            if interval is not None:
                interval = bounds.shift_bounds(*interval, bias)
        if self.mean_shift:
            return MeanShift()(y, train=train, stat_mask=stat_mask, interval=interval, certify=certify)
        return y, interval


class LinfDistNet(nn.Module):
    """depth distance layers: (depth - 1) x [width, mean shift], then [num_classes, bias].

    Input: normalised images [B, H, W, C] (flattened here). Returns a ModelOutput: raw logits z = -y_last,
    each 1-Lipschitz in l_inf at p = inf, and the learnable logit scale s used by the cross-entropy term.
    """

    depth: int = 6
    width: int = 5120
    num_classes: int = 10
    identity_init: bool = True
    identity_narrowing: bool = False
    distance_kernel: str = "auto"  # "auto" | "pallas" | "jnp" | "interpret" (config.model.kernel)

    @nn.compact
    def __call__(self, x, p=jnp.inf, *, train: bool = False, interval: Interval | None = None, certify=False):
        """interval: optional Interval of the inputs (their shape); then the output's logit_bounds are
        interval bounds of the raw logits (interval bound propagation, certjax.certify.interval). certify: the
        certifying forward (certjax.models.certified_logits): every op sows its rounding bound."""
        certify = check_certifying(self, certify)
        h = x.reshape(x.shape[0], -1)
        interval = None if interval is None else interval.per_example()
        for _ in range(self.depth - 1):
            layer = DistLayer(
                self.width,
                mean_shift=True,
                identity=self.identity_init,
                identity_narrowing=self.identity_narrowing,
                distance_kernel=self.distance_kernel,
            )
            h, interval = layer(h, p, train=train, interval=interval, certify=certify)
        last = DistLayer(
            self.num_classes, use_bias=True, mean_shift=False, distance_kernel=self.distance_kernel
        )
        scale = self.param("logit_scale", nn.initializers.ones, ())
        y, interval = last(h, p, train=train, interval=interval, certify=certify)
        return ModelOutput(
            -y, logit_scale=scale, logit_bounds=None if interval is None else interval.negated()
        )


def build(model_config, num_classes: int) -> nn.Module:
    """The LinfDistNet of `config.model` (depth, width, identity_init, identity_narrowing, kernel)."""
    return LinfDistNet(
        depth=model_config.depth,
        width=model_config.width,
        num_classes=num_classes,
        identity_init=model_config.identity_init,
        identity_narrowing=model_config.get("identity_narrowing", False),
        distance_kernel=model_config.get("kernel", "auto"),  # configs saved before the switch: "auto"
    )


FAMILY = Family(name="linf_dist", threat_model="linf", build=build, interval_bounds=True)
