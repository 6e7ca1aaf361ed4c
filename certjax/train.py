"""The jitted train step, recalibration and the training loop (shared/DESIGN.md, "Training").

The state (`TrainState`) and everything a config builds live in certjax/experiment.py; evaluation runs
through the experiment's Certifier (certjax/certify/certifier.py).

`train_step(state, batch, schedule) -> (state, metrics)` is a pure function, jitted once: the per-step
schedule values (p of the l_p phase, the loss weight lam, eps_train) are traced float32 scalars, so changing
them never recompiles. Randomness comes from `fold_in(state.rng, state.step)`, so a resumed run draws the same
numbers as an uninterrupted one; together with the step-indexed pipeline this makes resume bit-exact on CPU.

Parallelism: one `Mesh` over all devices (of all processes) with a `data` axis; batches are sharded along it
and the state is replicated (the jitted steps' outputs are pinned to that layout), so statistics such as the
mean-shift batch means and the loss are taken over the global batch by XLA, on 1 device or 8 or many hosts.
Each process reads only its own slice of every batch (pipeline.MixedBatches) and evaluation results are
replicated, so every process holds the whole result and process 0 writes it.

Failure handling: a non-finite loss or gradient is flagged inside the step (no host sync); the loop checks
the flag at every log line and before every save and stops with NonFiniteError naming the first bad step,
so no checkpoint of a diverged state is ever written and the last good one stays the latest. Resume skips
a checkpoint that cannot be restored (checkpoints.restore_latest).
"""

import os
import time

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from certjax import checkpoints
from certjax.config_checks import check_config
from certjax.config_files import resolved_config_json
from certjax.experiment import Experiment, TrainState
from certjax.label_check import check_training_labels
from certjax.optim import schedules
from certjax.progress import Progress
from certjax.train_metrics import NO_STEP, NonFiniteError, TrainMetrics, batch_accuracies
from certjax.writers import MetricWriter, console

__all__ = ["Experiment", "NonFiniteError", "TrainState", "Trainer", "train_and_evaluate"]


# ------------------------------------------------------------------------------------------------- steps


