"""The dict `certify` returns, built by one function for the API (certjax.restore) and the export
(certjax.load_exported), so that both give the same fields with the same meaning (issue 22: one meaning per
word, the same in the API, the --mode=certify rows, the radii file and README "Use a trained model"):

- `prediction`: the predicted class.
- `radius`: the certified radius of the prediction in pixel units ([0, 1] scale, the family's l_p norm): no
  perturbation of that norm <= radius changes the prediction (the margin certificate; a float64 image's
  radius is its float32 rounding's minus their distance, certjax/inference/images.py).
- `robust`: the prediction provably does not change within eps (no label needed): radius > eps, or for the
  l_inf families with certify.method both | ibp, by interval bounds over the eps box (`robust_margin` and
  `robust_ibp` are then returned too; `robust` is their or for `both`, `robust_ibp` for `ibp`).
- with labels: `label`, `correct` (prediction == label), `certified` = correct and robust (certified
  accuracy is its mean, evaluation's `certified`), `certified_radius` = radius on correct points and 0 on
  wrong ones (evaluation's convention: certified accuracy at r is the mean of certified_radius > r), and
  for the l_inf families `certified_margin` / `certified_ibp` = correct and robust_margin / robust_ibp.
Without labels there is no `certified`: whether a prediction is right needs the label.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from certjax.certify.rounding import round_up_float32
from certjax.certify.threat_models import radius_after_input_rounding

NO_IMAGES = "no images to certify (an empty batch)"


def interval_box_eps(eps: float, distance) -> float:
    """The l_inf radius (pixel units) of the box the interval bounds are taken over: eps, or for float64
    input eps plus its largest distance to the float32 images certified, rounded up (the user's eps box lies
    in it)."""
    return eps if distance is None else math.nextafter(eps + float(np.max(distance)), math.inf)


def certify_outputs(
    prediction,
    radius,
    eps: float,
    *,
    method: str,
    interval_robust: Callable[[float], np.ndarray] | None = None,
    distance=None,
    labels=None,
) -> dict[str, np.ndarray]:
    """The fields of the module docstring from the certifying forward's results.

    Args:
      prediction: [N] predicted classes.
      radius: [N] float32 certified radii of the prediction around the images certified (pixel units).
      eps: the budget (pixel units).
      method: the checkpoint's certify.method: "margin", "both" or "ibp".
      interval_robust: box eps (pixel units) -> [N] bool, the prediction robust by interval bounds over the
        l_inf box of that radius; needed unless method is "margin".
      distance: None, or [N] bounds of the distance of float64 images to the float32 ones certified.
      labels: None or [N] int32 labels (certjax.inference.images.as_labels).
    Returns:
      {name: numpy array [N]}.
    """
    prediction = np.asarray(prediction).astype(np.int32)
    radius = np.asarray(radius)
    if distance is not None:  # float64 input: certified around its float32 rounding, minus the distance
        radius = radius_after_input_rounding(radius, distance)
    # the comparison certify_from_margins makes: float32 radius > eps rounded up to float32
    robust = radius > round_up_float32(eps)
    out = {"prediction": prediction, "radius": radius, "robust": robust}
    if method != "margin":  # l_inf families: interval bounds at eps too, as evaluation certifies
        by_interval = np.asarray(interval_robust(interval_box_eps(eps, distance)), bool)
        out["robust_margin"], out["robust_ibp"] = robust, by_interval
        out["robust"] = by_interval if method == "ibp" else robust | by_interval
    if labels is not None:
        correct = prediction == labels
        out["label"], out["correct"] = labels, correct
        out["certified"] = correct & out["robust"]
        out["certified_radius"] = np.where(correct, radius, np.zeros_like(radius))
        if method != "margin":
            out["certified_margin"] = correct & out["robust_margin"]
            out["certified_ibp"] = correct & out["robust_ibp"]
    return out
