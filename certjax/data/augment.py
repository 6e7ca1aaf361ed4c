"""Batched random crop (with padding) + horizontal flip, run inside the jitted step from the step's rng.

The l_inf-dist Net / SortNet recipe pads by 3 with edge replication (zbh2047/L_inf-dist-net-v2, train.py:
`RandomCrop(32, padding=3, padding_mode='edge')`); LOT / LiResNet pad by 4 with zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def random_crop_flip(rng, images, *, pad: int, pad_mode: str = "constant", flip: bool = True):
    """images [B, H, W, C] (any dtype) -> same shape and dtype, each example cropped/flipped independently."""
    if pad_mode not in ("constant", "edge"):
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


def normalize(images_uint8, mean, std):
    """uint8 [0, 255] -> (x/255 - mean) / std, float32. Float images are taken as pixels in [0, 1] already
    (certjax.api accepts both); the rounding allowance of the uint8 path covers them (one op fewer)."""
    if images_uint8.dtype == jnp.uint8:
        x = images_uint8.astype(jnp.float32) / 255.0
    else:
        x = images_uint8.astype(jnp.float32)
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