class Trainer:
    """The jitted train step of an Experiment, and the recalibration of running means before evaluation."""

    def __init__(self, experiment: Experiment, num_real: int | None = None):
        """Args:
        experiment: built with data="train" (or "test"/"none" for timing a step on given batches).
        num_real: rows [0, num_real) of a batch are real images (default: the experiment's batches')."""
        self.exp = experiment
        self.config, self.model, self.tx = experiment.config, experiment.model, experiment.tx
        self.family, self.loss_fn, self.input_scale = (
            experiment.family,
            experiment.loss_fn,
            experiment.input_scale,
        )
        self.num_real = experiment.num_real if num_real is None else num_real
        self.train_step = jax.jit(
            self._train_step,
            donate_argnums=(0,),
            out_shardings=(experiment.state_sharding, experiment.replicated),
        )
        self._batch_means_jit = jax.jit(self._batch_means, out_shardings=experiment.replicated)

    def _train_step(self, state: TrainState, batch, schedule):
        step_rng = jax.random.fold_in(state.rng, state.step)
        aug_rng, model_rng = jax.random.split(step_rng)
        images = self.exp.inputs(batch["image"], aug_rng, self.num_real)
        labels = batch["label"]
        loss_schedule = dict(schedule, eps_train=schedule["eps_train"] * self.input_scale)

        train_on_bounds = self.config.loss.get("bound", "") == "ibp"
        # the eps_train ball around the augmented images, within the valid pixel range
        # (certjax.certify.interval)
        box = self.exp.input_box(images, loss_schedule["eps_train"]) if train_on_bounds else None

        def loss_of(params):
            output, updates = self.model.apply(
                {"params": params, **state.model_state},
                images,
                schedule["p"],
                train=True,
                mutable=list(state.model_state.keys()),
                rngs={"dropout": model_rng},
                **({"interval": box} if train_on_bounds else {}),
            )
            # the losses' second argument: the logit scale, or the l_2 families' pair bound (certjax.losses)
            scale = output.logit_scale if output.pair_bound is None else output.pair_bound
            extra = {"logit_bounds": output.logit_bounds} if train_on_bounds else {}
            losses = self.loss_fn(output.logits, scale, labels, loss_schedule, self.config.loss, **extra)
            return jnp.mean(losses), (output.logits, updates)

        (loss, (logits, updates)), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
        finite = jnp.isfinite(loss) & jnp.all(
            jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
        )
        # p_norm: the l_p weight decay of adamw_lp follows the model's current p (other optimisers ignore it)
        param_updates, opt_state = self.tx.update(grads, state.opt_state, state.params, p_norm=schedule["p"])
        params = optax.apply_updates(state.params, param_updates)
        new_state = state.replace(
            step=state.step + 1, params=params, model_state=dict(updates), opt_state=opt_state
        )
        metrics = TrainMetrics.single_from_model_output(
            loss=loss,
            **batch_accuracies(logits, labels, self.num_real),
            nonfinite_step=jnp.where(finite, NO_STEP, state.step),
        )
        return new_state, metrics

    @property
    def recalibrates_statistics(self) -> bool:
        return bool(self.family.recalibrates_statistics(self.config.model))

    def _batch_means(self, params, model_state, batch):
        images = self.exp.inputs(batch["image"])
        _, aux = self.model.apply(
            {"params": params, **model_state},
            images,
            jnp.float32(jnp.inf),
            train=True,
            dropout=False,
            mutable=["batch_stats", "batch_means"],
        )
        return jax.tree.map(lambda t: t[0], aux["batch_means"], is_leaf=lambda t: isinstance(t, tuple))

    def recalibrate(self, state: TrainState) -> TrainState:
        """Running means := the exact average of per-batch means over one pass of the training batches
        (steps 0 .. steps_per_epoch - 1 of the pipeline, no augmentation) through the deterministic path."""
        total, count = None, 0
        for batch in self.exp.batches.iterate(
            0, self.exp.steps_per_epoch, threads=self.config.data.reader_threads
        ):
            means = self._batch_means_jit(state.params, state.model_state, self.exp.global_batch(batch))
            total = means if total is None else jax.tree.map(jnp.add, total, means)
            count += 1
        averaged = jax.tree.map(lambda t: t / count, total)
        stats = flax.traverse_util.flatten_dict(state.model_state["batch_stats"])
        for path, value in flax.traverse_util.flatten_dict(averaged).items():
            if path not in stats:
                raise KeyError(f"batch mean {path} has no running mean in batch_stats")
            stats[path] = value
        model_state = dict(state.model_state, batch_stats=flax.traverse_util.unflatten_dict(stats))
        return state.replace(model_state=model_state)


# -------------------------------------------------------------------------------------------------- loop


def _device_schedule(values: dict[str, float]) -> dict[str, np.ndarray]:
    return {k: np.float32(v) for k, v in values.items()}


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, final: str | None = None
) -> TrainState:
    """Train (resuming from the latest readable checkpoint in workdir if any), evaluating every few epochs.
    final: the checkpoint the caller evaluates afterwards (--checkpoint); a step the run will not keep is
    refused before anything is written."""
    check_config(config, device_count=jax.device_count(), process_count=jax.process_count())
    warmup_note = schedules.fit_warmup(config)  # a short run of a recipe with a warmup: scaled, said once
    exp = Experiment(config)  # before the workdir exists: bad data leaves no empty workdir behind
    # a generated file whose label report failed stops here, before the workdir exists (certjax/label_check)
    check_training_labels(config, exp.num_classes)
    if final is not None and final.isdigit():
        every, keep = config.checkpoint.every_epochs, config.checkpoint.keep
        kept = checkpoints.kept_steps(config.train.epochs, exp.steps_per_epoch, every, keep)
        if int(final) not in kept:
            raise ValueError(
                f"--checkpoint={final}: this run ends with steps {', '.join(map(str, kept))} (the last "
                f"checkpoint.keep={keep} of its saves every {every} epochs of {exp.steps_per_epoch} steps) "
                "and its best; use best, last or one of those steps"
            )
    write_config_json(config, workdir)
    if warmup_note:
        console(warmup_note)
    console(exp.sources.describe())
    manager = checkpoints.make_manager(workdir, keep=config.checkpoint.keep)
    try:
        return _train_loop(workdir, Trainer(exp), manager)
    finally:
        # An in-flight asynchronous save completes even when training stops with an error.
        manager.wait_until_finished()
        manager.close()


