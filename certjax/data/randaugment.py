"""RandAugment as torchvision applies it to PIL images, batched in JAX inside the jitted train step.

Which RandAugment: the LiResNet++ recipe (hukkai/liresnet, tools/dataset/cifar.py) trains the real CIFAR
images with RandomCrop(32, padding=4) -> RandomHorizontalFlip() -> RandomApply([RandAugment()]) -> ToTensor(),
on PIL images. So: after the crop and the flip, with probability 0.5 (RandomApply's default), torchvision's
RandAugment with its defaults: num_ops 2, magnitude 9 of 31 bins, nearest interpolation, fill 0. Each op is
drawn uniformly from the 14 of torchvision's `_augmentation_space` (Identity, ShearX, ShearY, TranslateX,
TranslateY, Rotate, Brightness, Color, Contrast, Sharpness, Posterize, Solarize, AutoContrast, Equalize); the
signed ones are negated with probability 1/2. On PIL images torchvision hands every op to Pillow
(Image.transform / rotate, ImageEnhance, ImageOps), so Pillow's integer semantics are what this module
reproduces, op by op:

- geometric ops: Pillow's nearest-neighbour affine map in 16.16 fixed point (src = (a2 + a0 x + a1 y) >> 16 on
  output pixel x, y), out-of-image pixels 0; the matrices are torchvision's `_get_inverse_affine_matrix`
  (shear about the corner [0, 0], translation by int(magnitude)) and Pillow's `Image.rotate` (about the
  centre);
- Brightness / Color / Contrast / Sharpness: Pillow's blend of a degenerate image with the image by the factor
  1 + magnitude, in float32, truncated and clipped (black; the ITU-R 601 grey (R 19595 + G 38470 + B 7471 +
  2^15) >> 16; the grey mean rounded; the 3x3 SMOOTH filter with the image border kept);
- Posterize / Solarize / AutoContrast / Equalize: ImageOps' per-channel lookup tables.

Why written here and not taken from a library: the augmentation must stay a pure function of the step's key
inside the jitted step (a resumed run is then bitwise identical with no iterator state, DESIGN.md "Data
flow"), on uint8 arrays; dm-pix and augmax have no posterize / equalize / autocontrast with Pillow's integer
semantics, imgaug is unmaintained, albumentations runs on the host with OpenCV, and torchvision needs torch.

All ops of a round are computed for every image and the drawn one is selected (no data-dependent control flow
under vmap); rounds run in a `lax.scan`, so the compiled size does not grow with num_ops.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

NUM_BINS = 31  # torchvision RandAugment's num_magnitude_bins default
OPS = (
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
)
GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
BLENDS = ("Brightness", "Color", "Contrast", "Sharpness")
_FIXED_ONE = 65536.0  # Pillow's affine_fixed: 16 fractional bits


def _linspace_bin(start: float, end: float, index: int) -> float:
    """torch.linspace(start, end, NUM_BINS)[index] in float32, as torchvision reads it with .item()."""
    return float(np.linspace(np.float32(start), np.float32(end), NUM_BINS, dtype=np.float32)[index])


def magnitudes(magnitude: int, height: int = 32, width: int = 32) -> dict[str, float]:
    """The unsigned magnitude of each op at bin `magnitude` (torchvision `_augmentation_space`)."""
    if not 0 <= magnitude < NUM_BINS:
        raise ValueError(f"augment.randaugment.magnitude must be in [0, {NUM_BINS - 1}], got {magnitude}")
    return {
        "ShearX": _linspace_bin(0.0, 0.3, magnitude),
        "ShearY": _linspace_bin(0.0, 0.3, magnitude),
        "TranslateX": _linspace_bin(0.0, 150.0 / 331.0 * width, magnitude),
        "TranslateY": _linspace_bin(0.0, 150.0 / 331.0 * height, magnitude),
        "Rotate": _linspace_bin(0.0, 30.0, magnitude),
        "Brightness": _linspace_bin(0.0, 0.9, magnitude),
        "Color": _linspace_bin(0.0, 0.9, magnitude),
        "Contrast": _linspace_bin(0.0, 0.9, magnitude),
        "Sharpness": _linspace_bin(0.0, 0.9, magnitude),
        # 8 - round(bin / ((bins - 1) / 4)), torch.round: half to even
        "Posterize": float(8 - int(np.round(magnitude / ((NUM_BINS - 1) / 4)))),
        "Solarize": _linspace_bin(255.0, 0.0, magnitude),
    }


# --------------------------------------------------------------------------------------- geometric ops


def pillow_inverse_matrix(op: str, magnitude: float, height: int = 32, width: int = 32) -> list[float]:
    """The (a0, a1, a2, a3, a4, a5) Pillow's Image.transform(AFFINE) receives for a signed magnitude: input
    point = (a0 x + a1 y + a2, a3 x + a4 y + a5) of output point (x, y) (pixel centres at +0.5)."""
    if op in ("ShearX", "ShearY"):
        # torchvision _get_inverse_affine_matrix with shear angle atan(m) about center [0, 0]: the inverse of
        # x' = x - m y (ShearX) is x = x' + m y'
        return (
            [1.0, magnitude, 0.0, 0.0, 1.0, 0.0] if op == "ShearX" else [1.0, 0.0, 0.0, magnitude, 1.0, 0.0]
        )
    if op in ("TranslateX", "TranslateY"):
        shift = float(int(magnitude))  # torchvision: translate=[int(magnitude), 0], truncation toward 0
        return [1.0, 0.0, -shift, 0.0, 1.0, 0.0] if op == "TranslateX" else [1.0, 0.0, 0.0, 0.0, 1.0, -shift]
    if op == "Rotate":
        # Pillow Image.rotate(angle) about (w/2, h/2): angle counter-clockwise, the matrix rounded to 15
        # digits
        angle = -math.radians(magnitude % 360.0)
        cos, sin = round(math.cos(angle), 15), round(math.sin(angle), 15)
        cx, cy = width / 2.0, height / 2.0
        return [cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy]
    return [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def fixed_point(matrix) -> np.ndarray:
    """Pillow's affine_fixed coefficients: FIX(v) = floor(v * 2^16 + 0.5), the offsets moved to the pixel
    centres (a2 + a0/2 + a1/2, a5 + a3/2 + a4/2). int32 [6]."""
    a0, a1, a2, a3, a4, a5 = matrix

    def fix(value):
        return math.floor(value * _FIXED_ONE + 0.5)

    centre_x = a2 + a0 * 0.5 + a1 * 0.5
    centre_y = a5 + a3 * 0.5 + a4 * 0.5
    return np.asarray([fix(a0), fix(a1), fix(centre_x), fix(a3), fix(a4), fix(centre_y)], np.int32)


def affine_nearest(images, fixed):
    """images uint8 [N, H, W, C], fixed int32 [N, 6] -> uint8 [N, H, W, C]: output (x, y) takes input
    ((c2 + c0 x + c1 y) >> 16, (c5 + c3 x + c4 y) >> 16), 0 outside the image (Pillow, nearest)."""
    n, height, width, channels = images.shape
    y, x = jnp.meshgrid(
        jnp.arange(height, dtype=jnp.int32), jnp.arange(width, dtype=jnp.int32), indexing="ij"
    )
    c = [fixed[:, i, None, None] for i in range(6)]
    src_x = jnp.right_shift(c[2] + c[0] * x + c[1] * y, 16)  # arithmetic shift: floor, as Pillow's >> 16
    src_y = jnp.right_shift(c[5] + c[3] * x + c[4] * y, 16)
    inside = (src_x >= 0) & (src_x < width) & (src_y >= 0) & (src_y < height)
    flat = jnp.clip(src_y, 0, height - 1) * width + jnp.clip(src_x, 0, width - 1)
    gathered = jnp.take_along_axis(
        images.reshape(n, height * width, channels), flat.reshape(n, height * width, 1), axis=1
    ).reshape(images.shape)
    return jnp.where(inside[..., None], gathered, jnp.zeros((), images.dtype))


# -------------------------------------------------------------------------------------------- colour ops


def grey(images):
    """Pillow's RGB -> L: (R 19595 + G 38470 + B 7471 + 2^15) >> 16, int32 [N, H, W, 1]."""
    x = images.astype(jnp.int32)
    weighted = x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000
    return jnp.right_shift(weighted, 16)[..., None]


