"""Wall-clock timing shared by the benches (run as `python bench/<script>.py`: this file is importable)."""

import sys
import time
from pathlib import Path

import jax

# `python bench/<script>.py` puts bench/ first on sys.path, not the repository: configs/ lives there.
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))


def timed(fn, *args, repeats: int) -> float:
    """Mean seconds per call over `repeats` calls, after one call that compiles (not counted)."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - start) / repeats


def train_step_timer(config, batch_size: int, num_real: int | None = None):
    """(step, state, batch, schedule) for certjax's own jitted training step (Trainer.train_step:
    augmentation, forward, loss, backward, optimiser) on random uint8 images of the config's dataset's shape;
    for CIFAR-10 the embedded demo test split only gives Experiment its class count, for the other datasets
    the registry does (no dataset is read for training). num_real: rows taken as real
    images (the rest as generated ones, for per-source augmentation); default all."""
    import numpy as np

    from certjax.experiment import Experiment
    from certjax.optim import schedules
    from certjax.train import Trainer

    config.train.batch_size = batch_size
    if config.data.dataset == "cifar10":
        config.data.real = "demo"
        experiment = Experiment(config, data="test")
    else:  # another dataset (64 x 64): its shape and classes from the registry, no file read
        experiment = Experiment(config, data="none")
    trainer = Trainer(experiment, num_real=num_real)
    rng = np.random.default_rng(0)
    batch = experiment.global_batch(
        {
            "image": rng.integers(0, 256, (batch_size, *experiment.image_shape), dtype=np.uint8),
            "label": rng.integers(0, experiment.num_classes, (batch_size,), dtype=np.int32),
        }
    )
    total = experiment.total_steps
    values = schedules.schedule_values(config, total // 2, total)
    schedule = {name: np.float32(value) for name, value in values.items()}
    return trainer.train_step, experiment.init_state(), batch, schedule


def time_train_steps(step, state, batch, schedule, repeats: int) -> float:
    """Mean seconds per training step (back to back, as in training), after one step that compiles."""
    state, _ = step(state, batch, schedule)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(repeats):
        state, _ = step(state, batch, schedule)
    jax.block_until_ready(state)
    return (time.perf_counter() - start) / repeats
