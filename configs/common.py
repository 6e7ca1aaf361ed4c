"""Defaults every family shares: data, mixer, evaluation, checkpointing, logging.

Each family's config file starts from `get_common()` and sets its recipe (shared/RECIPES.md).
"""

from __future__ import annotations

import ml_collections

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)


def get_common() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.family = ""  # e.g. "linf_dist"; recorded in results
    config.variant = ""  # the get_config argument; recorded in results
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.dataset = "cifar10"  # cifar10 | cifar100 | tiny_imagenet | imagenet64 (DATASETS)
    # Real data: "tfds" (download), "demo" (embedded 5k/1k CIFAR-10 sample), a cifar-*-python.tar.gz, an image
    # folder or zip of class folders; "{split}" in a path is replaced by train / test.
    config.data.real = "tfds"
    config.data.tfds_data_dir = ""
    # class folders (data.real a folder or zip): "names" = the dataset's class names, "sorted", or a JSON
    # file {folder: label} (certjax/data/labels.py; folders are never labelled by guess)
    config.data.labels = "names"
    config.data.real_subset = 0  # 0 = all; else N training images
    config.data.real_subset_mode = "random"  # first | random (fixed by seed)
    config.data.generated = ""  # path to an EDM .npz; "" = real data only
    config.data.generated_limit = 0  # 0 = all; else a fixed random subset of N images
    # the `certjax check-labels` report of data.generated (certjax/label_check.py): "" = the file's
    # <generated>.labels.json beside it, else in the user's cache folder; none: the run goes on, saying so
    config.data.label_report = ""
    # a run stops when the report's agreement (the checking model predicts the file's label) is below this
    # fraction of that model's clean accuracy: about half the classes mislabelled; 0 = never stop
    config.data.min_label_agreement = 0.5
    # where a compressed generated .npz (np.savez_compressed) is extracted once: "" = beside the file when
    # that folder is writable, else $XDG_CACHE_HOME/certjax (~/.cache/certjax); an uncompressed one is read
    # in place
    config.data.cache_dir = ""
    config.data.real_fraction = 0.3  # real share of every batch when generated data is given
    # real_set: an epoch is ceil(N_real / batch) steps, whatever the mix (the seed); real_pass: one pass over
    # the real set at the batch's real count, ceil(N_real / n_real) steps (LiResNet++)
    config.data.epoch_definition = "real_set"
    config.data.mean = CIFAR10_MEAN
    config.data.std = (0.2009, 0.2009, 0.2009)
    config.data.reader_threads = 2

    config.augment = ml_collections.ConfigDict()
    config.augment.pad = 4
    config.augment.pad_mode = "constant"
    config.augment.flip = True
    # Generated rows of the batch: None = as the real ones (pad, pad_mode, flip above), or a dict with any of
    # pad / pad_mode / flip (LiResNet++: dict(pad=2)). Set it in a config file (a None field takes no
    # --config override).
    config.augment.generated = None
    # RandAugment on the real rows after their crop and flip, each image with probability prob (0 = off);
    # torchvision's defaults num_ops 2, magnitude 9 of 31 bins (certjax/data/randaugment.py)
    config.augment.randaugment = ml_collections.ConfigDict({"prob": 0.0, "num_ops": 2, "magnitude": 9})

    config.train = ml_collections.ConfigDict()
    config.train.epochs = 100
    config.train.batch_size = 256
    config.train.log_every_steps = 50
    config.train.eval_every_epochs = 1
    config.train.eval_subset = 0  # test images evaluated per epoch during training; 0 = all
    config.train.eval_batch_size = 500

    config.certify = ml_collections.ConfigDict()
    config.certify.eps = 8 / 255  # pixel units
    # margin (Lipschitz margin) | ibp (interval bounds over the input box) | both (either proves it); the
    # l_inf families default to both (certjax.bounds), the l_2 ones have margins only
    config.certify.method = "margin"
    # the l_2 families' guaranteed layer bounds at the final evaluation and --mode=evaluate (certjax/certify/
    # spectral.py): exact (float64 SVDs) | fast (Cholesky certificates, ~5e-7 above exact); the evaluations
    # during training always use fast
    config.certify.bound_method = "exact"

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_epochs = 10
    config.checkpoint.keep = 2  # last k; the best by certified accuracy is kept as well
    return config


def use_cifar100_linf(config) -> None:
    """CIFAR-100 for the l_inf families: 100 classes, its mean, and ONE std for all channels (0.2667) so that
    l_inf balls stay l_inf balls after normalisation (zbh2047/L_inf-dist-net-v2 dataset.py convention)."""
    config.data.dataset = "cifar100"
    config.data.mean = CIFAR100_MEAN
    config.data.std = (0.2667, 0.2667, 0.2667)


def use_demo_data(config, *, depth: int, width: int) -> None:
    """The embedded 5k/1k CIFAR-10 sample, a small net and 16 epochs at batch 128: minutes on a CPU.

    Batch 128 (more steps on 5,000 images): at batch 256 a small l_inf-dist Net collapsed to one class under
    the clipped hinge (measured: 10.0 % clean); at 128 it reaches ~20 % clean / ~18 % certified.
    """
    config.data.real = "demo"
    config.model.depth = depth
    config.model.width = width
    config.train.epochs = 16
    config.train.batch_size = 128
    config.train.log_every_steps = 40
    config.checkpoint.every_epochs = 4


def use_tiny_run(config) -> None:
    """The tests' tiny run (tests/conftest.py trains one per family from "demo,tiny"): 1 epoch of 4 steps at
    batch 64 on 256 training images, 250 test images in one evaluation batch, a checkpoint at the end.
    Seconds on a CPU; each family's `tiny` also shrinks its net after this."""
    config.train.epochs = 1
    config.train.batch_size = 64
    config.data.real_subset = 256
    config.train.eval_batch_size = 250
    config.train.eval_subset = 250
    config.checkpoint.every_epochs = 1


def parse_variant(arg: str, valid: set[str]) -> set[str]:
    """'a,b' -> {'a', 'b'}; an unknown part raises naming the valid ones."""
    parts = {part.strip() for part in (arg or "").split(",") if part.strip()}
    unknown = parts - valid
    if unknown:
        raise ValueError(f"Unknown config variant(s) {sorted(unknown)}; valid: {sorted(valid)}")
    return parts
