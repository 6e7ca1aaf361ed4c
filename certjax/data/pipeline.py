"""The training input pipeline: per-batch real/generated mixing on grain (shared/DESIGN.md, "Data flow" 2).

A batch of B holds exactly n_real = floor(B * real_fraction + 1/2) real images and B - n_real generated ones
(DM-Improves-AT draws int(0.7 B) generated per batch; we fix the counts exactly). Each source is an index
stream built with grain: `MapDataset.range(N).shuffle(seed).repeat()` (reshuffled every pass over that source)
then `.batch(n)`, so the indices of step s are element s of that dataset: a pure function of (seed, s). The
batch of step s is therefore bit-identical after a resume at any step, and no iterator state is checkpointed.

An epoch (`data.epoch_definition`) is either "real_set": ceil(N_real / B) steps whatever the mix (the seed
paper: "an epoch is 50k images"), or "real_pass": one pass over the real set at the batch's real count,
ceil(N_real / n_real) steps (LiResNet++, hukkai/liresnet train.py: every step joins a real batch of 256 with
768 generated images, and the scheduler's iter_per_epoch is len(train_loader), one pass of the real loader;
its loader drops the last partial batch, our index stream carries on into the next pass instead). Every
epoch-based setting (schedules, evaluation and checkpoint intervals, the log's epoch) follows
`steps_per_epoch`.

Images stay uint8 until the jitted step, where augmentation and normalisation run. Their shape is the
dataset's (`Sources.image_shape`, from its record in certjax.data.sources.DATASETS): the generated data must
match the real data's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import grain
import numpy as np


def real_count(batch_size: int, real_fraction: float) -> int:
    """Number of real images per batch: round half up of B * real_fraction."""
    if not 0.0 <= real_fraction <= 1.0:
        raise ValueError(f"data.real_fraction must be in [0, 1], got {real_fraction}")
    return int(math.floor(batch_size * real_fraction + 0.5))


EPOCH_DEFINITIONS = ("real_set", "real_pass")


def steps_per_epoch(num_real_images: int, batch_size: int, num_real: int, epoch_definition: str) -> int:
    """Steps of one epoch: ceil(N_real / B) ("real_set") or ceil(N_real / n_real) ("real_pass")."""
    if epoch_definition == "real_set":
        return math.ceil(num_real_images / batch_size)
    if epoch_definition == "real_pass":
        if num_real <= 0:
            raise ValueError(
                "data.epoch_definition='real_pass' counts an epoch as one pass over the real images, but the "
                "batch holds 0 of them (data.real_fraction rounds to 0 real per batch): raise "
                "data.real_fraction or use data.epoch_definition='real_set'"
            )
        return math.ceil(num_real_images / num_real)
    raise ValueError(f"data.epoch_definition {epoch_definition!r}; use one of {', '.join(EPOCH_DEFINITIONS)}")


def _index_batches(num_items: int, per_batch: int, seed: int) -> grain.MapDataset:
    """Element s = the per_batch source indices of step s; a new permutation on every pass over the source."""
    return (
        grain.MapDataset.range(num_items)
        .shuffle(seed=seed)
        .repeat(None, reseed_each_epoch=True)
        .batch(per_batch, drop_remainder=True)
    )


@dataclasses.dataclass
class MixedBatches:
    """Random-access batches {'image': uint8 [B, H, W, C], 'label': int32 [B]} by step.

    real / generated are sources with `__len__` and `read(indices) -> (images, labels)`
    (certjax.data.sources), of one image shape.
    process_index / process_count select this host's contiguous slice of every global batch.
    """

    real: object
    generated: object | None
    batch_size: int
    real_fraction: float
    seed: int
    process_index: int = 0
    process_count: int = 1
    epoch_definition: str = "real_set"

    def __post_init__(self):
        if self.batch_size <= 0:
            raise ValueError(f"train.batch_size must be positive, got {self.batch_size}")
        if self.batch_size % self.process_count:
            raise ValueError(
                f"train.batch_size {self.batch_size} is not divisible by the process count "
                f"{self.process_count}"
            )
        self.num_real = real_count(self.batch_size, self.real_fraction)
        self.num_generated = self.batch_size - self.num_real
        if self.num_generated and self.generated is None:
            raise ValueError(
                f"data.real_fraction={self.real_fraction} asks for {self.num_generated} generated images per "
                "batch but no generated data is configured: set --config.data.generated=/path/to/file.npz "
                "or --config.data.real_fraction=1.0"
            )
        if len(self.real) == 0:
            raise ValueError("the real training source is empty")
        self.steps_per_epoch = steps_per_epoch(
            len(self.real), self.batch_size, self.num_real, self.epoch_definition
        )
        # Independent seeds per source, so changing the mix never changes the other source's order.
        self._real_indices = (
            _index_batches(len(self.real), self.num_real, self.seed) if self.num_real else None
        )
        self._generated_indices = (
            _index_batches(len(self.generated), self.num_generated, self.seed + 1_000_003)
            if self.num_generated
            else None
        )

    def indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(real indices, generated indices) of global batch `step`."""
        empty = np.zeros((0,), np.int64)
        real = self._real_indices[step] if self._real_indices is not None else empty
        gen = self._generated_indices[step] if self._generated_indices is not None else empty
        return np.asarray(real), np.asarray(gen)

    def __getitem__(self, step: int) -> dict[str, np.ndarray]:
        real_idx, gen_idx = self.indices(step)
        # This process's contiguous slice [lo, hi) of the global batch (real images first), read alone.
        local = self.batch_size // self.process_count
        lo = self.process_index * local
        hi = lo + local
        real_idx = real_idx[lo:hi]
        gen_idx = gen_idx[max(lo - self.num_real, 0) : max(hi - self.num_real, 0)]
        parts_images, parts_labels = [], []
        for source, idx in ((self.real, real_idx), (self.generated, gen_idx)):
            if len(idx):
                images, labels = source.read(idx)
                parts_images.append(images)
                parts_labels.append(labels)
        images = np.concatenate(parts_images).astype(np.uint8, copy=False)
        labels = np.concatenate(parts_labels).astype(np.int32, copy=False)
        return {"image": images, "label": labels}

    def dataset(self, start_step: int, end_step: int) -> grain.MapDataset:
        return grain.MapDataset.range(start_step, end_step).map(self.__getitem__)

    def iterate(
        self, start_step: int, end_step: int, *, threads: int = 2, prefetch: int = 4
    ) -> Iterator[dict[str, np.ndarray]]:
        """Batches start_step .. end_step-1 in order, prefetched by grain's reader threads."""
        options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)
        return iter(self.dataset(start_step, end_step).to_iter_dataset(options))


