"""The optimiser of a training run, built from config.optimizer (moved from certjax/train.py make_optimizer).

The pieces are registries keyed by the config's names: `OPTIMIZERS` (optimizers.py) for
optimizer.name and `SCHEDULES` (schedules.py) for optimizer.schedule; config_checks validates the names
against their keys. `make_optimizer` returns the learning-rate schedule it trains with next to the
transformation, so the trainer logs that very schedule instead of building a second one.
"""

from __future__ import annotations

import optax
from flax import traverse_util

from certjax.optim.lookahead import lookahead
from certjax.optim.optimizers import OPTIMIZERS
from certjax.optim.schedules import SCHEDULES, learning_rate_schedule

__all__ = ["OPTIMIZERS", "SCHEDULES", "learning_rate_schedule", "make_optimizer"]


def _parameter_groups(params, decayed_modules=()):
    """ "scale" for the logit scale (its own learning rate), "decayed" for the parameters of the modules whose
    name starts with one of `decayed_modules`, "main" for every other parameter."""

    def group(path) -> str:
        if path[-1] == "logit_scale":
            return "scale"
        if decayed_modules and str(path[0]).startswith(tuple(decayed_modules)):
            return "decayed"
        return "main"

    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: group(k) for k in flat})


def make_optimizer(opt_config, total_steps: int, steps_per_epoch: int):
    """Adam/AdamW/NAdam/SGD (OPTIMIZERS) with a per-step schedule (SCHEDULES); the logit scale gets its own
    learning rate (optimizer.scale_lr; v2: 0.006).

    optimizer.lookahead = dict(alpha, k, sync_every_epoch[, enabled]) wraps the whole update (clipping
    included) in Lookahead (certjax.optim.lookahead; LiResNet++: timm's alpha 0.5, k 6, plus a sync at
    every epoch end); None or absent = no Lookahead. The slow weights are in the optimiser state.

    Args:
      opt_config: config.optimizer.
      total_steps: steps of the whole run.
      steps_per_epoch: converts the config's epochs (warmup, Lookahead's epoch-end sync) to steps.

    Returns:
      (tx, schedule): the optax transformation, and the learning-rate schedule of the main parameters
      (step -> lr at optimizer.lr) that tx trains with, for the log.
    """
    schedule = learning_rate_schedule(opt_config, opt_config.lr, total_steps, steps_per_epoch)
    if opt_config.name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name {opt_config.name!r}; valid: {', '.join(OPTIMIZERS)}")
    build = OPTIMIZERS[opt_config.name]
    scale_lr = opt_config.get("scale_lr", 0.0) or opt_config.lr
    scale_schedule = learning_rate_schedule(opt_config, scale_lr, total_steps, steps_per_epoch)
    # SortNet decays only the non-distance parameters: the logit scale (optimizer.decay_scale_only) and,
    # in its hybrid model, the head's modules (optimizer.decayed_modules: name prefixes, at the main rate).
    main_decay = not opt_config.get("decay_scale_only", False)
    decayed_modules = tuple(opt_config.get("decayed_modules", ()) or ())
    transforms = {
        "main": build(opt_config, schedule, main_decay),
        "scale": build(opt_config, scale_schedule, True),
    }
    if decayed_modules:  # a third group only when asked: the other runs keep their optimiser state's layout
        transforms["decayed"] = build(opt_config, schedule, True)
    tx = optax.multi_transform(transforms, lambda params: _parameter_groups(params, decayed_modules))
    if opt_config.get("clip_norm", 0.0):
        tx = optax.chain(optax.clip_by_global_norm(opt_config.clip_norm), tx)
    spec = opt_config.get("lookahead", None)
    if spec is not None and spec.get("enabled", True):
        sync_period = steps_per_epoch if spec.get("sync_every_epoch", True) else 0
        tx = lookahead(tx, spec.get("alpha", 0.5), spec.get("k", 6), sync_period)
    return tx, schedule