def blend(degenerate, images, factor):
    """Pillow ImagingBlend(degenerate, image, factor): degenerate + factor (image - degenerate) in float32,
    truncated toward 0, clipped to [0, 255]. factor float32 [N]."""
    lo = degenerate.astype(jnp.float32)
    diff = (images.astype(jnp.int32) - degenerate.astype(jnp.int32)).astype(jnp.float32)
    value = lo + factor[:, None, None, None] * diff
    return jnp.clip(jnp.trunc(value), 0.0, 255.0).astype(jnp.uint8)


def smooth(images):
    """Pillow's ImageFilter.SMOOTH (3x3 kernel 1 1 1 / 1 5 1 / 1 1 1, divided by 13) on the interior, rounded;
    the one-pixel border copied unchanged (Pillow's ImagingFilter3x3)."""
    x = images.astype(jnp.float32)
    n, height, width, _ = images.shape
    total = 4.0 * x[:, 1:-1, 1:-1]  # centre weight 5 = 4 + the 1 of the 3x3 sum below
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            total = total + x[:, dy : dy + height - 2, dx : dx + width - 2]
    interior = jnp.clip(jnp.floor(total / 13.0 + 0.5), 0.0, 255.0).astype(jnp.uint8)
    return images.at[:, 1:-1, 1:-1].set(interior)


