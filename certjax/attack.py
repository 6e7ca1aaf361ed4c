"""PGD attacks (Madry et al., 2018) in pixel space, used to audit certificates, never to make them.

`pgd_linf` maximises the worst margin max_{j != y} z_j - z_y over the l_inf ball of radius eps around the
pixel image x in [0, 1], with random starts; it returns the adversarial images and their smallest margins
(z_y - max_{j != y} z_j; < 0 means the attack succeeded). A certified point must never reach a margin below
0, and no point's margin may drop by more than the certified Lipschitz bound allows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from certjax.certify.margins import smallest_margin
from certjax.certify.norms import l2_norm_per_example


def _pgd(logits_fn, images, labels, rng, steps: int, restarts: int, random_start, ascent_step):
    """The restart loop both threat models share: from each random start, `steps` projected ascent steps on
    the summed negative margin; per example, keep the restart that reached the smallest margin."""

    def margin_of(x):
        return smallest_margin(logits_fn(x), labels)

    grad_fn = jax.grad(lambda x: -jnp.sum(margin_of(x)))

    def one_restart(carry, key):
        best_x, best_margin = carry

        def step(x, _):
            return ascent_step(x, grad_fn(x)), None

        x, _ = jax.lax.scan(step, random_start(key), None, length=steps)
        margin = margin_of(x)
        better = margin < best_margin
        best_x = jnp.where(better[:, None, None, None], x, best_x)
        return (best_x, jnp.minimum(margin, best_margin)), None

    start = (images, margin_of(images))
    (best_x, best_margin), _ = jax.lax.scan(one_restart, start, jax.random.split(rng, restarts))
    return best_x, best_margin


@functools.partial(jax.jit, static_argnames=("logits_fn", "steps", "restarts"))
def pgd_linf(logits_fn, images, labels, eps, rng, *, steps: int = 100, restarts: int = 5, step_size=None):
    """logits_fn: pixel images [B,H,W,C] in [0,1] -> logits. Returns (adversarial images, margins)."""
    step_size = eps / 4 if step_size is None else step_size

    def project(x):
        return jnp.clip(jnp.clip(x, images - eps, images + eps), 0.0, 1.0)

    def random_start(key):
        return project(images + jax.random.uniform(key, images.shape, minval=-eps, maxval=eps))

    def ascent_step(x, g):
        return project(x + step_size * jnp.sign(g))

    return _pgd(logits_fn, images, labels, rng, steps, restarts, random_start, ascent_step)


def _l2_norm(x):
    return l2_norm_per_example(x).reshape((-1,) + (1,) * (x.ndim - 1))


@functools.partial(jax.jit, static_argnames=("logits_fn", "steps", "restarts"))
def pgd_l2(logits_fn, images, labels, eps, rng, *, steps: int = 100, restarts: int = 5, step_size=None):
    """l_2 PGD in pixel space: normalised-gradient steps, then projection onto the l_2 ball of radius eps and
    onto [0, 1] (clipping to the box after the ball projection can only shrink the perturbation). Returns
    (adversarial images, smallest margins)."""
    step_size = eps / 4 if step_size is None else step_size

    def project(x):
        delta = x - images
        delta = delta * jnp.minimum(1.0, eps / jnp.maximum(_l2_norm(delta), 1e-12))
        return jnp.clip(images + delta, 0.0, 1.0)

    def random_start(key):  # uniform radius in [0, eps), uniform direction
        direction = jax.random.normal(key, images.shape)
        radius = jax.random.uniform(jax.random.fold_in(key, 1), (images.shape[0],) + (1,) * (images.ndim - 1))
        return project(images + eps * radius * direction / jnp.maximum(_l2_norm(direction), 1e-12))

    def ascent_step(x, g):
        return project(x + step_size * g / jnp.maximum(_l2_norm(g), 1e-12))

    return _pgd(logits_fn, images, labels, rng, steps, restarts, random_start, ascent_step)
