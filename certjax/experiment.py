"""Everything derived from a config, built once: family, model, mesh and shardings, data sources and training
batches, optimiser, and the certifier (shared/DESIGN.md, "Layout" and "Data flow").

`Experiment(config, data=...)` holds no training state. `data` says which data the caller needs:

* "train": the test source and the mixed real/generated training batches (training, benches of the step);
* "test": the test source only (evaluation, the audit);
* "none": no data source is opened at all (certifying a user's images, certjax.restore), so a checkpoint
  trained on tfds or a local folder certifies on a machine without that data. The class count and image
  shape then come from the dataset's record (certjax.data.sources.DATASETS).

`Experiment.from_checkpoint(workdir, which)` is the one "checkpoint -> config -> Experiment -> state" path
that evaluation, the API and the audit share. Training (the jitted step, the loop) lives in certjax/train.py,
certification (eval and IBP steps, the certify loop) in certjax/certify/certifier.py.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from certjax import checkpoints
from certjax.certify import interval as interval_bounds
from certjax.certify.margins import certify_method, pixel_radius_scale
from certjax.data import pipeline
from certjax.data.augment import augment_batch, normalize
from certjax.data.sources import dataset_info
from certjax.losses import get_loss
from certjax.models import get_family
from certjax.optim import make_optimizer

DATA_MODES = ("train", "test", "none")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    model_state: Any  # mutable collections: running means of mean shift, power-iteration vectors, ...
    opt_state: Any
    rng: jax.Array  # raw uint32 key; per-step keys are fold_in(rng, step)


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """Where a restored state came from: its step and the metrics saved beside it (and the epochs of the best
    and last checkpoints of the run, for the results record)."""

    step: int
    metrics: dict
    best_epoch: int
    last_epoch: int


class Experiment:
    """Family, model, data and optimiser of one config; see the module docstring."""

    def __init__(self, config: ml_collections.ConfigDict, data: str = "train"):
        """Args:
        config: a checked config (certjax.config_checks.check_config).
        data: "train", "test" or "none" (module docstring).
        """
        if data not in DATA_MODES:
            raise ValueError(f"data={data!r}; use one of {', '.join(DATA_MODES)}")
        self.config = config
        self.data = data
        self.family = get_family(config.model.name)
        if data == "none":
            info = dataset_info(config.data.dataset)
            self.sources, self.num_classes, self.image_shape = None, info.num_classes, info.image_shape
        else:
            self.sources = pipeline.make_sources(config, need_train=data == "train")
            self.num_classes, self.image_shape = self.sources.num_classes, tuple(self.sources.image_shape)
        self.model = self.family.build(config.model, self.num_classes)
        self.loss_fn = get_loss(config.loss.name)
        self.certify_method = certify_method(config, self.family)
        self.valid_range = interval_bounds.valid_pixel_range(config.data.mean, config.data.std)
        self.input_scale = 1.0 / pixel_radius_scale(config.data.std)  # pixel eps -> normalised eps
        self.mesh = Mesh(np.asarray(jax.devices()), ("data",))
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P("data"))
        self.batches = self._training_batches() if data == "train" else None
        if self.batches is not None:
            # the one source of the epoch length: schedules, eval/checkpoint intervals and the log all use it
            self.steps_per_epoch = self.batches.steps_per_epoch
            self.num_real = self.batches.num_real  # real rows come first in every global batch
        else:
            # nothing trains: the epoch length only shapes the optimiser's schedule (restored states carry
            # their own step), and a timed train step takes every row as real (bench/timing.py)
            test_size = len(self.sources.test) if self.sources is not None else 0
            self.steps_per_epoch = math.ceil(test_size / config.train.batch_size) if test_size else 1
            self.num_real = config.train.batch_size
        self.total_steps = config.train.epochs * self.steps_per_epoch
        self.tx, self.lr_schedule = make_optimizer(config.optimizer, self.total_steps, self.steps_per_epoch)
        # Outputs pinned to the replicated layout: the state every process holds, whole, after each step.
        self.state_sharding = jax.tree.map(lambda _: self.replicated, self.abstract_state())

    def _training_batches(self) -> pipeline.MixedBatches:
        bs = self.config.train.batch_size
        if bs % jax.device_count():
            raise ValueError(
                f"train.batch_size={bs} must be divisible by the device count {jax.device_count()}"
            )
        return pipeline.MixedBatches(
            real=self.sources.train,
            generated=self.sources.generated,
            batch_size=bs,
            real_fraction=self.sources.real_fraction,
            seed=self.config.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            epoch_definition=self.config.data.get("epoch_definition", "real_set"),
        )

    @functools.cached_property
    def certifier(self):
        """The Certifier of this experiment (certjax.certify.certifier), built on first use."""
        from certjax.certify.certifier import Certifier  # the certifier reads this class's fields

        return Certifier(self)

    # -- state

    def _init(self, rng):
        init_rng, state_rng = jax.random.split(rng)
        dummy = jnp.zeros((2, *self.image_shape), jnp.float32)
        output, variables = self.model.init_with_output(init_rng, dummy, jnp.float32(jnp.inf), train=False)
        if output.logits.shape != (2, self.num_classes):  # e.g. a head that is not 1 x 1 at this image size
            raise ValueError(
                f"the {self.config.model.name} network gives logits of shape {output.logits.shape[1:]} for "
                f"images of shape {tuple(self.image_shape)}, expected ({self.num_classes},) (one per class)"
            )
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

    # -- batches

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

    def inputs(self, images_uint8, rng=None, num_real=None):
        """uint8 images -> normalised float32; augmented (certjax.data.augment.augment_batch) when rng is
        given, rows [0, num_real) as real images and the rest as generated ones (num_real None: all real)."""
        if rng is not None:
            num_real = images_uint8.shape[0] if num_real is None else num_real
            images_uint8 = augment_batch(rng, images_uint8, num_real=num_real, augment=self.config.augment)
        return normalize(images_uint8, self.config.data.mean, self.config.data.std)

    def input_box(self, images, eps_normalised, input_error=0.0):
        """The l_inf ball of radius eps_normalised around normalised images (widened by input_error), within
        the normalised images of pixel values [0, 1] (certjax.certify.interval.input_box)."""
        low, high = (jnp.asarray(v) for v in self.valid_range)
        return interval_bounds.input_box(images, eps_normalised, low, high, input_error)

    # -- from a checkpoint

    @classmethod
    def from_checkpoint(
        cls, workdir: str, which: str = "best", *, data: str = "test", announce: bool = True
    ) -> tuple[Experiment, TrainState, CheckpointInfo]:
        """Restore a checkpoint of `workdir` with the config saved beside it.

        Args:
          workdir: a training workdir (its checkpoints/ folder).
          which: "best" (by test certified accuracy), "last" or a step.
          data: the Experiment's data mode ("test" for evaluation, "none" for the API).
          announce: print certjax's one line about the restore.
        Returns:
          (experiment, state, info).
        """
        manager = checkpoints.make_manager(workdir, read_only=True)
        try:
            step = checkpoints.select_step(manager, str(which))
            config = checkpoints.restore_config(manager, step)
            experiment = cls(config, data=data)
            target = experiment.abstract_restore_target()
            state = checkpoints.restore_state(manager, step, target, announce=announce)
            best = checkpoints.best_step(manager)
            info = CheckpointInfo(
                step=int(step),
                metrics=dict(manager.metrics(step) or {}),
                best_epoch=int((manager.metrics(best) or {}).get("epoch", 0)) if best is not None else 0,
                last_epoch=int((manager.metrics(manager.latest_step()) or {}).get("epoch", 0)),
            )
        finally:
            manager.close()
        return experiment, state, info
