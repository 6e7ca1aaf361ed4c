"""TrainState, the jitted train and eval steps, and the training loop (shared/DESIGN.md, "Training").

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

import functools
import math
import os
import time
from typing import Any

import flax
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metrics as clu_metrics
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from certjax import checkpoints
from certjax.certify import interval as interval_bounds
from certjax.certify.margins import certify_method, get_certifier, pixel_radius_scale
from certjax.certify.rounding import normalisation_error_l2, normalisation_error_linf, round_up_float32
from certjax.config_checks import check_config
from certjax.data import pipeline
from certjax.data.augment import augment_batch, normalize
from certjax.data.sources import dataset_info
from certjax.losses import get_loss
from certjax.models import certified_logits, get_family
from certjax.optim import make_optimizer, schedules
from certjax.writers import MetricWriter, console


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    model_state: Any  # mutable collections: running means of mean shift, power-iteration vectors, ...
    opt_state: Any
    rng: jax.Array  # raw uint32 key; per-step keys are fold_in(rng, step)


NO_STEP = np.iinfo(np.int32).max  # "no non-finite step so far"


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite loss or gradient; the message names the step and the kept checkpoint."""


@flax.struct.dataclass
class FirstNonFinite(clu_metrics.Metric):
    """The first (0-based) step whose loss or gradient was not finite, NO_STEP if none: merged with min, so
    a window of steps reports its earliest failure without a host sync per step."""

    step: jax.Array

    @classmethod
    def from_model_output(cls, nonfinite_step, **_) -> "FirstNonFinite":
        return cls(step=jnp.asarray(nonfinite_step, jnp.int32))

    def merge(self, other: "FirstNonFinite") -> "FirstNonFinite":
        return type(self)(step=jnp.minimum(self.step, other.step))

    def reduce(self) -> "FirstNonFinite":
        return type(self)(step=jnp.min(self.step))

    def compute(self) -> jax.Array:
        return self.step


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
    loss: clu_metrics.Average.from_output("loss")
    accuracy: clu_metrics.Average.from_output("accuracy")
    # on the real rows of the batch only (LiResNet++'s training log); nan when a batch has none
    accuracy_real: clu_metrics.Average.from_output("accuracy_real")
    first_nonfinite: FirstNonFinite


def batch_accuracies(logits, labels, num_real: int) -> dict[str, jax.Array]:
    """Per-example correctness of the whole batch and of its first num_real (real) rows, float32."""
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return {"accuracy": correct, "accuracy_real": correct[:num_real]}


# ------------------------------------------------------------------------------------------------- steps


