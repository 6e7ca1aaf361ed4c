"""The per-example radii file `<workdir>/eval/radii_step<step>.npz` of an evaluation (certjax/evaluate.py
writes it, certjax.analysis reads it), in the words of the API and the --mode=certify rows
(certjax/inference/certificates.py; issue 22, one meaning per word). Arrays [N] over the test set:

- `prediction`, `label`, `correct` (prediction == label);
- `radius`: the certified radius of the prediction (pixel units), right or wrong; on incorrect points, how
  robustly the model is wrong (seed paper Fig. 5);
- `certified_radius`: evaluation's correct-class convention: `radius` on correct points, 0 on the others
  (certified accuracy at r = mean(certified_radius > r));
- `certified`: correct and robust at certify.eps (certified accuracy is its mean);
- `logit_error`: the bound of the logits' float32 rounding error;
- with interval bounds (the l_inf families): `certified_margin`, `certified_ibp` (correct and robust by the
  margin / by interval bounds at eps) and `ibp_certified_at` [N, R] (at each radius of Certifier.ibp_radii);
- with a family's measured bounds (LOT, LiResNet): `certified_assumed`, `certified_radius_assumed` (under the
  bound the architecture promises).
`robust` is not stored: by the margin it is radius > eps; interval bounds are certified for the label only.

Files written before issue 22 name the prediction's radius `prediction_radius` and the correct-class one
`radius` (the certifier's own names, FROM_CERTIFIER): `read_radii` reads both, in the names above.
"""

from __future__ import annotations

import numpy as np

# The certifier's results (Certifier.certify_batches, and the radii files written before issue 22) -> the
# file's names; every other key keeps its name.
FROM_CERTIFIER = {
    "radius": "certified_radius",
    "prediction_radius": "radius",
    "radius_assumed": "certified_radius_assumed",
}


def radii_arrays(results: dict) -> dict[str, np.ndarray]:
    """The arrays of a radii file from Certifier.certify_batches' results."""
    return {FROM_CERTIFIER.get(key, key): np.asarray(value) for key, value in results.items()}


def is_old_format(names) -> bool:
    """Written before issue 22: `radius` there is the correct-class radius (no `certified_radius`)."""
    return "radius" in names and "certified_radius" not in names


def read_radii(path: str) -> dict[str, np.ndarray]:
    """Every array of a radii file, in the names of the module docstring, whichever version wrote it.

    Args:
      path: a radii .npz.
    Returns:
      {name: array}; an old file without `prediction_radius` has no `radius` (its writer did not store it).
    """
    with np.load(path) as data:
        arrays = {key: data[key] for key in data.files}
    if is_old_format(arrays):
        arrays = {FROM_CERTIFIER.get(key, key): value for key, value in arrays.items()}
    return arrays