def write_config_json(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Create the workdir and write the run's resolved config (every --config override applied) to
    <workdir>/config.json: readable JSON, written whole (temp file + rename) by process 0."""
    from certjax.evaluate import atomic_write_bytes

    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        atomic_write_bytes(os.path.join(workdir, "config.json"), resolved_config_json(config).encode())


def _start(workdir: str, exp: Experiment, manager) -> TrainState:
    """The restored or freshly initialised state, and the run's first console line."""
    config = exp.config
    state, latest = checkpoints.restore_latest(manager, workdir, exp.abstract_restore_target())
    if latest is not None:
        console(f"Resuming from {checkpoints.checkpoint_dir(workdir)} at step {latest}.")
    else:
        state = exp.init_state()
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    console(
        f"{config.family}:{config.variant} params={num_params:,} epochs={config.train.epochs} "
        f"steps/epoch={exp.steps_per_epoch} ({config.data.get('epoch_definition', 'real_set')}) "
        f"batch={config.train.batch_size} "
        f"(real {exp.batches.num_real} + generated {exp.batches.num_generated}) "
        f"devices={jax.device_count()} processes={jax.process_count()}"
        # the first step waits for the compilation: say so, on this line (the demo fits on one screen)
        + ("; compiling the train step ..." if int(state.step) < exp.total_steps else "")
    )
    return state


class _Window:
    """Throughput and ETA of the log window and of the run so far."""

    def __init__(self, start_step: int):
        self.run_start, self.run_start_step = time.perf_counter(), start_step
        self.restart()

    def restart(self):
        self.start, self.images = time.perf_counter(), 0

    def rates(self, done: int, total: int) -> tuple[float, float]:
        now = time.perf_counter()
        img_s = self.images / max(now - self.start, 1e-9)
        eta = (total - done) * (now - self.run_start) / max(done - self.run_start_step, 1)
        return img_s, eta


def _train_loop(workdir: str, trainer: Trainer, manager) -> TrainState:
    exp, config = trainer.exp, trainer.config
    state = _start(workdir, exp, manager)
    start_step, spe, total = int(state.step), exp.steps_per_epoch, exp.total_steps
    writer = MetricWriter(os.path.join(workdir, "tensorboard"))
    # real-part accuracy differs from the batch's only when the batch mixes real and generated images
    mixed = 0 < exp.batches.num_real < config.train.batch_size
    train_metrics, window = None, _Window(start_step)
    batches = exp.batches.iterate(start_step, total, threads=config.data.reader_threads)
    counter = None  # this epoch's Progress (certjax/progress.py)
    for step in range(start_step, total):
        if counter is None:
            counter = Progress(f"epoch {step // spe + 1}", min(spe - step % spe, total - step), "steps")
        values = schedules.schedule_values(config, step, total)
        state, step_metrics = trainer.train_step(
            state, exp.global_batch(next(batches)), _device_schedule(values)
        )
        counter.update()
        train_metrics = step_metrics if train_metrics is None else train_metrics.merge(step_metrics)
        window.images += config.train.batch_size
        done = step + 1
        epoch_end = done % spe == 0 or done == total
        if done % config.train.log_every_steps == 0 or epoch_end:
            summary = train_metrics.compute()
            _stop_if_nonfinite(summary, spe, manager, workdir)
            progress = _log_window(writer, exp, summary, values, step, window, mixed)
            if not epoch_end:  # at an epoch's end the line waits for the test figures: one line per epoch
                console(progress)
            window.restart()
        if epoch_end:
            counter.close()
            counter = None
            state = _end_epoch(
                trainer, state, train_metrics.compute(), done, progress, writer, manager, mixed
            )
            train_metrics = None
            window.restart()
    writer.close()
    return state


def _log_window(writer, exp: Experiment, summary, values, step: int, window: _Window, mixed: bool) -> str:
    """Write the window's scalars; return its console line."""
    done, total = step + 1, exp.total_steps
    lr = float(exp.lr_schedule(step))  # the schedule the optimiser trains with
    img_s, eta = window.rates(done, total)
    with_p = schedules.has_p_schedule(exp.config)  # p is inf and unused in the other families
    progress = (
        f"epoch {done / exp.steps_per_epoch:7.2f} step {done}/{total} loss {summary['loss']:.4f} "
        f"acc {summary['accuracy']:.4f} "
        + (f"(real {summary['accuracy_real']:.4f}) " if mixed else "")
        + (f"p {values['p']:.4g} " if with_p else "")
        + f"lr {lr:.3g} "
        f"{img_s:.1f} img/s ETA {_hms(eta)}"
    )
    writer.write_scalars(
        done,
        {
            "train/loss": summary["loss"],
            "train/accuracy": summary["accuracy"],
            **({"train/accuracy_real": summary["accuracy_real"]} if mixed else {}),
            **({"train/p": min(values["p"], 1e6)} if with_p else {}),
            "train/lr": lr,
            "train/img_per_s": img_s,
        },
    )
    return progress


def _end_epoch(trainer: Trainer, state, epoch_train, done: int, progress: str, writer, manager, mixed: bool):
    """At an epoch's end: recalibrate and evaluate when due, print the epoch's line, save when due."""
    exp, config = trainer.exp, trainer.config
    epoch = done // exp.steps_per_epoch if done % exp.steps_per_epoch == 0 else config.train.epochs
    save_now = epoch % config.checkpoint.every_epochs == 0 or done == exp.total_steps
    evaluate_now = epoch % config.train.eval_every_epochs == 0 or save_now
    test = {}
    if evaluate_now and trainer.recalibrates_statistics:
        state = trainer.recalibrate(state)
    if evaluate_now:
        test = exp.certifier.evaluate_source(
            state, exp.sources.test, config.train.eval_subset, during_training=True
        )
        progress += (
            f" | test clean {test['clean_accuracy']:.4f} certified "
            f"{test['certified_accuracy']:.4f} (eps {config.certify.eps:.5f})"
        )
        writer.write_scalars(done, {f"test/{k}": v for k, v in test.items()})
    console(progress)
    if save_now:
        metrics = {
            **test,
            "epoch": epoch,
            "train_accuracy": float(epoch_train["accuracy"]),
            **({"train_accuracy_real": float(epoch_train["accuracy_real"])} if mixed else {}),
            "train_loss": float(epoch_train["loss"]),
        }
        checkpoints.save(manager, done, state, config, metrics)
    return state


def _stop_if_nonfinite(summary, steps_per_epoch: int, manager, workdir: str) -> None:
    first = int(summary["first_nonfinite"])
    if first == NO_STEP:
        return
    manager.wait_until_finished()
    kept = manager.latest_step()
    where = (
        f"the last good checkpoint, step {kept} in {checkpoints.checkpoint_dir(workdir)}, is kept and a "
        "rerun resumes from it"
        if kept is not None
        else "no checkpoint had been saved yet"
    )
    raise NonFiniteError(
        f"non-finite loss or gradient at step {first + 1} (epoch {(first + 1) / steps_per_epoch:.2f}; mean "
        f"loss of the window {float(summary['loss']):.4g}). Nothing was saved after it: {where}. Lower "
        "--config.optimizer.lr or set --config.optimizer.clip_norm (e.g. 1.0), then run the same command."
    )


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
