"""SortNet + MLP head for 64x64 data, l_inf eps 1/255 (zbh2047/SortNet commands/tinyimagenet1_255_mlp.sh and
imagenet1_255_mlp.sh, `SortHybridModel(depth=7, width=5120, hidden=512 | 2048, dropout=0.7)`;
shared/RECIPES.md "64x64 datasets"; the model: certjax/models/sortnet_hybrid.py).

  python launch.py --config=configs/sortnet_hybrid.py --workdir=runs/hybrid_tiny \\
      --config.data.real=/data/tiny-imagenet-200.zip                                   # Tiny-ImageNet
  python launch.py --config=configs/sortnet_hybrid.py:imagenet64 --workdir=runs/hybrid_in64 \\
      --config.data.real=/data/Imagenet64                                              # ImageNet 64x64
  python launch.py --config=configs/sortnet_hybrid.py:demo --workdir=runs/hybrid_demo  # CPU, offline
  python launch.py --config=configs/sortnet_hybrid.py:tiny --workdir=runs/hybrid_tiny \\
      --config.data.real=tests-fixture/tiny-imagenet-200.zip                           # seconds

Recipe: 1 l_inf-dist layer 12288 -> 5120 and 4 sort layers (q 0.7, mean shift), linear 5120 -> hidden +
tanh, linear hidden -> classes, a learnable logit scale; loss ce_hinge(lam0 1, lam_end 0.01) on interval
bounds; eps_train 1.1/255 ramped over the first half (epochs 0-500 of 1000) with --eps-smooth 0.4; p = 8 for
the first 10 %, geometric to 1000 at 98 %, then inf; AdamW (0.9, 0.99, 1e-10), lr 0.02 cosine per step,
batch 512; certified by interval bounds (certify.method "ibp", the original's). ImageNet 64x64: hidden 2048,
300 epochs (eps 0-200, p 30-290), batch 1024, lr 0.01.

Weight decay: 0.02 on every non-distance parameter (the head and the scale), none on the distance layers, as
the original (optimizer.decay_scale_only with optimizer.decayed_modules = the head's HeadLinear modules).

Variants (comma separated): "tiny_imagenet" (default), "imagenet64", "demo" (the embedded 5k/1k CIFAR-10
sample at 32x32, 10 classes, a small net, 16 epochs: the hybrid on CPU data; the recipe is for 64x64),
"tiny" (the tests' tiny run, tests/conftest.py: 1 epoch of 4 steps at batch 64, depth 4, width 32, hidden 16,
without dropout; with "demo" on the embedded sample, else on the dataset's data.real).
"""

from __future__ import annotations

from configs.common import get_common, parse_variant, use_demo_data, use_tiny_run

VARIANT_NOTES = {
    "tiny_imagenet": "Tiny-ImageNet-200 (the default): hidden 512, 1000 epochs, batch 512, lr 0.02",
    "imagenet64": "ImageNet 64x64: hidden 2048, 300 epochs, batch 1024, lr 0.01",
    "demo": "the embedded 5k/1k CIFAR-10 sample (32x32), depth 4, width 128, hidden 64, 16 epochs: CPU",
    "tiny": "the tests' tiny run: 1 epoch of 4 steps, depth 4, width 32, hidden 16, no dropout; seconds",
}
VARIANTS = set(VARIANT_NOTES)
PUBLISHED = (
    "l_inf 1/255, clean / certified (zbh2047/SortNet logs, 8 seeds, epoch 1000 / 300): Tiny-ImageNet "
    "23.91 / 17.46 %, ImageNet 64x64 13.31 / 8.94 %"
)


def _use_imagenet64(config) -> None:
    config.data.dataset = "imagenet64"
    config.data.mean = (0.4815, 0.4578, 0.4082)
    config.data.std = (0.2128, 0.2128, 0.2128)
    config.augment.pad = 4
    config.model.hidden = 2048
    config.train.epochs = 300
    config.train.batch_size = 1024
    config.optimizer.lr = 0.01
    config.loss.eps_schedule.end_fraction = 200 / 300
    config.p_schedule.start_fraction = 30 / 300
    config.p_schedule.end_fraction = 290 / 300


def get_config(arg: str = "tiny_imagenet"):
    parts = parse_variant(arg, VARIANTS)
    if {"tiny_imagenet", "imagenet64"} <= parts or (
        "demo" in parts and parts & {"tiny_imagenet", "imagenet64"}
    ):
        raise ValueError("choose one dataset: 'tiny_imagenet', 'imagenet64' or 'demo'")
    config = get_common()
    config.family = "sortnet_hybrid"
    config.variant = arg or ""
    config.model = dict(
        name="sortnet_hybrid", depth=7, width=5120, hidden=512, q=0.7,
        mode="exact" if "tiny" in parts else "dropout", kernel="auto",
    )  # fmt: skip
    config.data.dataset = "tiny_imagenet"
    config.data.mean = (0.4802, 0.4481, 0.3975)
    config.data.std = (0.2276, 0.2276, 0.2276)  # one std keeps l_inf balls l_inf balls
    config.augment.pad = 5
    config.augment.pad_mode = "edge"

    config.train.epochs = 1000
    config.train.batch_size = 512
    config.optimizer = dict(
        name="adamw", lr=0.02, scale_lr=0.0, b1=0.9, b2=0.99, eps=1e-10, weight_decay=0.02,
        decay_scale_only=True, decayed_modules=("HeadLinear",),  # the head and the scale, as the original
        schedule="cosine", warmup_epochs=0, clip_norm=0.0,
    )  # fmt: skip
    # eps_train 0.00431 (1.1/255) in pixel units, ramped by --epochs 0,500 and --eps-smooth 0.4
    config.loss = dict(
        name="ce_hinge", bound="ibp", lam0=1.0, lam_end=0.01, eps_train=0.00431,
        eps_schedule=dict(kind="smooth", start_fraction=0.0, end_fraction=500 / 1000, smooth=0.4),
    )  # fmt: skip
    config.p_schedule = dict(
        enabled=True, p_start=8.0, p_end=1000.0, start_fraction=100 / 1000, end_fraction=980 / 1000
    )
    config.certify.eps = 0.00392  # 1/255 as the original passes it (--eps-test 0.00392)
    config.certify.method = (
        "ibp"  # the head is not 1-Lipschitz: no margin certificate (the model's docstring)
    )
    config.checkpoint.every_epochs = 50

    if "imagenet64" in parts:
        _use_imagenet64(config)
    if "demo" in parts:
        config.data.dataset = "cifar10"
        config.data.mean = (0.4914, 0.4822, 0.4465)
        config.data.std = (0.2009, 0.2009, 0.2009)
        config.augment.pad = 3
        use_demo_data(config, depth=4, width=128)
        config.model.hidden = 64
        config.certify.eps = 2 / 255
    if "tiny" in parts:
        use_tiny_run(config)
        config.model.depth = 4
        config.model.width = 32
        config.model.hidden = 16
        config.certify.eps = 2 / 255
    return config
