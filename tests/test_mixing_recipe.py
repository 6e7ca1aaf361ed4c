"""LiResNet++'s data recipe: the real_pass epoch, per-source augmentation, RandAugment op by op against Pillow
(what torchvision's RandAugment runs on PIL images), and the real-part training accuracy."""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from certjax.data import randaugment as ra
from certjax.data.augment import augment_batch, random_crop_flip
from certjax.data.pipeline import MixedBatches
from certjax.data.sources import ArraySource
from configs.common import get_common


def _source(n, tag):
    """Images whose first pixel encodes (tag, index)."""
    images = np.zeros((n, 32, 32, 3), np.uint8)
    images[:, 0, 0, 0] = tag
    images[:, 0, 0, 1] = np.arange(n) % 256
    images[:, 0, 0, 2] = np.arange(n) // 256
    return ArraySource(images, np.arange(n) % 10, 10, name=f"src{tag}")


def _real_indices(batch):
    image = batch["image"]
    real = image[:, 0, 0, 0] == 1
    return image[real, 0, 0, 1].astype(int) + 256 * image[real, 0, 0, 2].astype(int)


# ------------------------------------------------------------------------------------------------ epochs


def test_real_pass_epoch_is_one_pass_over_the_real_set_at_the_real_count():
    real, generated = _source(1000, 1), _source(5000, 2)
    passes = MixedBatches(real, generated, 64, 0.25, seed=0, epoch_definition="real_pass")
    assert passes.num_real == 16 and passes.steps_per_epoch == math.ceil(1000 / 16) == 63
    sets = MixedBatches(real, generated, 64, 0.25, seed=0)  # the default: ceil(N_real / B)
    assert sets.steps_per_epoch == math.ceil(1000 / 64) == 16


def test_real_pass_sees_every_real_image_once_per_epoch():
    real, generated = _source(960, 1), _source(5000, 2)
    batches = MixedBatches(real, generated, 64, 0.25, seed=4, epoch_definition="real_pass")
    assert batches.steps_per_epoch == 60
    epochs = []
    for epoch in range(2):
        steps = range(60 * epoch, 60 * (epoch + 1))
        seen = np.concatenate([_real_indices(batches[s]) for s in steps])
        assert len(seen) == 960 and sorted(seen) == list(range(960))
        epochs.append(seen)
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every pass


def test_epoch_definition_errors_name_the_fix():
    real, generated = _source(100, 1), _source(100, 2)
    with pytest.raises(ValueError, match="real_set.*real_pass"):
        MixedBatches(real, generated, 64, 0.25, seed=0, epoch_definition="pass")
    with pytest.raises(ValueError, match="0 of them"):
        MixedBatches(real, generated, 64, 0.0, seed=0, epoch_definition="real_pass")


def test_config_checks_catch_bad_data_and_augment_values():
    from certjax.config_checks import ConfigError, check_config
    from configs.liresnet import get_config

    config = get_config("XS,demo")
    check_config(config)  # the defaults pass
    config.data.epoch_definition = "real_pass"
    config.data.generated = "/some/file.npz"
    config.data.real_fraction = 0.0
    config.augment.generated = {"pad": -1, "padding": 2}
    config.augment.randaugment.prob = 1.5
    config.augment.randaugment.magnitude = 31
    with pytest.raises(ConfigError) as error:
        check_config(config)
    message = str(error.value)
    for expected in (
        "data.epoch_definition: 'real_pass' with data.real_fraction=0.0",
        "augment.generated: unknown key(s) ['padding']",
        "augment.generated.pad: -1",
        "augment.randaugment.prob: 1.5",
        "augment.randaugment.magnitude: 31",
    ):
        assert expected in message, message
    config.data.epoch_definition = "epochs"
    with pytest.raises(ConfigError, match="'real_set'.*'real_pass'"):
        check_config(config)