def apply_lut(images, lut):
    """images uint8 [N, H, W, C], lut [N, C, 256] -> lut[n, c, images[n, h, w, c]] as uint8."""
    n, height, width, channels = images.shape
    flat = images.reshape(n, height * width, channels).astype(jnp.int32)
    out = jnp.take_along_axis(jnp.swapaxes(lut, 1, 2), flat, axis=1)  # [N, HW, C] from [N, 256, C]
    return out.reshape(images.shape).astype(jnp.uint8)


def histograms(images):
    """Per image and channel: counts of each value, int32 [N, C, 256]."""
    n, height, width, channels = images.shape
    values = images.reshape(n, height * width, channels).astype(jnp.int32)
    rows = jnp.arange(n)[:, None, None]
    cols = jnp.arange(channels)[None, None, :]
    return jnp.zeros((n, channels, 256), jnp.int32).at[rows, cols, values].add(1)


def autocontrast_lut(hist):
    """ImageOps.autocontrast (cutoff 0): per channel, [lo, hi] -> [0, 255], floor((v - lo) 255 / (hi - lo))
    clipped; identity where hi <= lo. Exact integers: Pillow computes int(v scale + offset) in double, which
    can land one below where (v - lo) 255 / (hi - lo) is an integer (the tests allow exactly that)."""
    levels = jnp.arange(256, dtype=jnp.int32)
    present = hist > 0
    lo = jnp.argmax(present, axis=-1)[..., None]
    hi = (255 - jnp.argmax(present[..., ::-1], axis=-1))[..., None]
    span = jnp.maximum(hi - lo, 1)
    stretched = jnp.clip(jnp.floor_divide((levels - lo) * 255, span), 0, 255)
    return jnp.where(hi > lo, stretched, levels)


