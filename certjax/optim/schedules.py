"""Schedules of the training step: the learning rate (`SCHEDULES`) and the per-step values of the loss.

Moved from certjax/train.py (learning_rate_schedule, now the SCHEDULES registry) and certjax/schedules.py
(schedule_values).

Learning rate. `learning_rate_schedule` turns config.optimizer (schedule name, warmup_epochs, milestones,
...) into an optax schedule of the step: an optional linear warmup from 0 over warmup_epochs, then the named
decay over the remaining steps. certjax.optim.make_optimizer builds it once and returns it, so the schedule
that trains is the one the trainer logs. A warmup that does not fit in a short run is scaled to half the run
before training (`fit_warmup`, with one printed line).

Per-step values, fed to the jitted train step as traced scalars (`schedule_values`). The l_p schedule of
the l_inf-dist Net / SortNet (zbh2047/L_inf-dist-net-v2, train.py `--p-start 8 --p-end 1000 --epochs
0,0,100,1250,1300`): p = p_start for the first `start_fraction` of training, then grows geometrically per
step to p_end at `end_fraction`, then p = inf. The mixing weight lam of the mixture loss decays
geometrically from lam0 to lam_end with the same progress. Fractions (not epochs) make the schedule scale
with `train.epochs` (the seed trains 800 / 1600 epochs).

An optional eps ramp (`config.loss.eps_ramp` = dict(start, end, end_fraction)) scales eps_train per epoch:
eps_t = eps_train * (start + (end - start) * min(epoch / (end_fraction * epochs), 1)) with the whole epochs
done so far (LiResNet, hu23 snapshot train.py eps_fn: 0.1 eps -> 1.5 eps over the first half).

An optional eps schedule (`config.loss.eps_schedule` = dict(kind, end_fraction[, start_fraction, smooth]))
scales eps_train by a shape of the step progress r from start_fraction to end_fraction (zbh2047/SortNet
main.py create_schedule, `--epochs` eps start / end and `--eps-smooth`): kind "linear" is r; kind "smooth"
(smooth = s > 0) is k r^4 while r < s, k = 1 / ((4 - 3 s) s^3), then the straight line through (s, k s^4)
and (1, 1), which meets the quartic with the same slope 4 / (4 - 3 s).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
import optax

# ------------------------------------------------------------------------------------------ learning rate
# Each factory: (optimizer config, base lr, total steps, warmup steps) -> the optax schedule that follows the
# warmup, counted from the warmup's end.


def _cosine(opt_config, base_lr: float, total_steps: int, warmup: int):
    cosine = optax.cosine_decay_schedule(base_lr, max(total_steps - warmup, 1))
    floor = opt_config.get("cosine_floor", 0.0)  # BRONet tools/scheduler.py: max(cosine ratio, 1e-5)
    return cosine if not floor else (lambda step: jnp.maximum(cosine(step), floor * base_lr))


def _constant(opt_config, base_lr: float, total_steps: int, warmup: int):
    return optax.constant_schedule(base_lr)


def _multistep(opt_config, base_lr: float, total_steps: int, warmup: int):
    # optimizer.milestones: fractions of the whole run; each multiplies the lr by optimizer.gamma
    boundaries = {
        int(round(f * total_steps)) - warmup: opt_config.get("gamma", 0.1)
        for f in opt_config.get("milestones", (0.5, 0.75))
    }
    return optax.piecewise_constant_schedule(base_lr, boundaries)


def _hold_cosine(opt_config, base_lr: float, total_steps: int, warmup: int):
    # l_inf-dist Net v1 (main.py create_schedule): constant for the first hold_fraction of the steps,
    # then cosine to 0 over the rest
    hold = int(round(opt_config.hold_fraction * total_steps)) - warmup
    cosine = optax.cosine_decay_schedule(base_lr, max(total_steps - warmup - hold, 1))
    return optax.join_schedules([optax.constant_schedule(base_lr), cosine], [hold])


# config.optimizer.schedule -> factory; config_checks validates the name against these keys
SCHEDULES: dict[str, Callable[..., optax.Schedule]] = {
    "cosine": _cosine,
    "constant": _constant,
    "multistep": _multistep,
    "hold_cosine": _hold_cosine,
}


def learning_rate_schedule(
    opt_config, base_lr: float, total_steps: int, steps_per_epoch: int
) -> optax.Schedule:
    """The learning rate of every step: linear warmup from 0, then SCHEDULES[opt_config.schedule].

    Args:
      opt_config: config.optimizer (schedule, warmup_epochs and the schedule's own keys).
      base_lr: the peak learning rate (optimizer.lr, or scale_lr for the logit scale).
      total_steps: steps of the whole run.
      steps_per_epoch: converts warmup_epochs to steps.

    Returns:
      An optax schedule: step -> learning rate.
    """
    warmup = int(round(opt_config.get("warmup_epochs", 0) * steps_per_epoch))
    name = opt_config.schedule
    if name not in SCHEDULES:
        raise ValueError(f"optimizer.schedule {name!r}; valid: {', '.join(SCHEDULES)}")
    decay = SCHEDULES[name](opt_config, base_lr, total_steps, warmup)
    if warmup:
        return optax.join_schedules([optax.linear_schedule(0.0, base_lr, warmup), decay], [warmup])
    return decay


def fit_warmup(config) -> str | None:
    """A warmup as long as the run or longer (the LiResNet demos' 1 epoch with --config.train.epochs=1, the
    full recipes' 20 with fewer epochs) is scaled to half the run, in place, instead of stopping the run;
    a warmup shorter than the run is left as it is.

    Args:
      config: the whole training config (optimizer.warmup_epochs, train.epochs); changed in place.

    Returns:
      The line that says what was scaled, None when nothing was.
    """
    warmup, epochs = config.optimizer.get("warmup_epochs", 0), config.train.epochs
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (warmup, epochs))
    if not numbers or epochs < 1 or not 0 < epochs <= warmup:  # config_checks names a bad value
        return None
    scaled = epochs / 2
    with config.optimizer.ignore_type():  # an int field (20) takes the float (0.5)
        config.optimizer.warmup_epochs = scaled
    return (
        f"optimizer.warmup_epochs={warmup:g} does not fit in train.epochs={epochs}: warming up for "
        f"{scaled:g} epochs (half the run) instead"
    )


# ---------------------------------------------------------------------------------------- per-step values


def has_p_schedule(config) -> bool:
    """Whether the model's l_p norm follows a schedule (the l_inf-dist Net, SortNet): only then is p a
    number worth printing and logging (it is inf, and unused, for the l_2 families)."""
    ps = config.get("p_schedule")
    return ps is not None and bool(ps.get("enabled", True))


def progress(step: int, total_steps: int, start_fraction: float, end_fraction: float) -> float:
    """0 before start_fraction of training, 1 after end_fraction, linear in steps in between.

    Args:
      step: the step (0-based); total_steps: steps of the whole run.
      start_fraction, end_fraction: where the ramp starts and ends, as fractions of total_steps.

    Returns:
      The progress in [0, 1].
    """
    start = start_fraction * total_steps
    end = end_fraction * total_steps
    if end <= start:
        return 0.0 if step < start else 1.0
    return float(np.clip((step - start) / (end - start), 0.0, 1.0))


def geometric(start: float, end: float, t: float) -> float:
    """The geometric interpolation start * (end / start) ** t: start at t = 0, end at t = 1."""
    return start * (end / start) ** t


EPS_SCHEDULE_KINDS = ("linear", "smooth")


def eps_schedule_factor(kind: str, ratio: float, smooth: float = 0.0) -> float:
    """The fraction of eps_train at progress `ratio` in [0, 1] (module docstring; the original's "linear"
    when smooth is 0).

    Args:
      kind: "linear" or "smooth". ratio: the eps progress. smooth: the quartic's extent s (eps-smooth).
    Returns:
      The factor in [0, 1].
    """
    if kind not in EPS_SCHEDULE_KINDS:
        raise ValueError(f"loss.eps_schedule.kind {kind!r}; valid: {', '.join(EPS_SCHEDULE_KINDS)}")
    if kind == "linear" or smooth == 0:
        return ratio
    k = 1.0 / ((4.0 - 3.0 * smooth) * smooth**3)
    if ratio < smooth:
        return k * ratio**4
    return (1.0 - k * smooth**4) / (1.0 - smooth) * (ratio - 1.0) + 1.0


def schedule_values(config, step: int, total_steps: int) -> dict[str, float]:
    """Host-side values for this step, to be passed to the train step as traced float32 scalars.

    Args:
      config: the whole training config (p_schedule, loss.eps_train / eps_ramp / lam0 / lam_end,
        train.epochs).
      step: the step (0-based); total_steps: steps of the whole run.

    Returns:
      {"p": the l_p norm's p (inf once the l_p phase ends), "lam": the mixture weight, "eps_train": the
      training radius in pixel units}.
    """
    values = {"eps_train": float(config.loss.get("eps_train", 0.0))}
    ps = config.get("p_schedule")
    if has_p_schedule(config):
        t = progress(step, total_steps, ps.start_fraction, ps.end_fraction)
        reached_end = step >= ps.end_fraction * total_steps
        values["p"] = math.inf if reached_end else geometric(ps.p_start, ps.p_end, t)
        lam_t = t
    else:
        values["p"] = math.inf
        lam_t = step / max(total_steps, 1)
    ramp = config.loss.get("eps_ramp")
    if ramp is not None:
        epochs = config.train.epochs
        epoch = (step * epochs) // max(total_steps, 1)  # whole epochs done
        t = min(epoch / max(ramp.end_fraction * epochs, 1e-12), 1.0)
        values["eps_train"] *= ramp.start + (ramp.end - ramp.start) * t
    shape = config.loss.get("eps_schedule")
    if shape is not None:
        t = progress(step, total_steps, shape.get("start_fraction", 0.0), shape.end_fraction)
        values["eps_train"] *= eps_schedule_factor(shape.kind, t, shape.get("smooth", 0.0))
    if "lam0" in config.loss:
        values["lam"] = geometric(config.loss.lam0, config.loss.lam_end, lam_t)
    else:
        values["lam"] = 0.0
    return values