def test_experiment_schedules_and_intervals_follow_the_real_pass_epoch(tmp_path):
    from certjax.experiment import Experiment
    from certjax.optim import learning_rate_schedule
    from tests.conftest import _tiny_config

    npz = tmp_path / "gen.npz"
    rng = np.random.default_rng(0)
    np.savez(
        npz, image=rng.integers(0, 256, (300, 32, 32, 3), dtype=np.uint8), label=rng.integers(0, 10, 300)
    )
    config = _tiny_config("liresnet")
    config.data.generated, config.data.real_fraction = str(npz), 0.25
    config.data.epoch_definition = "real_pass"
    config.train.epochs, config.optimizer.warmup_epochs = 3, 1
    exp = Experiment(config)
    assert exp.num_real == 16 and exp.steps_per_epoch == math.ceil(256 / 16) == 16
    assert exp.total_steps == 3 * 16
    schedule = learning_rate_schedule(config.optimizer, 1.0, exp.total_steps, exp.steps_per_epoch)
    assert float(schedule(8)) == pytest.approx(0.5)  # warmup ends at epoch 1 = step 16
    assert float(schedule(16)) == pytest.approx(1.0, rel=1e-3)


# ----------------------------------------------------------------------------------- per-source augment


def _augmented(rng, images, num_real, augment):
    """augment_batch jitted, as inside the train step."""
    return jax.jit(lambda key, x: augment_batch(key, x, num_real=num_real, augment=augment))(rng, images)


def _augment(**settings):
    augment = get_common().augment
    for key, value in settings.items():
        augment[key] = value
    return augment


def _coordinate_images(n):
    """Channel 0 = row + 1, channel 1 = column + 1, channel 2 = 200: a crop's offset and flip are readable."""
    rows, cols = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    image = np.stack([rows + 1, cols + 1, np.full_like(rows, 200)], -1).astype(np.uint8)
    return np.repeat(image[None], n, 0)


def _decode_shift_and_flip(images):
    """Per image: (dy, dx) of the crop (0 = centred) and whether it was flipped, from the coordinate image."""
    row = images[:, 16, :, 1].astype(int)
    flipped = row[:, 20] < row[:, 12]
    centre_col = np.where(flipped, row[:, 15], row[:, 16])  # flipping maps column 16 to 15
    return images[:, 16, 16, 0].astype(int) - 17, centre_col - 17, flipped


def test_generated_rows_get_pad_2_and_real_rows_pad_4():
    images = jnp.asarray(_coordinate_images(1024))
    augment = _augment(generated={"pad": 2})
    out = np.asarray(_augmented(jax.random.PRNGKey(1), images, 256, augment))
    dy, dx, flipped = _decode_shift_and_flip(out)
    real, gen = slice(0, 256), slice(256, None)
    assert set(dy[gen]) == set(dx[gen]) == set(range(-2, 3))  # all of pad 2's offsets, none beyond
    assert set(dy[real]) == set(dx[real]) == set(range(-4, 5))
    for part in (real, gen):
        assert 0.35 < flipped[part].mean() < 0.65
    # the padded border is zeros: a generated image shifted by 2 rows starts with 2 black rows
    down = np.flatnonzero(dy[gen] == -2)[0] + 256
    inside = out[down, 2, :, 2] == 200
    assert np.all(out[down, :2] == 0) and inside.sum() >= 30 and np.all(out[down, 2, inside, 0] == 1)


def test_defaults_are_todays_crop_and_flip_bitwise():
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (96, 32, 32, 3), dtype=np.uint8))
    for pad, mode in ((4, "constant"), (3, "edge")):
        augment = _augment(pad=pad, pad_mode=mode)
        for num_real in (0, 29, 96):
            for seed in (0, 7):
                rng = jax.random.PRNGKey(seed)
                expected = random_crop_flip(rng, images, pad=pad, pad_mode=mode, flip=True)
                got = augment_batch(rng, images, num_real=num_real, augment=augment)
                np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_randaugment_touches_only_real_rows_and_keeps_their_crops():
    images = jnp.asarray(np.random.default_rng(1).integers(0, 256, (320, 32, 32, 3), dtype=np.uint8))
    rng, n = jax.random.PRNGKey(3), 200
    plain = np.asarray(_augmented(rng, images, n, _augment()))
    always = _augment(randaugment={"prob": 1.0, "num_ops": 2, "magnitude": 9})
    half = _augment(randaugment={"prob": 0.5, "num_ops": 2, "magnitude": 9})
    out_always = np.asarray(_augmented(rng, images, n, always))
    out_half = np.asarray(_augmented(rng, images, n, half))
    for out in (out_always, out_half):
        np.testing.assert_array_equal(out[n:], plain[n:])  # generated rows: crop/flip only
        assert out.dtype == np.uint8
    changed_always = np.any(out_always[:n] != plain[:n], axis=(1, 2, 3))
    changed_half = np.any(out_half[:n] != plain[:n], axis=(1, 2, 3))
    assert changed_always.mean() > 0.9  # only Identity twice (1/196) or a no-op draw leaves one as it was
    assert 0.35 < changed_half.mean() < 0.65
    # where an image was not augmented it is exactly its crop/flip: RandAugment has its own key
    assert np.array_equal(out_half[:n][~changed_half], plain[:n][~changed_half])


