"""SortNet (recipe of zbh2047/SortNet): depth 6, width 5120, q 0.85, 3000 epochs, batch 512, eps 8/255.

  python launch.py --config=configs/sortnet.py --workdir=runs/sortnet                 # dropout (original)
  python launch.py --config=configs/sortnet.py:nodropout --workdir=runs/sortnet_exact  # seed's w/o dropout
  python launch.py --config=configs/sortnet.py:dropout,cifar100 --workdir=runs/sortnet_c100
  python launch.py --config=configs/sortnet.py:demo --workdir=runs/sortnet_demo       # CPU, minutes, offline
  python launch.py --config=configs/sortnet.py:demo,tiny --workdir=runs/sortnet_tiny  # the tests' tiny run

Without --config.data.generated the run uses real data only (and says so). The default data is CIFAR from
tensorflow-datasets; offline, pass --config.data.real=... (see README). zbh2047/SortNet has no CIFAR-100
recipe: "cifar100" keeps the CIFAR-10 hyperparameters with 100 classes and CIFAR-100's normalisation.

Variants (comma separated): "dropout" (default) or "nodropout", "cifar100", "demo" (embedded 5k/1k CIFAR-10
sample, depth 4, width 128, 16 epochs), "tiny" (the tests' tiny run, tests/conftest.py: 1 epoch of 4 steps at
batch 64 on 256 images, 250 test images, depth 3, width 32, certify.eps 2/255, without dropout, so not with
"dropout"; with "demo" for the embedded sample).
"""

from __future__ import annotations

from configs.common import get_common, parse_variant, use_cifar100_linf, use_demo_data, use_tiny_run

# What each variant is for, one line each (`certjax list` prints them); the keys are the valid variants.
VARIANT_NOTES = {
    "dropout": "the original training: each sort layer trains on a random subset of its inputs",
    "nodropout": "the seed paper's 'w/o dropout': the exact sort neuron in training",
    "cifar100": "CIFAR-100 with the CIFAR-10 recipe (the original has none), 100 classes, its normalisation",
    "demo": "the embedded 5k/1k CIFAR-10 sample, depth 4, width 128, 16 epochs: minutes on a CPU, offline",
    "tiny": "the tests' tiny run (with demo): 1 epoch of 4 steps, depth 3, width 32, no dropout; seconds",
}
VARIANTS = set(VARIANT_NOTES)
PUBLISHED = (
    "CIFAR-10 at 8/255, clean / certified (zbh2047/SortNet logs, 8 seeds, with dropout): 54.49 / 39.96 % "
    "mean, best 54.84 / 40.39 %"
)


def get_config(arg: str = "dropout"):
    parts = parse_variant(arg, VARIANTS)
    if {"dropout", "nodropout"} <= parts:
        raise ValueError("choose one of 'dropout' and 'nodropout'")
    if {"tiny", "dropout"} <= parts:
        raise ValueError("'tiny' trains without dropout ('nodropout'); drop 'dropout'")
    if "tiny" in parts:
        parts.add("nodropout")
    config = get_common()
    config.family = "sortnet"
    config.variant = arg or ""

    # kernel: distance implementation, "auto" (Pallas on GPU, jnp elsewhere) | "pallas" | "jnp" | "interpret";
    # the sort neuron itself always runs on jax.lax.top_k.
    config.model = dict(
        name="sortnet",
        depth=6,
        width=5120,
        q=0.85,
        mode="exact" if "nodropout" in parts else "dropout",
        kernel="auto",
    )
    config.data.std = (0.2009, 0.2009, 0.2009)  # one std keeps l_inf balls l_inf balls
    config.augment.pad = 3
    config.augment.pad_mode = "edge"

    config.train.epochs = 3000
    config.train.batch_size = 512
    # AdamW (0.9, 0.99, eps 1e-10), lr 0.02 cosine per step, weight decay 0.02 on the logit scale only.
    config.optimizer = dict(
        name="adamw", lr=0.02, scale_lr=0.0, b1=0.9, b2=0.99, eps=1e-10, weight_decay=0.02,
        decay_scale_only=True, schedule="cosine", warmup_epochs=0, clip_norm=0.0,
    )  # fmt: skip
    config.loss = dict(name="mixture", lam0=0.2, lam_end=0.002, eps_train=24 / 255)
    # commands/cifar8_255.sh: --p-start 8 --p-end 1000 --epochs 0,0,200,2950,3000
    config.p_schedule = dict(
        enabled=True, p_start=8.0, p_end=1000.0, start_fraction=200 / 3000, end_fraction=2950 / 3000
    )
    config.certify.eps = 8 / 255
    config.certify.method = "both"  # the margin, and interval bounds through sort neurons (certjax.bounds)
    config.checkpoint.every_epochs = 50

    if "cifar100" in parts:
        use_cifar100_linf(config)
    if "demo" in parts:
        use_demo_data(config, depth=4, width=128)
    if "tiny" in parts:
        use_tiny_run(config)
        config.model.depth = 3
        config.model.width = 32
        config.certify.eps = 2 / 255
    return config
