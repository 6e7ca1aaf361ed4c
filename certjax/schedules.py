"""Per-step schedule values that are fed to the jitted train step as traced scalars.

The l_p schedule of the l_inf-dist Net / SortNet (zbh2047/L_inf-dist-net-v2, train.py `--p-start 8
--p-end 1000 --epochs 0,0,100,1250,1300`): p = p_start for the first `start_fraction` of training, then grows
geometrically per step to p_end at `end_fraction`, then p = inf. The mixing weight lam of the mixture loss
decays geometrically from lam0 to lam_end with the same progress. Fractions (not epochs) make the schedule
scale with `train.epochs` (the seed trains 800 / 1600 epochs).

An optional eps ramp (`config.loss.eps_ramp` = dict(start, end, end_fraction)) scales eps_train per epoch:
eps_t = eps_train * (start + (end - start) * min(epoch / (end_fraction * epochs), 1)) with the whole epochs
done so far (LiResNet, hu23 snapshot train.py eps_fn: 0.1 eps -> 1.5 eps over the first half).
"""

from __future__ import annotations

import math

import numpy as np


def progress(step: int, total_steps: int, start_fraction: float, end_fraction: float) -> float:
    """0 before start_fraction of training, 1 after end_fraction, linear in steps in between."""
    start = start_fraction * total_steps
    end = end_fraction * total_steps
    if end <= start:
        return 0.0 if step < start else 1.0
    return float(np.clip((step - start) / (end - start), 0.0, 1.0))


def geometric(start: float, end: float, t: float) -> float:
    return start * (end / start) ** t


def schedule_values(config, step: int, total_steps: int) -> dict[str, float]:
    """Host-side values for this step: p (inf once the l_p phase ends), lam, eps_train (pixel units)."""
    values = {"eps_train": float(config.loss.get("eps_train", 0.0))}
    ps = config.get("p_schedule")
    if ps is not None and ps.get("enabled", True):
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
    if "lam0" in config.loss:
        values["lam"] = geometric(config.loss.lam0, config.loss.lam_end, lam_t)
    else:
        values["lam"] = 0.0
    return values