# ------------------------------------------------------------------------------- RandAugment vs Pillow


def _test_images():
    """Noise, narrow-range noise, constant, two-valued and gradient images: every lookup-table branch."""
    rng = np.random.default_rng(5)
    images = []
    for k in range(24):
        lo = int(rng.integers(0, 200))
        hi = int(rng.integers(lo, 256))
        image = rng.integers(lo, hi + 1, (32, 32, 3))
        if k % 4 == 1:
            image[:] = lo
        elif k % 4 == 2:
            image = np.where(rng.random((32, 32, 3)) < 0.5, lo, hi)
        elif k % 4 == 3:
            ramp = np.linspace(lo, hi, 32)
            image = np.stack(
                [np.add.outer(ramp, ramp) / 2, np.add.outer(ramp, ramp[::-1]) / 2, image[..., 2]], -1
            )
        images.append(image.astype(np.uint8))
    images[0] = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
    return np.stack(images)


def _torchvision_inverse_affine(center, angle, translate, shear):
    """torchvision.transforms.functional._get_inverse_affine_matrix (scale 1), written out in float64."""
    rot, sx, sy = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
    a = math.cos(rot - sy) / math.cos(sy)
    b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
    c = math.sin(rot - sy) / math.cos(sy)
    d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
    m = [d, -b, 0.0, -c, a, 0.0]
    (cx, cy), (tx, ty) = center, translate
    m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty) + cx
    m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty) + cy
    return m


def _pillow_reference(image, op, magnitude):
    """What torchvision's _apply_op does to a PIL image (fill 0, nearest)."""
    pil = Image.fromarray(image)
    black = (0, 0, 0)
    if op == "Identity":
        return image
    if op in ("ShearX", "ShearY"):
        angle = math.degrees(math.atan(magnitude))
        shear = (angle, 0.0) if op == "ShearX" else (0.0, angle)
        matrix = _torchvision_inverse_affine((0, 0), 0.0, (0, 0), shear)
        return np.asarray(pil.transform((32, 32), Image.AFFINE, matrix, Image.NEAREST, fillcolor=black))
    if op in ("TranslateX", "TranslateY"):  # brute force: shift by int(magnitude), zeros come in
        shift = int(magnitude)
        out = np.zeros_like(image)
        for y in range(32):
            for x in range(32):
                sx, sy = (x - shift, y) if op == "TranslateX" else (x, y - shift)
                if 0 <= sx < 32 and 0 <= sy < 32:
                    out[y, x] = image[sy, sx]
        return out
    if op == "Rotate":
        return np.asarray(pil.rotate(magnitude, Image.NEAREST, fillcolor=black))
    if op in ra.BLENDS:
        enhancer = {"Brightness": ImageEnhance.Brightness, "Color": ImageEnhance.Color}.get(op)
        enhancer = enhancer or {"Contrast": ImageEnhance.Contrast, "Sharpness": ImageEnhance.Sharpness}[op]
        return np.asarray(enhancer(pil).enhance(1.0 + magnitude))
    if op == "Posterize":
        return np.asarray(ImageOps.posterize(pil, int(magnitude)))
    if op == "Solarize":
        return np.asarray(ImageOps.solarize(pil, magnitude))
    if op == "AutoContrast":
        return np.asarray(ImageOps.autocontrast(pil))
    return np.asarray(ImageOps.equalize(pil))


def test_magnitudes_are_torchvisions_at_bin_9():
    m = ra.magnitudes(9)
    assert m["ShearX"] == pytest.approx(0.09) and m["Rotate"] == 9.0
    assert int(m["TranslateX"]) == 4  # 150/331 * 32 * 9/30 = 4.35
    assert m["Brightness"] == pytest.approx(0.27) and m["Posterize"] == 7 and m["Solarize"] == 178.5
    assert ra.magnitudes(30)["Posterize"] == 4 and ra.magnitudes(0)["Solarize"] == 255.0