def equalize_lut(hist):
    """ImageOps.equalize: step = (count - count of the top present value) // 255; lut[i] = (step // 2 +
    count below i) // step, clipped to 255; identity with one present value or step 0."""
    levels = jnp.arange(256, dtype=jnp.int32)
    total = jnp.sum(hist, axis=-1, keepdims=True)
    top = 255 - jnp.argmax((hist > 0)[..., ::-1], axis=-1)[..., None]
    top_count = jnp.take_along_axis(hist, top, axis=-1)
    step = (total - top_count) // 255
    below = jnp.cumsum(hist, axis=-1) - hist  # exclusive prefix sum
    lut = jnp.minimum((step // 2 + below) // jnp.maximum(step, 1), 255)
    several = jnp.sum(hist > 0, axis=-1, keepdims=True) > 1
    return jnp.where(several & (step > 0), lut, levels)


def posterize(images, bits: int):
    """ImageOps.posterize: keep the top `bits` bits (uint8 images or int levels)."""
    return images & jnp.asarray((0xFF << (8 - bits)) & 0xFF, images.dtype)


def solarize(images, threshold: float):
    """ImageOps.solarize: values >= threshold inverted."""
    return jnp.where(images.astype(jnp.float32) < threshold, images, 255 - images)


# --------------------------------------------------------------------------------------------- the policy


def _geometric_table(magnitude: int, height: int, width: int) -> np.ndarray:
    """int32 [len(OPS), 2, 6]: the fixed-point matrix of every op for sign + (0) and - (1); identity for
    the non-geometric ops."""
    mags = magnitudes(magnitude, height, width)
    table = np.zeros((len(OPS), 2, 6), np.int32)
    for i, op in enumerate(OPS):
        for s, sign in enumerate((1.0, -1.0)):
            value = sign * mags[op] if op in GEOMETRIC else 0.0
            table[i, s] = fixed_point(pillow_inverse_matrix(op, value, height, width))
    return table


def apply_ops(images, op_index, negative, magnitude: int):
    """One RandAugment round: image n gets OPS[op_index[n]] at bin `magnitude`, negated where negative[n].
    images uint8 [N, H, W, 3]; op_index int32 [N]; negative bool [N]."""
    _, height, width, _ = images.shape
    mags = magnitudes(magnitude, height, width)
    table = jnp.asarray(_geometric_table(magnitude, height, width))
    fixed = table[op_index, negative.astype(jnp.int32)]
    sign = jnp.where(negative, -1.0, 1.0).astype(jnp.float32)
    hist = histograms(images)
    grey_images = grey(images)
    # ImageEnhance.Contrast: a constant image at int(mean(L) + 0.5); ImageStat's mean over the L histogram
    mean = jnp.sum(grey_images, axis=(1, 2, 3)).astype(jnp.float32) / (height * width)
    contrast_level = jnp.floor(mean + 0.5).astype(jnp.uint8)[:, None, None, None]
    degenerates = {
        "Brightness": jnp.zeros_like(images),
        "Color": jnp.broadcast_to(grey_images.astype(jnp.uint8), images.shape),
        "Contrast": jnp.broadcast_to(contrast_level, images.shape),
        "Sharpness": smooth(images),
    }
    candidates = {"Identity": images}
    geometric = affine_nearest(images, fixed)
    for op in GEOMETRIC:
        candidates[op] = geometric
    for op in BLENDS:
        factor = (1.0 + sign * np.float32(mags[op])).astype(jnp.float32)
        candidates[op] = blend(degenerates[op], images, factor)
    # the four lookup-table ops share one gather (the costly part on CPU): each image's table is selected
    # first
    levels = jnp.arange(256, dtype=jnp.int32)
    tables = {
        "Posterize": jnp.broadcast_to(posterize(levels, int(mags["Posterize"])), hist.shape),
        "Solarize": jnp.broadcast_to(solarize(levels, mags["Solarize"]), hist.shape),
        "AutoContrast": autocontrast_lut(hist),
        "Equalize": equalize_lut(hist),
    }
    table = jnp.select(
        [op_index[:, None, None] == OPS.index(op) for op in tables], list(tables.values()), levels
    )
    looked_up = apply_lut(images, table)
    for op in tables:
        candidates[op] = looked_up
    # select per image by masks (a [len(OPS), N, H, W, C] stack and gather is several times slower on CPU)
    groups = {
        "Identity": ("Identity",),
        "geometric": GEOMETRIC,
        **{op: (op,) for op in BLENDS},
        "lut": tuple(tables),
    }
    conditions = [jnp.isin(op_index, jnp.asarray([OPS.index(op) for op in ops])) for ops in groups.values()]
    results = [candidates[ops[0]] for ops in groups.values()]
    return jnp.select([c[:, None, None, None] for c in conditions], results, images)


def rand_augment(rng, images, *, prob: float, num_ops: int = 2, magnitude: int = 9):
    """Each image, with probability `prob`, gets `num_ops` ops drawn uniformly from OPS (signed ops negated
    with probability 1/2), torchvision RandAugment under RandomApply. uint8 [N, H, W, 3] in and out."""
    if images.dtype != jnp.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"rand_augment takes uint8 [N, H, W, 3] images, got {images.dtype} {images.shape}")
    n = images.shape[0]
    if prob <= 0 or num_ops <= 0 or n == 0:
        return images
    apply_rng, op_rng, sign_rng = jax.random.split(rng, 3)
    op_index = jax.random.randint(op_rng, (num_ops, n), 0, len(OPS))
    negative = jax.random.bernoulli(sign_rng, 0.5, (num_ops, n))

    def one_round(current, draws):
        return apply_ops(current, draws[0], draws[1], magnitude), None

    augmented, _ = jax.lax.scan(one_round, images, (op_index, negative))
    apply = jax.random.bernoulli(apply_rng, prob, (n, 1, 1, 1))
    return jnp.where(apply, augmented, images)
