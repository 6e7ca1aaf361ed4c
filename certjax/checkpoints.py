"""Orbax checkpoints of the TrainState with the config saved beside it (shared/DESIGN.md, "Training").

One `CheckpointManager` in `<workdir>/checkpoints`. It keeps the last `keep` checkpoints plus the best one by
test certified accuracy (the seed paper reports both last and best, App. C). Orbax writes every checkpoint to
a temporary directory and renames it when complete, so a process killed mid-save never leaves a checkpoint
that
looks whole; restore always picks a finalised one.
"""

from __future__ import annotations

import os

import ml_collections
import orbax.checkpoint as ocp

BEST_METRIC = "certified_accuracy"


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, keep: int = 2, read_only: bool = False) -> ocp.CheckpointManager:
    policy = ocp.checkpoint_managers.AnyPreservationPolicy(
        [
            ocp.checkpoint_managers.LatestN(n=max(keep, 1)),
            ocp.checkpoint_managers.BestN(
                get_metric_fn=lambda metrics: metrics[BEST_METRIC],
                n=1,
                keep_checkpoints_without_metrics=False,
            ),
        ]
    )
    options = ocp.CheckpointManagerOptions(
        # best_fn makes orbax write the metrics next to each checkpoint (and BestN read them back).
        best_fn=lambda metrics: metrics[BEST_METRIC],
        preservation_policy=policy,
        create=not read_only,
        read_only=read_only,
        cleanup_tmp_directories=not read_only,
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=("state", "config"))


def save(manager, step: int, state, config, metrics: dict[str, float]) -> None:
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave(config.to_dict()),
        ),
        metrics={k: float(v) for k, v in metrics.items()},
        force=True,
    )


def restore_state(manager, step: int, abstract_state):
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"]


def restore_config(manager, step: int) -> ml_collections.ConfigDict:
    restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return ml_collections.ConfigDict(restored["config"])


def best_step(manager) -> int | None:
    """The step with the highest saved certified accuracy (the later one on ties)."""
    best, best_value = None, None
    for step in manager.all_steps():
        metrics = manager.metrics(step) or {}
        if BEST_METRIC in metrics and (best_value is None or metrics[BEST_METRIC] >= best_value):
            best, best_value = step, metrics[BEST_METRIC]
    return best


def select_step(manager, which: str) -> int:
    """'best' | 'last' | an integer step -> a saved step, or a clear error."""
    steps = manager.all_steps()
    if not steps:
        raise FileNotFoundError(
            f"No checkpoint in {manager.directory}: train first (launch.py --mode=train)."
        )
    if which == "last":
        return manager.latest_step()
    if which == "best":
        step = best_step(manager)
        return manager.latest_step() if step is None else step
    if str(which).isdigit() and int(which) in steps:
        return int(which)
    raise ValueError(f"--checkpoint={which!r}: use 'best', 'last' or one of the saved steps {sorted(steps)}")