@functools.cache
def _apply_ops_jit(magnitude):
    return jax.jit(functools.partial(ra.apply_ops, magnitude=magnitude))


@pytest.mark.parametrize("magnitude", [9, 30])
@pytest.mark.parametrize("op", ra.OPS)
def test_each_op_matches_pillow(op, magnitude):
    """Exact, except AutoContrast: Pillow computes int(v * 255/(hi-lo) - lo * 255/(hi-lo)) in double, which
    lands one below the exact integer (v - lo) 255 / (hi - lo) on some levels; we take the exact floor. So
    there, and only where (v - lo) 255 is a multiple of hi - lo, ours may be Pillow's + 1."""
    images = _test_images()
    index = ra.OPS.index(op)
    signed = op not in ("Identity", "Posterize", "Solarize", "AutoContrast", "Equalize")
    for negative in (False, True) if signed else (False,):
        value = ra.magnitudes(magnitude).get(op, 0.0) * (-1.0 if negative else 1.0)
        ours = _apply_ops_jit(magnitude)(
            jnp.asarray(images),
            jnp.full((len(images),), index, jnp.int32),
            jnp.full((len(images),), negative),
        )
        ours = np.asarray(ours).astype(int)
        reference = np.stack([_pillow_reference(image, op, value) for image in images]).astype(int)
        if op != "AutoContrast":
            np.testing.assert_array_equal(ours, reference, err_msg=f"{op} {value}")
            continue
        lo = images.min(axis=(1, 2), keepdims=True).astype(int)
        hi = images.max(axis=(1, 2), keepdims=True).astype(int)
        exact_integer = ((images.astype(int) - lo) * 255) % np.maximum(hi - lo, 1) == 0
        difference = ours - reference
        assert set(np.unique(difference)) <= {0, 1}
        assert not np.any(difference[~exact_integer]), "a difference where Pillow's double is not at a tie"
        assert np.mean(difference != 0) < 0.05


def test_rand_augment_applies_with_probability_and_keeps_uint8():
    images = jnp.asarray(np.random.default_rng(2).integers(0, 256, (300, 32, 32, 3), dtype=np.uint8))
    out = jax.jit(lambda key, x: ra.rand_augment(key, x, prob=0.5, num_ops=2, magnitude=9))(
        jax.random.PRNGKey(0), images
    )
    assert out.dtype == jnp.uint8 and out.shape == images.shape
    changed = np.any(np.asarray(out) != np.asarray(images), axis=(1, 2, 3))
    assert 0.38 < changed.mean() < 0.62
    np.testing.assert_array_equal(ra.rand_augment(jax.random.PRNGKey(0), images, prob=0.0), images)
    with pytest.raises(ValueError, match="uint8"):
        ra.rand_augment(jax.random.PRNGKey(0), images.astype(jnp.float32), prob=0.5)


# ---------------------------------------------------------------------------------------- real accuracy


def test_real_part_accuracy_on_a_hand_example():
    from certjax.train import NO_STEP, TrainMetrics, batch_accuracies

    labels = jnp.asarray([0, 1, 2, 0, 1, 2])
    predicted = [0, 2, 2, 0, 1, 0]  # rows 0, 2, 3, 4 correct; the first 2 rows are real: 1 of 2
    logits = jax.nn.one_hot(jnp.asarray(predicted), 3)

    def step(num_real):
        return TrainMetrics.single_from_model_output(
            loss=jnp.float32(0.0), **batch_accuracies(logits, labels, num_real), nonfinite_step=NO_STEP
        )

    one = step(2).compute()
    assert float(one["accuracy"]) == pytest.approx(4 / 6) and float(one["accuracy_real"]) == pytest.approx(
        0.5
    )
    merged = step(2).merge(step(4)).compute()  # real rows: 1 of 2, then 3 of 4 -> 4 of 6
    assert float(merged["accuracy_real"]) == pytest.approx(4 / 6)
    assert float(step(6).compute()["accuracy_real"]) == float(step(6).compute()["accuracy"])
    assert np.isnan(float(step(0).compute()["accuracy_real"]))  # generated only: no real part, not shown


def test_common_config_defaults():
    config = get_common()
    assert config.data.epoch_definition == "real_set"
    assert config.augment.generated is None and config.augment.randaugment.prob == 0.0
    assert isinstance(config.augment.randaugment, ml_collections.ConfigDict)
