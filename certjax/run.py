"""A training run as `launch.py --mode=train` runs it: train (resuming), then the final evaluation record.

`--help` promises "train (then a final evaluation record)", and certjax.analysis reads nothing else than those
records: so training ends with `certjax.evaluate.evaluate_checkpoint` of the chosen checkpoint (best by
default), which writes `<workdir>/results.jsonl` and the radii. Training itself is certjax.train.

Typing the same command again must not redo anything. A run whose latest checkpoint ends the configured
epochs and whose record of that checkpoint exists is finished: one line says so and nothing is written. A
finished run without its record (stopped during the final evaluation, or trained before train wrote one)
is evaluated only: training resumes at its last step and has no step left. Evaluating a checkpoint again
replaces its record (certjax.outputs.append_record), so no path adds a duplicate.
"""

from __future__ import annotations

import copy
import json
import os

import ml_collections

from certjax import checkpoints
from certjax.optim import schedules
from certjax.outputs import record_key
from certjax.writers import console


def finished_record(workdir: str, config: ml_collections.ConfigDict, which: str = "best") -> dict | None:
    """The results record that makes the run in `workdir` finished, or None.

    Finished: the latest checkpoint was saved at the end of train.epochs (its saved `epoch` metric) with
    the same config, and results.jsonl holds the record of the `which` checkpoint at the step it selects.
    Reads files only (no data, no model); any doubt (no checkpoint, another config, an unknown step, an
    unreadable file) is None, and training then runs as usual (and reports what is wrong).

    Args:
      workdir: the run's folder.
      config: the config of the command (train.epochs: how long the run is meant to be).
      which: the checkpoint the final evaluation uses: best, last or a step.

    Returns:
      The record, or None if the run still has work to do.
    """
    results = os.path.join(workdir, "results.jsonl")
    if not (os.path.isdir(checkpoints.checkpoint_dir(workdir)) and os.path.isfile(results)):
        return None
    try:
        manager = checkpoints.make_manager(workdir, read_only=True)
        try:
            latest = manager.latest_step()
            if latest is None:
                return None
            epoch = (manager.metrics(latest) or {}).get("epoch", 0)
            if epoch < config.train.epochs or not _same_config(
                checkpoints.restore_config(manager, latest), config
            ):
                return None
            key = record_key({"checkpoint": which, "step": checkpoints.select_step(manager, which)})
        finally:
            manager.close()
        with open(results) as f:
            records = [json.loads(line) for line in f if line.strip()]
    except Exception:  # a step that does not exist, a damaged file: the usual path reports it
        return None
    matching = [r for r in records if record_key(r) == key]
    return matching[-1] if matching else None


def _plain(config) -> dict:
    """A config as JSON has it (tuples as lists), to compare a command's config with a saved one."""
    return json.loads(json.dumps(config.to_dict(), sort_keys=True))


def _same_config(saved, config) -> bool:
    """Whether the command's config is the one the run was trained with (after the same warmup fit)."""
    fitted = copy.deepcopy(config)
    schedules.fit_warmup(fitted)
    return _plain(saved) == _plain(fitted)


def train_then_evaluate(config: ml_collections.ConfigDict, workdir: str, which: str = "best") -> dict:
    """Train the run in `workdir` to its end, then write its final evaluation record; a finished run is
    left alone (one line says so).

    Args:
      config: the training config.
      workdir: the run's folder (checkpoints, TensorBoard events, results.jsonl, eval/ radii).
      which: the checkpoint of the final evaluation: best, last or a step.

    Returns:
      The run's results record (the new one, or the finished run's).
    """
    from certjax import evaluate, train

    record = finished_record(workdir, config, which)
    if record is not None:
        console(
            f"{os.path.abspath(workdir)} is finished: trained for {record.get('last_epoch')} epochs and its "
            f"{which} checkpoint (step {record['step']}) evaluated, in results.jsonl. Nothing to do; "
            "--mode=evaluate evaluates it again, a larger --config.train.epochs trains on."
        )
        return record
    train.train_and_evaluate(config, workdir, final=which)
    return evaluate.evaluate_checkpoint(workdir, which)
