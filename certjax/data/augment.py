"""Batched random crop (with padding) + horizontal flip per source, inside the jitted step from its rng.

The l_inf-dist Net / SortNet recipe pads by 3 with edge replication (zbh2047/L_inf-dist-net-v2, train.py:
`RandomCrop(32, padding=3, padding_mode='edge')`); LOT / LiResNet pad by 4 with zeros. LiResNet++
(hukkai/liresnet tools/dataset/tinyimgnet.py DDPM_dataset, tools/dataset/cifar.py) treats the two sources of a
batch apart: generated images get crop (pad 2) + flip, real ones crop (pad 4) + flip + RandAugment with p 0.5,
in that order (certjax.data.randaugment).

`augment_batch` is the step's entry point. With the defaults (`augment.generated` None, RandAugment off) it is
exactly `random_crop_flip(rng, whole batch)`, the same key and the same numbers as before per-source
augmentation existed, so existing runs and their resume tests stay bitwise identical.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from certjax.data.randaugment import rand_augment

PAD_MODES = ("constant", "edge")
# Keys of the per-source path are folded from the step's augmentation key with tags that random_crop_flip's
# own split (indices 0 and 1, and fold_in(k, i) == split(k)[i] under threefry) never produces.
GENERATED_KEY_TAG = 0x47454E  # "GEN"
RANDAUGMENT_KEY_TAG = 0x5241  # "RA"


def random_crop_flip(rng, images, *, pad: int, pad_mode: str = "constant", flip: bool = True):
    """images [B, H, W, C] (any dtype) -> same shape and dtype, each example cropped/flipped independently."""
    if pad_mode not in PAD_MODES:
        raise ValueError(f"augment.pad_mode must be 'constant' or 'edge', got {pad_mode!r}")
    batch, height, width, channels = images.shape
    crop_rng, flip_rng = jax.random.split(rng)
    if pad > 0:
        padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=pad_mode)
        offsets = jax.random.randint(crop_rng, (batch, 2), 0, 2 * pad + 1)

        def crop(image, offset):
            return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))

        images = jax.vmap(crop)(padded, offsets)
    if flip:
        do_flip = jax.random.bernoulli(flip_rng, 0.5, (batch, 1, 1, 1))
        images = jnp.where(do_flip, images[:, :, ::-1, :], images)
    return images


def augment_batch(rng, images, *, num_real: int, augment):
    """The training batch's augmentation: rows [0, num_real) are real images, the rest generated
    (pipeline.MixedBatches), num_real static. `augment` is config.augment: pad / pad_mode / flip for the real
    rows (and the generated ones unless `generated` is set), `generated` None or dict(pad, pad_mode, flip),
    `randaugment` dict(prob, num_ops, magnitude) for the real rows only, after their crop and flip."""
    real = {"pad": augment.pad, "pad_mode": augment.pad_mode, "flip": augment.flip}
    generated = augment.get("generated", None)
    randaugment = augment.get("randaugment", None) or {}
    prob = float(randaugment.get("prob", 0.0))
    if generated is None:
        # one crop/flip draw over the whole batch: the defaults' path, unchanged
        images = random_crop_flip(rng, images, **real)
    else:
        generated = {**real, **dict(generated)}  # a key left out is the real images' setting
        parts = []
        if num_real > 0:
            parts.append(random_crop_flip(rng, images[:num_real], **real))
        if num_real < images.shape[0]:
            generated_rng = jax.random.fold_in(rng, GENERATED_KEY_TAG)
            parts.append(random_crop_flip(generated_rng, images[num_real:], **generated))
        images = jnp.concatenate(parts)
    if prob > 0 and num_real > 0:
        augmented = rand_augment(
            jax.random.fold_in(rng, RANDAUGMENT_KEY_TAG),
            images[:num_real],
            prob=prob,
            num_ops=int(randaugment.get("num_ops", 2)),
            magnitude=int(randaugment.get("magnitude", 9)),
        )
        images = jnp.concatenate([augmented, images[num_real:]])
    return images


def normalize(images_uint8, mean, std):
    """uint8 [0, 255] -> (x/255 - mean) / std, float32. Float images are taken as pixels in [0, 1] already
    (certjax.restore accepts both); the rounding allowance of the uint8 path covers them (one op fewer)."""
    if images_uint8.dtype == jnp.uint8:
        x = images_uint8.astype(jnp.float32) / 255.0
    else:
        x = images_uint8.astype(jnp.float32)
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
