"""PGD (Madry et al., 2018, "Towards Deep Learning Models Resistant to Adversarial Attacks", Sec. 2) in pixel
space, for any threat model; used to audit certificates (certjax/audit.py, tests), never to make them.

`pgd` minimises, over the eps ball of the threat model around pixel images x in [0, 1], either the smallest
margin z_y - max_{j != y} z_j (untargeted) or, per example with targets[b] = j >= 0, the single margin
z_y - z_j (margin-targeted). From the clean images and `restarts` random starts it takes `steps` projected
steepest-ascent steps (the threat model's record, certjax/certify/threat_models.py: l_inf signed-gradient,
l_2 normalised-gradient) and keeps, per example, the point of the smallest *smallest* margin reached (< 0:
the attack succeeded). A certified point must never reach a margin <= 0, and no margin may drop by more
than the certified Lipschitz bound allows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from certjax.certify.margins import smallest_margin, true_class_logit
from certjax.certify.threat_models import get_threat_model


def _objective(logits, labels, targets):
    """The margin PGD lowers: smallest (targets None or -1) or z_y - z_target, per example."""
    if targets is None:
        return smallest_margin(logits, labels)
    target_margin = (
        true_class_logit(logits, labels)[:, 0] - true_class_logit(logits, jnp.maximum(targets, 0))[:, 0]
    )
    return jnp.where(targets >= 0, target_margin, smallest_margin(logits, labels))


@functools.partial(jax.jit, static_argnames=("logits_fn", "threat_model", "steps", "restarts"))
def pgd(
    logits_fn,
    weights,
    images,
    labels,
    eps,
    rng,
    *,
    threat_model: str,
    targets=None,
    steps: int = 100,
    restarts: int = 5,
    step_size=None,
):
    """Projected gradient descent on the margins of pixel images (see the module docstring).

    Args:
      logits_fn: (weights, pixel images [B, H, W, C] in [0, 1]) -> logits [B, C]; static (hashable), so
        that one compilation serves every call with the same function.
      weights: any pytree logits_fn takes (the model's variables): an argument of the compiled function,
        not a constant baked into it (paper-size networks hold hundreds of MB). None where unused.
      images: [B, H, W, C] pixel images in [0, 1]. labels: [B] int true classes.
      eps: the radius of the ball (pixel units). rng: a jax key.
      threat_model: "linf" or "l2" (certjax.certify.threat_models).
      targets: optional [B] int: the class j whose margin z_y - z_j is attacked, -1 for the smallest margin.
      steps, restarts: ascent steps per start, random starts. step_size: default eps / 4.

    Returns:
      (adversarial images [B, H, W, C], their smallest margins [B]).
    """
    model = get_threat_model(threat_model)
    step_size = eps / 4 if step_size is None else step_size

    def margin_of(x):
        return smallest_margin(logits_fn(weights, x), labels)

    grad_fn = jax.grad(lambda x: -jnp.sum(_objective(logits_fn(weights, x), labels, targets)))

    def one_restart(carry, key):
        best_x, best_margin = carry

        def step(x, _):
            return model.project(x + model.ascent_step(grad_fn(x), step_size), images, eps), None

        x, _ = jax.lax.scan(step, model.random_start(key, images, eps), None, length=steps)
        margin = margin_of(x)
        better = margin < best_margin
        best_x = jnp.where(better[:, None, None, None], x, best_x)
        return (best_x, jnp.minimum(margin, best_margin)), None

    start = (images, margin_of(images))
    (best_x, best_margin), _ = jax.lax.scan(one_restart, start, jax.random.split(rng, restarts))
    return best_x, best_margin