class Experiment:
    """Everything derived from a config: model, optimiser, sources, jitted steps. No training state."""

    def __init__(
        self, config: ml_collections.ConfigDict, *, need_train_data: bool = True, need_test_data: bool = True
    ):
        """need_test_data=False (certifying a user's images, certjax.api): no data source is opened at all,
        so a checkpoint trained on tfds or a local path certifies on a machine without that data."""
        self.config = config
        self.family = get_family(config.model.name)
        if need_train_data or need_test_data:
            self.sources = pipeline.make_sources(config, need_train=need_train_data)
            self.num_classes = self.sources.num_classes
        else:
            from certjax.data.sources import NUM_CLASSES, DataError

            if config.data.dataset not in NUM_CLASSES:
                raise DataError(f"unknown dataset {config.data.dataset!r}; valid: {', '.join(NUM_CLASSES)}")
            self.sources, self.num_classes = None, NUM_CLASSES[config.data.dataset]
        self.image_shape = dataset_info(config.data.dataset).image_shape  # (H, W, C) of the model's input
        self.model = self.family.build(config.model, self.num_classes)
        self.loss_fn = get_loss(config.loss.name)
        self.certifier = get_certifier(self.family.threat_model)
        self.certify_method = certify_method(config, self.family)
        self.valid_range = interval_bounds.valid_pixel_range(config.data.mean, config.data.std)
        self.input_scale = 1.0 / pixel_radius_scale(config.data.std)  # pixel eps -> normalised eps
        self.mesh = Mesh(np.asarray(jax.devices()), ("data",))
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P("data"))
        if need_train_data:
            bs = config.train.batch_size
            if bs % jax.device_count():
                raise ValueError(
                    f"train.batch_size={bs} must be divisible by the device count {jax.device_count()}"
                )
            self.batches = pipeline.MixedBatches(
                real=self.sources.train,
                generated=self.sources.generated,
                batch_size=bs,
                real_fraction=self.sources.real_fraction,
                seed=config.seed,
                process_index=jax.process_index(),
                process_count=jax.process_count(),
                epoch_definition=config.data.get("epoch_definition", "real_set"),
            )
            # the one source of the epoch length: schedules, eval/checkpoint intervals and the log all use it
            self.steps_per_epoch = self.batches.steps_per_epoch
            self.num_real = self.batches.num_real  # real rows come first in every global batch
        elif self.sources is not None:
            self.steps_per_epoch = math.ceil(len(self.sources.test) / config.train.batch_size)
        else:
            self.steps_per_epoch = 1  # only the optimiser's schedule uses it, and nothing trains
        if not need_train_data:
            # no training batches (evaluation, the API, benches): a train step, if one is timed, takes every
            # row as real unless the caller says otherwise (bench/timing.py train_step_timer(num_real=...))
            self.num_real = config.train.batch_size
        self.total_steps = config.train.epochs * self.steps_per_epoch
        self.tx, self.lr_schedule = make_optimizer(config.optimizer, self.total_steps, self.steps_per_epoch)
        # Outputs pinned to the replicated layout: the state every process holds, whole, after each step.
        self.state_sharding = jax.tree.map(lambda _: self.replicated, self.abstract_state())
        self.train_step = jax.jit(
            self._train_step, donate_argnums=(0,), out_shardings=(self.state_sharding, self.replicated)
        )
        self.eval_step = jax.jit(self._eval_step, out_shardings=self.replicated)
        self.ibp_step = jax.jit(self._ibp_step, out_shardings=self.replicated)

    # -- state

    def _init(self, rng):
        init_rng, state_rng = jax.random.split(rng)
        dummy = jnp.zeros((2, *self.image_shape), jnp.float32)
        variables = self.model.init(init_rng, dummy, jnp.float32(jnp.inf), train=False)
        params = variables.pop("params")
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            model_state=dict(variables),
            opt_state=self.tx.init(params),
            rng=state_rng,
        )

    def abstract_state(self):
        return jax.eval_shape(self._init, jax.random.PRNGKey(0))

    def init_state(self) -> TrainState:
        init = jax.jit(self._init, out_shardings=self.state_sharding)
        return init(jax.random.PRNGKey(self.config.seed))

    def abstract_restore_target(self):
        return jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.replicated),
            self.abstract_state(),
        )

    def global_batch(self, local_batch):
        """This process's slice of a batch -> a global array sharded along the `data` mesh axis."""
        return jax.tree.map(
            lambda a: jax.make_array_from_process_local_data(self.batch_sharding, a), local_batch
        )

    def sharded_copy(self, full_batch):
        """A batch every process holds whole (evaluation) -> a global array sharded along `data`; each
        process places only the rows of its own devices."""
        return jax.tree.map(
            lambda a: jax.make_array_from_callback(a.shape, self.batch_sharding, lambda index: a[index]),
            full_batch,
        )

    # -- steps

    def _inputs(self, images_uint8, rng=None, num_real=None):
        """uint8 images -> normalised float32; augmented (certjax.data.augment.augment_batch) when rng is
        given, rows [0, num_real) as real images and the rest as generated ones (num_real None: all real)."""
        if rng is not None:
            num_real = images_uint8.shape[0] if num_real is None else num_real
            images_uint8 = augment_batch(rng, images_uint8, num_real=num_real, augment=self.config.augment)
        return normalize(images_uint8, self.config.data.mean, self.config.data.std)

    def _train_step(self, state: TrainState, batch, schedule):
        step_rng = jax.random.fold_in(state.rng, state.step)
        aug_rng, model_rng = jax.random.split(step_rng)
        images = self._inputs(batch["image"], aug_rng, self.num_real)
        labels = batch["label"]
        loss_schedule = dict(schedule, eps_train=schedule["eps_train"] * self.input_scale)

        train_on_bounds = self.config.loss.get("bound", "") == "ibp"
        # the eps_train ball around the augmented images, within the valid pixel range
        # (certjax.certify.interval)
        box = self.input_box(images, loss_schedule["eps_train"]) if train_on_bounds else None

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

    def _eval_step(self, params, model_state, batch, input_error_gain=1.0):
        """Logits at p = inf and a per-example bound of their float32 rounding error (0 if not tracked).

        input_error_gain: how much the network can amplify an error of its (normalised) input, from the
        family's certificate_bounds (1 for 1-Lipschitz bodies)."""
        images = self._inputs(batch["image"])
        logits, op_error = certified_logits(self.model, {"params": params, **model_state}, images)
        # Normalisation (x / 255 - mean) / std rounds at each of its three ops: <= u (1 + 1) / min(std) from
        # the first two (values <= 1), u |x'| from the division, per pixel; it reaches the logits with factor
        # <= 1 (l_inf) or, as an l_2 norm over the D pixels, <= sqrt(D) times that (l_2).
        if self.family.threat_model == "l2":
            input_error = normalisation_error_l2(images, self.config.data.std)
        else:
            input_error = self._linf_input_error(images)
        return logits, input_error_gain * input_error + op_error

    def _linf_input_error(self, images):
        """Per example: a bound of the l_inf error of the float32 normalisation (see _eval_step)."""
        return normalisation_error_linf(images, self.config.data.std)

    def input_box(self, images, eps_normalised, input_error=0.0):
        """The l_inf ball of radius eps_normalised around normalised images (widened by input_error), within
        the normalised images of pixel values [0, 1] (certjax.certify.interval.input_box)."""
        low, high = (jnp.asarray(v) for v in self.valid_range)
        return interval_bounds.input_box(images, eps_normalised, low, high, input_error)

    def _ibp_step(self, params, model_state, batch, eps_normalised):
        """Certified flags by interval bounds at p = inf over the eps ball (normalised units) around the exact
        normalised images: the box is widened by the normalisation's rounding bound."""
        images = self._inputs(batch["image"])
        box = self.input_box(images, eps_normalised, self._linf_input_error(images))
        output = self.model.apply(
            {"params": params, **model_state}, images, jnp.float32(jnp.inf), train=False, interval=box
        )
        return interval_bounds.ibp_certified(output.logits, *output.logit_bounds, batch["label"])

    def ibp_radii(self) -> list[float]:
        """Pixel radii certified by interval bounds: certify.eps and every nonzero radius of certify.radii
        (radius 0 is clean accuracy)."""
        from certjax.evaluate import radii_of

        return sorted({float(self.config.certify.eps)} | {r for r in radii_of(self.config) if r > 0})

    def certificate_bounds(self, params, model_state) -> dict:
        """The family's per-checkpoint bounds (cached evaluation variables, pair Lipschitz constants), or the
        defaults of a family without them (nothing cached, the threat model's constant bound)."""
        variables = {"params": params, **model_state}
        return self.family.certificate_bounds(self.model, variables, (1, *self.image_shape))

    def certify_batches(
        self, params, model_state, batches, bounds=None, every_radius: bool = False
    ) -> dict[str, np.ndarray]:
        """Per-example prediction / correct / radius / certified / label over an iterable of batches
        (numpy arrays). bounds: precomputed certificate_bounds (the API computes them once); every_radius:
        IBP flags at every radius of the record, not only at certify.eps.

        With a family's measured bounds, also `certified_assumed` (the bound the architecture promises, e.g.
        LOT's exactly orthogonal layers), and the bounds' report under the key "bounds" (not per example).
        bounds: `certificate_bounds(params, model_state)` computed once by the caller (certjax.api) or here.
        """
        if bounds is None:
            bounds = self.certificate_bounds(params, model_state)
        model_state = {**model_state, **bounds["variables"]}
        outputs = []
        for batch in batches:
            n = len(batch["label"])
            pad = (-n) % jax.device_count()  # shard evenly; padded rows are dropped below
            if pad:
                batch = {k: np.concatenate([v, v[:1].repeat(pad, 0)]) for k, v in batch.items()}
            labels = batch["label"]
            logits, logit_error = self.eval_step(
                params, model_state, self.sharded_copy(batch), np.float32(bounds.get("input_error_gain", 1.0))
            )
            certify = functools.partial(
                self.certifier,
                logits,
                eps=self.config.certify.eps,
                std=self.config.data.std,
                logit_error=logit_error,
            )
            result = certify(labels, pair_lipschitz=bounds["pair_lipschitz"])
            # The certified radius of the *predicted* class (= radius on correct points; on incorrect ones,
            # how robustly the model is wrong: the seed paper's Fig. 5), from the same logits.
            predicted = certify(
                result["prediction"].astype(jnp.int32), pair_lipschitz=bounds["pair_lipschitz"]
            )
            result["prediction_radius"] = predicted["radius"]
            if bounds["assumed_pair_lipschitz"] is not None:
                assumed = certify(labels, pair_lipschitz=bounds["assumed_pair_lipschitz"])
                result["certified_assumed"] = assumed["certified"]
                result["radius_assumed"] = assumed["radius"]
            result["logit_error"] = logit_error
            result["label"] = labels
            if self.certify_method != "margin":
                # one IBP pass per radius: all of them for the results record, eps alone for the per-epoch
                # evaluation in training
                radii = self.ibp_radii() if every_radius else [float(self.config.certify.eps)]
                self._add_ibp(result, params, model_state, batch, radii)
            outputs.append(jax.tree.map(lambda a, n=n: np.asarray(a)[:n], result))
        results = {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}
        self.last_bounds_report = bounds["report"]
        return results

    def _add_ibp(self, result, params, model_state, batch, radii):
        """IBP flags at every radius of `radii` ([B, R] `ibp_certified_at`), `certified_margin` /
        `certified_ibp` at certify.eps, and `certified` by the configured method (both: either)."""
        sharded = self.sharded_copy(batch)
        flags = [
            self.ibp_step(params, model_state, sharded, round_up_float32(r * self.input_scale)) for r in radii
        ]
        result["ibp_certified_at"] = jnp.stack(flags, axis=1)
        result["certified_ibp"] = flags[radii.index(float(self.config.certify.eps))]
        result["certified_margin"] = result["certified"]
        if self.certify_method == "ibp":
            result["certified"] = result["certified_ibp"]
        else:
            result["certified"] = result["certified_margin"] | result["certified_ibp"]

    @property
    def recalibrates_statistics(self) -> bool:
        return bool(self.family.recalibrates_statistics(self.config.model))

    def _batch_means(self, params, model_state, batch):
        images = self._inputs(batch["image"])
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
        if not hasattr(self, "_batch_means_jit"):
            self._batch_means_jit = jax.jit(self._batch_means, out_shardings=self.replicated)
        total, count = None, 0
        for batch in self.batches.iterate(0, self.steps_per_epoch, threads=self.config.data.reader_threads):
            means = self._batch_means_jit(state.params, state.model_state, self.global_batch(batch))
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

    def evaluate_source(self, state, source, limit: int = 0) -> dict[str, float]:
        batches = pipeline.eval_batches(
            source, self.config.train.eval_batch_size, limit, seed=self.config.seed
        )
        results = self.certify_batches(state.params, state.model_state, batches)
        return {
            "clean_accuracy": float(results["correct"].mean()),
            "certified_accuracy": float(results["certified"].mean()),
        }


