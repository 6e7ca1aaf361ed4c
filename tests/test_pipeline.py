"""The grain pipeline: exact per-batch mix, epoch length, reshuffling, determinism from (seed, step)."""

import math

import numpy as np
import pytest

from certjax.data.pipeline import MixedBatches, real_count
from certjax.data.sources import ArraySource


def _source(n, tag, num_classes=10):
    """Images whose first pixel encodes (tag, index), so a batch reveals exactly where it came from."""
    images = np.zeros((n, 32, 32, 3), np.uint8)
    images[:, 0, 0, 0] = tag
    images[:, 0, 0, 1] = np.arange(n) % 256
    images[:, 0, 0, 2] = np.arange(n) // 256
    return ArraySource(images, np.arange(n) % num_classes, num_classes, name=f"src{tag}")


def _decode(batch):
    tag = batch["image"][:, 0, 0, 0]
    index = batch["image"][:, 0, 0, 1].astype(int) + 256 * batch["image"][:, 0, 0, 2].astype(int)
    return tag, index


REAL, GEN = _source(1000, 1), _source(3000, 2)


@pytest.mark.parametrize("fraction,expected_real", [(0.0, 0), (0.3, 38), (1.0, 128), (0.5, 64)])
def test_every_batch_has_the_exact_mix(fraction, expected_real):
    batches = MixedBatches(REAL, GEN, batch_size=128, real_fraction=fraction, seed=0)
    assert batches.num_real == expected_real == real_count(128, fraction)
    for step in (0, 1, 7, 8, 50):
        tag, _ = _decode(batches[step])
        assert len(tag) == 128
        assert np.sum(tag == 1) == expected_real
        assert np.sum(tag == 2) == 128 - expected_real


def test_epoch_is_the_real_set_size_whatever_the_mix():
    for fraction in (0.0, 0.3, 1.0):
        batches = MixedBatches(REAL, GEN, batch_size=128, real_fraction=fraction, seed=0)
        assert batches.steps_per_epoch == math.ceil(1000 / 128) == 8


def test_each_pass_is_a_permutation_and_passes_are_reshuffled():
    batches = MixedBatches(REAL, None, batch_size=100, real_fraction=1.0, seed=3)
    passes = []
    for p in range(3):
        idx = np.concatenate([_decode(batches[s])[1] for s in range(10 * p, 10 * p + 10)])
        assert sorted(idx) == list(range(1000))  # every real image exactly once per pass
        passes.append(idx)
    assert not np.array_equal(passes[0], passes[1])
    assert not np.array_equal(passes[1], passes[2])
    assert not np.array_equal(passes[0], np.arange(1000))


def test_generated_stream_is_without_replacement_within_a_pass():
    batches = MixedBatches(REAL, GEN, batch_size=100, real_fraction=0.3, seed=0)  # 70 generated / step
    tags, idx = zip(*(_decode(batches[s]) for s in range(40)))  # 2800 < 3000 generated draws
    gen = np.concatenate([i[t == 2] for t, i in zip(tags, idx)])
    assert len(gen) == 2800 and len(np.unique(gen)) == 2800


def test_batch_is_a_pure_function_of_seed_and_step():
    a = MixedBatches(REAL, GEN, batch_size=64, real_fraction=0.3, seed=11)
    b = MixedBatches(REAL, GEN, batch_size=64, real_fraction=0.3, seed=11)
    c = MixedBatches(REAL, GEN, batch_size=64, real_fraction=0.3, seed=12)
    for step in (0, 5, 123):
        np.testing.assert_array_equal(a[step]["image"], b[step]["image"])
        np.testing.assert_array_equal(a[step]["label"], b[step]["label"])
    assert not np.array_equal(a[5]["image"], c[5]["image"])
    # resuming the iterator at step s gives the same batches as random access
    resumed = list(a.iterate(5, 9))
    for offset, batch in enumerate(resumed):
        np.testing.assert_array_equal(batch["image"], a[5 + offset]["image"])


def test_labels_travel_with_their_images():
    batches = MixedBatches(REAL, GEN, batch_size=64, real_fraction=0.3, seed=0)
    batch = batches[3]
    tag, idx = _decode(batch)
    np.testing.assert_array_equal(batch["label"], idx % 10)


def test_process_slices_partition_the_global_batch():
    full = MixedBatches(REAL, GEN, batch_size=64, real_fraction=0.3, seed=0)[2]
    parts = [
        MixedBatches(REAL, GEN, batch_size=64, real_fraction=0.3, seed=0, process_index=i, process_count=4)[2]
        for i in range(4)
    ]
    np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), full["image"])


def test_missing_generated_data_is_a_clear_error():
    with pytest.raises(ValueError, match="data.generated"):
        MixedBatches(REAL, None, batch_size=64, real_fraction=0.3, seed=0)
    with pytest.raises(ValueError, match=r"real_fraction must be in \[0, 1\]"):
        MixedBatches(REAL, GEN, batch_size=64, real_fraction=1.5, seed=0)


def test_eval_subset_is_a_fixed_random_subset_not_the_first_images():
    from certjax.data.pipeline import eval_batches

    labels = np.repeat(np.arange(10), 100)  # ordered by class, as image folders are
    images = np.zeros((1000, 32, 32, 3), np.uint8)
    source = ArraySource(images, labels, 10, name="by_class")
    subset = np.concatenate([b["label"] for b in eval_batches(source, 64, limit=200, seed=3)])
    again = np.concatenate([b["label"] for b in eval_batches(source, 64, limit=200, seed=3)])
    assert len(subset) == 200
    np.testing.assert_array_equal(subset, again)
    assert len(np.unique(subset)) == 10  # every class, not the first two
    full = np.concatenate([b["label"] for b in eval_batches(source, 64)])
    np.testing.assert_array_equal(full, labels)
