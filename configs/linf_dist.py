"""l_inf-dist Net (v2 recipe, shared/RECIPES.md): depth 6, width 5120, 800 epochs, batch 512, eps 8/255.

  python launch.py --config=configs/linf_dist.py --workdir=runs/linf_dist
  python launch.py --config=configs/linf_dist.py:cifar100 --workdir=runs/linf_dist_c100
  python launch.py --config=configs/linf_dist.py:demo --workdir=runs/demo      # CPU, minutes, offline

Variants (comma separated): "cifar100", "demo" (embedded 5k/1k CIFAR-10 sample, small net, few epochs).
"""

from __future__ import annotations

from configs.common import get_common, parse_variant, use_cifar100_linf, use_demo_data

VARIANTS = {"cifar100", "demo"}


def get_config(arg: str = ""):
    parts = parse_variant(arg, VARIANTS)
    config = get_common()
    config.family = "linf_dist"
    config.variant = arg or ""

    # identity_narrowing: not in the recipe (its 3072 -> 5120 first layer widens); helps narrow CPU-size nets.
    # kernel: distance implementation, "auto" (Pallas on GPU, jnp elsewhere) | "pallas" | "jnp" | "interpret".
    config.model = dict(
        name="linf_dist", depth=6, width=5120, identity_init=True, identity_narrowing=False, kernel="auto"
    )

    # One std for all channels keeps l_inf balls l_inf balls (v2 train.py).
    config.data.std = (0.2009, 0.2009, 0.2009)
    config.augment.pad = 3
    config.augment.pad_mode = "edge"

    config.train.epochs = 800
    config.train.batch_size = 512

    config.optimizer = dict(
        name="adam",
        lr=0.03,
        scale_lr=0.006,
        b1=0.9,
        b2=0.99,
        eps=1e-10,
        weight_decay=0.0,
        schedule="cosine",
        warmup_epochs=0,
        clip_norm=0.0,
    )
    config.loss = dict(name="mixture", lam0=0.1, lam_end=5e-4, eps_train=24 / 255)
    # v2: --epochs 0,0,100,1250,1300 --p-start 8 --p-end 1000 (fractions of training).
    config.p_schedule = dict(
        enabled=True, p_start=8.0, p_end=1000.0, start_fraction=100 / 1300, end_fraction=1250 / 1300
    )
    config.certify.eps = 8 / 255
    config.checkpoint.every_epochs = 20

    if "cifar100" in parts:
        use_cifar100_linf(config)
    if "demo" in parts:
        use_demo_data(config, depth=5, width=256)
    return config