# -------------------------------------------------------------------------------------------------- loop


def _device_schedule(values: dict[str, float]) -> dict[str, np.ndarray]:
    return {k: np.float32(v) for k, v in values.items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Train (resuming from the latest readable checkpoint in workdir if any), evaluating every few epochs."""
    check_config(config, device_count=jax.device_count(), process_count=jax.process_count())
    os.makedirs(workdir, exist_ok=True)
    exp = Experiment(config)
    console(exp.sources.describe())
    manager = checkpoints.make_manager(workdir, keep=config.checkpoint.keep)
    try:
        return _train_loop(config, workdir, exp, manager)
    finally:
        # An in-flight asynchronous save completes even when training stops with an error.
        manager.wait_until_finished()
        manager.close()


def _train_loop(config, workdir: str, exp: Experiment, manager) -> TrainState:
    state, latest = checkpoints.restore_latest(manager, workdir, exp.abstract_restore_target())
    if latest is not None:
        console(f"Resuming from {checkpoints.checkpoint_dir(workdir)} at step {latest}.")
    else:
        state = exp.init_state()
    start_step = int(state.step)
    spe = exp.steps_per_epoch
    total = exp.total_steps
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    console(
        f"{config.family}:{config.variant} params={num_params:,} epochs={config.train.epochs} "
        f"steps/epoch={spe} ({config.data.get('epoch_definition', 'real_set')}) "
        f"batch={config.train.batch_size} "
        f"(real {exp.batches.num_real} + generated {exp.batches.num_generated}) "
        f"devices={jax.device_count()} processes={jax.process_count()}"
    )

    writer = MetricWriter(os.path.join(workdir, "tensorboard"))
    lr_schedule = exp.lr_schedule  # the schedule the optimiser trains with
    # real-part accuracy differs from the batch's only when the batch mixes real and generated images
    mixed = 0 < exp.batches.num_real < config.train.batch_size
    train_metrics = None
    window_start, window_images = time.perf_counter(), 0
    run_start, run_start_step = time.perf_counter(), start_step
    batches = exp.batches.iterate(start_step, total, threads=config.data.reader_threads)
    for step in range(start_step, total):
        batch = exp.global_batch(next(batches))
        values = schedules.schedule_values(config, step, total)
        state, step_metrics = exp.train_step(state, batch, _device_schedule(values))
        train_metrics = step_metrics if train_metrics is None else train_metrics.merge(step_metrics)
        window_images += config.train.batch_size
        done = step + 1
        epoch_end = done % spe == 0 or done == total
        if done % config.train.log_every_steps == 0 or epoch_end:
            summary = train_metrics.compute()
            _stop_if_nonfinite(summary, spe, manager, workdir)
            now = time.perf_counter()
            img_s = window_images / max(now - window_start, 1e-9)
            eta = (total - done) * (now - run_start) / max(done - run_start_step, 1)
            progress = (
                f"epoch {done / spe:7.2f} step {done}/{total} loss {summary['loss']:.4f} "
                f"acc {summary['accuracy']:.4f} "
                + (f"(real {summary['accuracy_real']:.4f}) " if mixed else "")
                + f"p {values['p']:.4g} lr {float(lr_schedule(step)):.3g} "
                f"{img_s:.1f} img/s ETA {_hms(eta)}"
            )
            if not epoch_end:  # at an epoch's end the line waits for the test figures: one line per epoch
                console(progress)
            writer.write_scalars(
                done,
                {
                    "train/loss": summary["loss"],
                    "train/accuracy": summary["accuracy"],
                    **({"train/accuracy_real": summary["accuracy_real"]} if mixed else {}),
                    "train/p": min(values["p"], 1e6),
                    "train/lr": float(lr_schedule(step)),
                    "train/img_per_s": img_s,
                },
            )
            window_start, window_images = time.perf_counter(), 0
        if epoch_end:
            epoch = done // spe if done % spe == 0 else config.train.epochs
            epoch_train = train_metrics.compute()
            train_metrics = None
            save_now = epoch % config.checkpoint.every_epochs == 0 or done == total
            evaluate_now = epoch % config.train.eval_every_epochs == 0 or save_now
            if evaluate_now and exp.recalibrates_statistics:
                state = exp.recalibrate(state)
            if evaluate_now:
                test = exp.evaluate_source(state, exp.sources.test, config.train.eval_subset)
                progress += (
                    f" | test clean {test['clean_accuracy']:.4f} certified "
                    f"{test['certified_accuracy']:.4f} (eps {config.certify.eps:.5f})"
                )
                writer.write_scalars(done, {f"test/{k}": v for k, v in test.items()})
            console(progress)
            if save_now:
                checkpoints.save(
                    manager,
                    done,
                    state,
                    config,
                    {
                        **test,
                        "epoch": epoch,
                        "train_accuracy": float(epoch_train["accuracy"]),
                        **({"train_accuracy_real": float(epoch_train["accuracy_real"])} if mixed else {}),
                        "train_loss": float(epoch_train["loss"]),
                    },
                )
            window_start, window_images = time.perf_counter(), 0
    writer.close()
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