def eval_batches(source, batch_size: int, limit: int = 0, seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """All examples of `source` in order (limit 0), or a fixed random subset of `limit` of them (sorted, drawn
    from `seed`): image-folder sources are ordered by class, so their first N would be one or two classes.
    In batches; the last one may be short."""
    if limit and limit < len(source):
        order = np.sort(np.random.default_rng(seed).choice(len(source), size=limit, replace=False))
    else:
        order = np.arange(len(source))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        images, labels = source.read(idx)
        yield {"image": np.asarray(images, np.uint8), "label": np.asarray(labels, np.int32)}


@dataclasses.dataclass
class Sources:
    """The sources of one experiment, built (and validated) from `config.data` before training starts.

    image_shape: (H, W, C) of every image, from the dataset's record (certjax.data.sources.DATASETS): what
    the model's input is.
    """

    train: object | None
    test: object
    generated: object | None
    real_fraction: float
    num_classes: int
    notes: list[str]
    image_shape: tuple[int, int, int]

    def describe(self) -> str:
        lines = [
            f"train: {getattr(self.train, 'name', self.train)} ({len(self.train):,} images)"
            if self.train is not None
            else "train: -",
            f"test: {getattr(self.test, 'name', self.test)} ({len(self.test):,} images)",
        ]
        if self.generated is not None:
            lines.append(
                f"generated: {getattr(self.generated, 'name', self.generated)} "
                f"({len(self.generated):,} images), real fraction {self.real_fraction}"
            )
        return "\n".join(lines + self.notes)


def make_sources(config, *, need_train: bool = True, need_generated: bool = True) -> Sources:
    """Real train/test sources (with the optional deterministic subset) and the generated source."""
    from certjax.data import sources

    data = config.data
    data_dir = data.get("tfds_data_dir", "") or None
    labels = data.get("labels", "names")  # configs saved before the field: the dataset's names
    cache_dir = data.get("cache_dir", "")
    test = sources.make_real_source(data.real, "test", data.dataset, data_dir, labels, cache_dir)
    notes: list[str] = []
    train = generated = None
    real_fraction = 1.0
    if need_train:
        train = sources.make_real_source(data.real, "train", data.dataset, data_dir, labels, cache_dir)
        if data.get("real_subset", 0):
            idx = sources.subset_indices(len(train), data.real_subset, data.real_subset_mode, config.seed)
            train = sources.SubsetSource(train, idx)
            notes.append(
                f"real training data restricted to {len(idx):,} images "
                f"({data.real_subset_mode}, seed {config.seed})"
            )
        if data.get("generated", "") and need_generated:
            generated = sources.GeneratedNpzSource(
                data.generated,
                test.num_classes,
                limit=data.get("generated_limit", 0) or None,
                seed=config.seed,
                image_shape=test.image_shape,
                cache_dir=cache_dir,
            )
            real_fraction = float(data.real_fraction)
        elif not data.get("generated", ""):
            notes.append("no generated data (data.generated is empty): training on real data only")
    return Sources(
        train=train,
        test=test,
        generated=generated,
        real_fraction=real_fraction,
        num_classes=test.num_classes,
        notes=notes,
        image_shape=test.image_shape,
    )
