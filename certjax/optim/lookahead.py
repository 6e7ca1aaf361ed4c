"""Lookahead with the LiResNet++ epoch-end synchronisation (moved from certjax/optimizers.py).

Source: hukkai/liresnet train.py wraps `torch.optim.NAdam` in `timm.optim.Lookahead(optimizer)` with timm's
defaults alpha 0.5, k 6, and calls `optimizer.sync_lookahead()` after the last step of every epoch;
timm/optim/lookahead.py holds the slow-weight update. `lookahead` below is that wrapper as an optax
transformation; the trainer's optimizer.lookahead config (certjax.optim.make_optimizer) switches it on.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class LookaheadState(NamedTuple):
    count: jax.Array  # optimiser steps taken: the sync steps are a pure function of it (exact resume)
    slow: optax.Params  # the slow weights (equal to the params right after every synchronisation)
    inner: optax.OptState


def lookahead_sync_steps(count, k: int, steps_per_epoch: int):
    """Whether the optimiser step `count` synchronises the slow weights.

    timm's Lookahead.step updates the slow weights after every k-th step (lookahead_step % k == 0);
    hukkai/liresnet train.py also calls sync_lookahead() after the last step of every epoch.

    Args:
      count: traced int, optimiser steps taken including this one (1 at the first step).
      k: sync every k steps; 0 switches this trigger off.
      steps_per_epoch: sync at every epoch end; 0 switches this trigger off.

    Returns:
      (is `count` a sync step, was there a sync step before it), two traced bools.
    """
    sync = jnp.zeros((), bool)
    first = None
    for period in (k, steps_per_epoch):
        if period:
            sync = sync | (count % period == 0)
            first = period if first is None else min(first, period)
    if first is None:
        raise ValueError("lookahead needs k >= 1 or a synchronisation at every epoch end")
    return sync, count > first


def lookahead(inner, alpha: float, k: int, steps_per_epoch: int) -> optax.GradientTransformationExtraArgs:
    """timm.optim.Lookahead(inner, alpha, k) plus the original's sync_lookahead() at every epoch end.

    At a sync step (after the inner optimiser's update gave the fast weights f):
        s <- s + alpha (f - s),   f <- s           (timm lookahead.py update_slow)
    timm creates the slow buffer lazily, as a copy of the fast weights, at the FIRST sync; so that first sync
    changes nothing and the slow weights start there (not at the initial weights). A k-th step that is also
    an epoch's last step syncs twice in the original; the second is a no-op (f = s), so once here.

    The fast weights are the trainer's params; the slow ones live in this state (so a checkpoint holds both).
    At a sync step the emitted update is s_new - params, and the stored slow weights are params + that
    update, the very sum the trainer's optax.apply_updates computes: after the step fast == slow bitwise,
    and both equal the formula up to one float32 rounding of that sum.

    Args:
      inner: the wrapped optax transformation (its extra arguments, e.g. p_norm, are passed through).
      alpha: the slow weights' step towards the fast ones, in (0, 1].
      k: sync every k optimiser steps (0: never by count).
      steps_per_epoch: sync at every epoch end (0: never by epoch).

    Returns:
      An optax.GradientTransformationExtraArgs whose state is a LookaheadState.
    """
    inner = optax.with_extra_args_support(inner)

    def init(params):
        return LookaheadState(
            count=jnp.zeros((), jnp.int32), slow=jax.tree.map(jnp.copy, params), inner=inner.init(params)
        )

    def update(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError("lookahead needs the parameters")
        inner_updates, inner_state = inner.update(updates, state.inner, params, **extra_args)
        count = state.count + 1
        sync, had_sync = lookahead_sync_steps(count, k, steps_per_epoch)
        fast = optax.apply_updates(params, inner_updates)
        # before timm's first sync there is no slow buffer: it starts as a copy of the fast weights
        slow_before = jax.tree.map(lambda s, f: jnp.where(had_sync, s, f), state.slow, fast)
        target = jax.tree.map(lambda s, f: s + alpha * (f - s), slow_before, fast)
        to_target = jax.tree.map(lambda t, p: t - p, target, params)
        out = jax.tree.map(lambda a, b: jnp.where(sync, a, b), to_target, inner_updates)
        synced = optax.apply_updates(params, to_target)
        slow = jax.tree.map(lambda a, b: jnp.where(sync, a, b), synced, state.slow)
        return out, LookaheadState(count=count, slow=slow, inner=inner_state)

    return optax.GradientTransformationExtraArgs(init, update)
