"""The inputs a user gives to a trained model (certjax.restore, certjax.load_exported, --mode=certify):
images, eps and labels, checked once by the same functions for the API and the export, and float64 images
rounded to float32 with the rounding made part of the certificate.

The certifying forward takes uint8 or float32 images. A float64 image x64 is certified as the float32 image
x32 it rounds to; the radius reported for x64 is the radius proved around x32 minus an upper bound of
||x64 - x32|| in the threat model's norm (certjax.certify.threat_models.radius_after_input_rounding), so a
certificate never claims more for the image the user gave. For a 32x32x3 image that distance is at most
2^-25 per pixel (l_inf) or sqrt(3072) 2^-25 ~ 1.7e-6 (l_2).
"""

from __future__ import annotations

import math

import numpy as np

from certjax.certify.threat_models import ThreatModel, input_rounding_distance

IMAGE_SHAPE = (32, 32, 3)


def as_images(images, image_shape=IMAGE_SHAPE) -> np.ndarray:
    """Check a user's images and bring them to one of the dtypes a trained model takes.

    Args:
      images: numpy / jax uint8 [N, H, W, C] in [0, 255] or float in [0, 1] (one image [H, W, C] too);
        integer dtypes in [0, 255] are taken as uint8.
      image_shape: (H, W, C) the model takes.
    Returns:
      A numpy batch: uint8, float32, or float64 for float64 input (kept, so that its rounding to float32 can
      be accounted for: `float32_input`). Anything else raises ValueError naming the fix.
    """
    image_shape = tuple(image_shape)
    array = np.asarray(images)
    if array.shape == image_shape:
        array = array[None]
    if array.ndim != 4 or array.shape[1:] != image_shape:
        hint = " (channels first? use images.transpose(0, 2, 3, 1))" if array.shape[1:2] == (3,) else ""
        dims = ", ".join(str(n) for n in image_shape)
        raise ValueError(f"images must be [N, {dims}] (NHWC, RGB), got shape {array.shape}{hint}")
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool or not (
        np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
    ):
        raise ValueError(f"images must be uint8 in [0, 255] or float in [0, 1], got dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.integer):
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError("integer images must lie in [0, 255]")
        return array.astype(np.uint8)
    if array.dtype.itemsize > 8:  # its rounding to float64 would go unaccounted for
        raise ValueError(f"float images must be float16, float32 or float64, got {array.dtype}")
    # float16 / float32 are exact in float32; float64 is kept, so that its rounding is certified
    array = array.astype(np.float32 if array.dtype.itemsize <= 4 else np.float64)
    finite = np.isfinite(array)
    if not np.all(finite):  # NaN / inf: a broken image, not one on the wrong scale
        bad = ~finite.reshape(len(array), -1)
        first = int(np.flatnonzero(bad.any(axis=1))[0])
        kinds = " and ".join(
            name for name, hit in (("NaN", np.isnan(array).any()), ("inf", np.isinf(array).any())) if hit
        )
        raise ValueError(
            f"images hold {kinds} values ({int(bad.sum())} pixel values in {int(bad.any(axis=1).sum())} "
            f"image(s), the first is image {first}); every pixel must be a number in [0, 1]: check how the "
            "images were made (a division by zero in a normalisation?)"
        )
    if array.size and not (array.min() >= 0.0 and array.max() <= 1.0):
        raise ValueError(
            "float images must lie in [0, 1] (pixels / 255); for values in [0, 255] pass them as uint8"
        )
    return array


def float32_input(images: np.ndarray, threat_model: ThreatModel):
    """The images the certifying forward takes, and how far the user's images lie from them.

    Args:
      images: a batch from `as_images`.
      threat_model: whose norm measures the distance.
    Returns:
      (uint8 or float32 images, distance): distance is None when nothing was rounded (uint8, float32), else
      [N] float32 upper bounds of ||x64 - x32|| in pixel units (input_rounding_distance).
    """
    if images.dtype != np.float64:
        return images, None
    rounded = images.astype(np.float32)
    return rounded, input_rounding_distance(images, rounded, threat_model)


def as_eps(eps, default: float) -> float:
    """The budget to certify at: `default` (the checkpoint's certify.eps) when eps is None.

    Args:
      eps: None or a number >= 0 in pixel units ([0, 1] scale, the family's l_p norm).
      default: the checkpoint's eps.
    Returns:
      eps as a float; ValueError naming the fix for anything else.
    """
    if eps is None:
        return float(default)
    try:
        if isinstance(eps, (str, bytes, bool, np.bool_)):
            raise TypeError
        eps = float(eps)
    except (TypeError, ValueError):
        raise ValueError(f"eps must be a number >= 0 (pixel units, e.g. 8/255), got {eps!r}") from None
    if not (math.isfinite(eps) and eps >= 0.0):
        raise ValueError(f"eps must be a finite number >= 0 (pixel units), got {eps}")
    return eps


def as_labels(labels, count: int, num_classes: int):
    """A user's labels as int32 class indices, or None when none are given.

    Args:
      labels: None, or one integer class index per image (numpy, jax or a list), in [0, num_classes).
      count: the number of images.
      num_classes: the model's number of classes.
    Returns:
      None or an int32 array [count]; ValueError naming the fix for a wrong shape, a non-integer dtype (a
      float label gets its own message) or a class outside [0, num_classes).
    """
    if labels is None:
        return None
    array = np.asarray(labels)
    if array.shape != (count,):
        raise ValueError(
            f"labels must be one class index per image, shape ({count},); got shape {array.shape}"
        )
    if np.issubdtype(array.dtype, np.floating):
        raise ValueError(
            f"labels must be integer class indices, got dtype {array.dtype}: pass labels.astype(int) "
            "(a float label is refused rather than rounded)"
        )
    if array.dtype == bool or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"labels must be integer class indices in [0, {num_classes}), got dtype {array.dtype}"
        )
    if array.size and (array.min() < 0 or array.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}) (the model's classes), got values from {array.min()} to "
            f"{array.max()}"
        )
    return array.astype(np.int32)
