"""The family contract (issue 21, principles 1 and 2): the registry found from certjax/models, the Family
record's fields, one ModelOutput per forward, and the certifying forward's error bound."""

from __future__ import annotations

import dataclasses
import pkgutil
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import certjax.models
from certjax.certify.interval import Interval
from certjax.models import FAMILIES, Family, ModelOutput, certified_logits, get_family, register_family
from certjax.models.linf_dist import LinfDistNet
from certjax.models.liresnet import LiResNet
from certjax.models.liresnet_pp import LiResNetPP
from certjax.models.lot import LipConvNet
from certjax.models.sortnet import SortNet

MODELS_DIR = Path(certjax.models.__file__).parent


def family_modules() -> list[str]:
    """The modules of certjax/models whose source ends with a FAMILY record."""
    names = []
    for info in pkgutil.iter_modules([str(MODELS_DIR)]):
        if not info.ispkg and "\nFAMILY = " in (MODELS_DIR / f"{info.name}.py").read_text():
            names.append(info.name)
    return sorted(names)


def test_registry_is_every_model_file_with_a_family_record():
    names = ["bronet", "linf_dist", "liresnet", "liresnet_pp", "lot", "sortnet", "sortnet_hybrid"]
    assert family_modules() == names
    assert sorted(FAMILIES) == family_modules()  # names match the files
    for name in FAMILIES:
        assert get_family(name) is FAMILIES[name] and FAMILIES[name].name == name


def test_get_family_names_the_valid_ones():
    with pytest.raises(ValueError) as error:
        get_family("orthonet")
    message = str(error.value)
    assert "\n" not in message and "'orthonet'" in message
    assert all(name in message for name in FAMILIES)


def test_family_fields_have_their_kinds():
    for family in FAMILIES.values():
        assert isinstance(family, Family) and isinstance(family.name, str)
        assert family.threat_model in ("linf", "l2")
        assert callable(family.build) and callable(family.certificate_bounds)
        assert callable(family.recalibrates_statistics)
        assert isinstance(family.interval_bounds, bool)
        assert family.interval_bounds == (family.threat_model == "linf")  # IBP exists for the l_inf nets
    with pytest.raises(dataclasses.FrozenInstanceError):
        FAMILIES["lot"].name = "other"
    with pytest.raises(ValueError, match="threat_model"):
        Family(name="x", threat_model="l1", build=lambda *_: None)


class _Linear(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x, p=None, *, train=False, certify=False):
        return ModelOutput(nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1)), logit_scale=jnp.ones(()))


def test_register_family_adds_an_outside_family(monkeypatch):
    monkeypatch.setattr(FAMILIES, "_registered", {})  # leave the registry as found for other tests
    outside = register_family(
        Family(name="outside", threat_model="l2", build=lambda config, classes: _Linear(classes))
    )
    assert get_family("outside") is outside and "outside" in FAMILIES
    assert outside.certificate_bounds(None, {}, (1, 4, 4, 3))["pair_lipschitz"] is None  # the default
    assert outside.recalibrates_statistics(None) is False
    model = outside.build(None, 3)
    x = jnp.ones((2, 4, 4, 3))
    logits, error = certified_logits(model, model.init(jax.random.key(0), x), x)
    assert logits.shape == (2, 3) and error.shape == (2,)
    with pytest.raises(TypeError):
        register_family("outside")


def _box(shape, seed=0):
    x = jax.random.normal(jax.random.key(seed), shape)
    return x, Interval(x - 0.01, x + 0.01)


@pytest.mark.parametrize(
    "model",
    [LinfDistNet(depth=3, width=16), SortNet(depth=3, width=16, q=0.7, mode="exact")],
    ids=["linf_dist", "sortnet"],
)
def test_linf_output_has_logit_bounds_only_with_an_interval(model):
    x, box = _box((3, 4, 4, 3))
    variables = model.init(jax.random.key(1), x)
    plain = model.apply(variables, x)
    assert isinstance(plain, ModelOutput) and plain.logit_bounds is None and plain.pair_bound is None
    assert plain.logit_scale.shape == ()
    bounded = model.apply(variables, x, interval=box)
    assert isinstance(bounded.logit_bounds, Interval)
    lower, upper = bounded.logit_bounds
    assert bool(jnp.all(lower <= plain.logits) & jnp.all(plain.logits <= upper))
    np.testing.assert_array_equal(bounded.logits, plain.logits)


@pytest.mark.parametrize(
    "model, side",
    [
        (LiResNet(depth=1, width=8, neck_features=16), 8),
        (LiResNetPP(depth=1, width=8, neck_features=16, mlp_depth=1), 8),
        (LipConvNet(blocks=1, init_channels=4), 32),
    ],
    ids=["liresnet", "liresnet_pp", "lot"],
)
def test_l2_output_fields(model, side):
    x = jax.random.normal(jax.random.key(2), (2, side, side, 3))
    variables = jax.jit(model.init)(jax.random.key(3), x)  # one program each (LOT op by op: half a minute)
    output = jax.jit(model.apply)(variables, x)
    assert isinstance(output, ModelOutput) and output.logit_bounds is None
    assert output.logits.shape == (2, 10)
    if isinstance(model, LipConvNet):
        assert output.pair_bound is None and float(output.logit_scale) == 1.0
    else:
        assert output.pair_bound.shape == (10, 10) and output.logit_scale is None


def test_certified_logits_error_covers_the_float64_logits():
    """LiResNet: |float32 logits - float64 forward of the same weights| <= the certified error bound."""
    model = LiResNet(depth=2, width=8, neck_features=16)
    x = jax.random.uniform(jax.random.key(4), (16, 8, 8, 3), minval=-0.5, maxval=0.5)
    variables = model.init(jax.random.key(5), x[:1])
    bounds = get_family("liresnet").certificate_bounds(model, variables, (1, 8, 8, 3))
    variables = {**variables, **bounds["variables"]}
    logits, error = jax.jit(lambda v, images: certified_logits(model, v, images))(variables, x)
    with jax.enable_x64(True):
        wide = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), variables)
        exact = np.asarray(model.apply(wide, jnp.asarray(np.asarray(x, np.float64))).logits)
    assert exact.dtype == np.float64
    deviation = np.max(np.abs(np.asarray(logits, np.float64) - exact), axis=1)
    assert deviation.max() > 0  # the float32 head rounds
    assert np.all(deviation <= np.asarray(error, np.float64)), (deviation, error)
    with pytest.raises(ValueError, match="certified_logits"):
        model.apply(variables, x, certify=True)  # the certifying forward must sow its bound
