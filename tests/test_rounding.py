"""The input's own rounding is part of the certificate (issue 21): a float64 image is certified as the float32
image it rounds to, and the radius reported for it is that image's radius minus their distance in the threat
model's norm, through the API and the export alike. At an eps between the two radii the float32 image is
certified and the float64 one is not."""

import shutil

import numpy as np
import pytest

import certjax
from certjax.certify.rounding import round_up_float32
from certjax.certify.threat_models import get_threat_model, radius_after_input_rounding
from certjax.inference.export import export_model
from tests.conftest import REPO

GOLDEN = REPO / "tests" / "golden"
CASES = ["linf_dist_v2", "lot"]  # one family of each threat model, as recorded checkpoints (no training)


@pytest.fixture(scope="module", params=CASES)
def models(request, tmp_path_factory):
    """(threat model, the restored model, its CPU export loaded back) of a recorded checkpoint."""
    scratch = tmp_path_factory.mktemp(request.param)
    shutil.copytree(GOLDEN / request.param / "workdir", scratch / "workdir")
    model = certjax.restore(str(scratch / "workdir"))
    export_model(model, str(scratch / "export"), platforms=("cpu",))
    return get_threat_model(model.info["threat_model"]), model, certjax.load_exported(str(scratch / "export"))


def _images():
    """float64 pixels k / 255 (almost none of them a float32) and their float32 rounding."""
    with np.load(GOLDEN / "images.npz") as data:
        images64 = data["images"].astype(np.float64) / 255.0
    return images64, images64.astype(np.float32)


def _margin_robust(out):
    return out.get("robust_margin", out["robust"])  # the l_inf families add interval bounds


@pytest.mark.parametrize("which", ["api", "export"])
def test_a_float64_image_is_certified_as_its_float32_rounding_minus_the_distance(models, which):
    threat, api, exported = models
    model = api if which == "api" else exported
    images64, images32 = _images()
    delta = (images64 - images32.astype(np.float64)).reshape(len(images64), -1)
    distance = np.linalg.norm(delta, ord=threat.norm_order, axis=1)  # exact to ~1e-16 relative
    assert np.all(distance > 0)
    out32, out64 = model.certify(images32), model.certify(images64)
    np.testing.assert_array_equal(out64["prediction"], out32["prediction"])
    radius32, radius64 = out32["radius"].astype(np.float64), out64["radius"].astype(np.float64)
    # never more than the float32 image's radius minus the distance, and only a few float32 steps less
    assert np.all(radius64 <= np.maximum(radius32 - distance, 0.0))
    positive = radius32 > distance
    assert positive.sum() >= 4, "the recorded model should certify some radius above the rounding"
    shrunk = radius32 - distance - 4 * np.spacing(out32["radius"])
    assert np.all(radius64[positive] >= shrunk[positive])
    # the API and the export subtract the same bound; a zero distance changes nothing
    np.testing.assert_array_equal(out64["radius"], api.certify(images64)["radius"])
    zero = np.zeros(len(images32), np.float32)
    np.testing.assert_array_equal(radius_after_input_rounding(out32["radius"], zero), out32["radius"])

    # the boundary: eps halfway between the float64 image's bound and the float32 image's radius
    i = int(np.argmax(radius32))
    eps = float(radius32[i] - distance[i] / 2)
    assert radius64[i] <= eps < round_up_float32(eps) < radius32[i]
    assert _margin_robust(model.certify(images32[i], eps=eps))[0]
    assert not _margin_robust(model.certify(images64[i], eps=eps))[0]


def test_uint8_and_float32_inputs_are_certified_as_given(models):
    """No distance for the dtypes the forward takes: the radius is the forward's own (the goldens prove its
    bits); float32 k / 255 and uint8 k differ only by the forward's normalisation rounding."""
    _, api, exported = models
    images64, images32 = _images()
    for model in (api, exported):
        via_float32 = model.certify(images32)
        np.testing.assert_array_equal(via_float32["radius"], api.certify(images32)["radius"])
        np.testing.assert_array_equal(model.logits(images64), model.logits(images32))
