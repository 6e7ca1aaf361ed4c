"""Orbax checkpoints of the TrainState with the config saved beside it (shared/DESIGN.md, "Training").

One `CheckpointManager` in `<workdir>/checkpoints`. It keeps the last `keep` checkpoints plus the best one by
test certified accuracy (the seed paper reports both last and best, App. C). Orbax writes every checkpoint to
a temporary directory and renames it when complete, so a process killed mid-save never leaves a checkpoint
that looks whole; restore always picks a finalised one.
"""

from __future__ import annotations

import logging
import os

import ml_collections
import orbax.checkpoint as ocp
from etils import epath

BEST_METRIC = "certified_accuracy"


class _ReadOnlyNotices(logging.Filter):
    """orbax warns on every read-only manager (evaluation, certjax.restore) that it is read-only: as asked."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not message.startswith(
            ("CheckpointManagerOptions.read_only=True", "Given directory is read only")
        )


logging.getLogger("absl").addFilter(_ReadOnlyNotices())


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
    _announce(f"checkpoint: saving step {step} to {manager.directory}")


def restore_state(manager, step: int, abstract_state, announce: bool = True):
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    if announce:
        _announce(f"checkpoint: restored step {step} from {manager.directory}")
    return restored["state"]


def _announce(message: str) -> None:
    """certjax's one line per checkpoint save / restore (orbax's own INFO lines are hidden by default)."""
    from certjax.writers import console

    console(message)


def restore_latest(manager, workdir: str, abstract_state):
    """(state, step) from the newest checkpoint that restores, or (None, None) if there is none.

    A checkpoint that fails to restore (a truncated or deleted file, unreadable metadata) is moved, whole,
    to <workdir>/checkpoints_unreadable/ with a warning and the previous one is tried: nothing is deleted.
    A checkpoint whose arrays do not match the model (another width or family in the same workdir) is not
    corruption: that stops with ConfigError naming the fix, and no checkpoint is moved.
    """
    for step in sorted(manager.all_steps(), reverse=True):
        mismatch = _structure_mismatch(manager, step, abstract_state)
        if mismatch:
            from certjax.config_checks import ConfigError

            raise ConfigError(
                f"checkpoint step {step} in {checkpoint_dir(workdir)} was trained with another model "
                f"({mismatch}): resume with the config it was trained with, or use a new --workdir"
            )
        try:
            return restore_state(manager, step, abstract_state, announce=False), step  # the trainer says so
        except Exception as error:  # orbax / tensorstore raise many types for a damaged checkpoint
            moved = _set_aside(manager, workdir, step)
            previous = [s for s in manager.all_steps() if s < step]
            fallback = f"step {max(previous)}" if previous else "a fresh start (no other checkpoint)"
            _warn(
                f"checkpoint step {step} cannot be restored ({type(error).__name__}: "
                f"{str(error).splitlines()[0][:300]}); moved to {moved}, falling back to {fallback}"
            )
    return None, None


def _structure_mismatch(manager, step: int, abstract_state) -> str:
    """'' when the saved arrays' paths and shapes match the target (or the metadata is unreadable: that is
    a damaged checkpoint, which restore then reports), else the first difference."""
    import jax

    handler = ocp.StandardCheckpointHandler()
    try:
        # The item's handler, not a Checkpointer: a Checkpointer also looks for the step's
        # _CHECKPOINT_METADATA inside the item folder (it lies one level up) and warns, on every resume, in
        # words that read like corruption.
        metadata = handler.metadata(epath.Path(manager.directory) / str(step) / "state")
        tree = getattr(metadata, "item_metadata", metadata)
        saved = {
            _path_names(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(getattr(tree, "tree", tree))[0]
            if hasattr(leaf, "shape")
        }
    except Exception:
        return ""
    finally:
        handler.close()
    if not saved:
        return ""
    target = {
        _path_names(path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]
    }
    for key in sorted(set(target) | set(saved)):
        name = "/".join(key)
        if key not in saved:
            return f"the model has {name} {target[key]}, the checkpoint does not"
        if key not in target:
            return f"the checkpoint has {name} {saved[key]}, the model does not"
        if saved[key] != target[key]:
            return f"{name}: checkpoint shape {saved[key]}, model shape {target[key]}"
    return ""


def _path_names(path) -> tuple[str, ...]:
    """A pytree path as plain names: dataclass fields (TrainState) and dict keys (saved metadata) alike."""
    names = []
    for entry in path:
        for attribute in ("key", "name", "idx"):
            if hasattr(entry, attribute):
                names.append(str(getattr(entry, attribute)))
                break
    return tuple(names)


def _set_aside(manager, workdir: str, step: int) -> str:
    """Move a checkpoint directory out of the manager's sight (process 0; all processes wait for it)."""
    import time

    import jax

    source = os.path.join(checkpoint_dir(workdir), str(step))
    target = os.path.join(os.path.abspath(workdir), "checkpoints_unreadable", f"{step}-{int(time.time())}")
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.rename(source, target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"certjax_set_aside_{step}")
    manager.reload()
    return target


def _warn(message: str) -> None:
    import sys

    import jax

    if jax.process_index() == 0:
        print(f"certjax: warning: {message}", file=sys.stderr, flush=True)


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


def kept_steps(epochs: int, steps_per_epoch: int, every_epochs: int, keep: int) -> list[int]:
    """The steps a run certainly still has when it ends: the last `keep` of its saves (every `every_epochs`
    epochs and at the last step; train._end_epoch). Its best checkpoint is kept too, but which one that is
    is known only at the end.

    Args:
      epochs, steps_per_epoch: the run's length (Experiment.total_steps = epochs x steps_per_epoch).
      every_epochs, keep: config.checkpoint's save interval and the LatestN of make_manager.

    Returns:
      The kept steps, ascending.
    """
    saves = {epoch * steps_per_epoch for epoch in range(1, epochs + 1) if epoch % every_epochs == 0}
    saves.add(epochs * steps_per_epoch)
    return sorted(saves)[-max(keep, 1) :]


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
