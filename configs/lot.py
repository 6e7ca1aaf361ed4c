"""LOT (AI-secure/Layerwise-Orthogonal-Training): LipConvNet-10/20/40 with LOT layers, l_2 eps 36/255.

  python launch.py --config=configs/lot.py:S --workdir=runs/lot_s               # LipConvNet-10, multistep
  python launch.py --config=configs/lot.py:M,cosine --workdir=runs/lot_m_cos    # LipConvNet-20, cosine
  python launch.py --config=configs/lot.py:L,cifar100 --workdir=runs/lot_l_c100
  python launch.py --config=configs/lot.py:S,tiny_imagenet --workdir=runs/lot_tiny \\
      --config.data.real=/data/tiny-imagenet-200.zip                  # 64 x 64, no published recipe
  python launch.py --config=configs/lot.py:S,demo --workdir=runs/lot_demo       # CPU, minutes, offline
  python launch.py --config=configs/lot.py:demo,tiny --workdir=runs/lot_tiny    # the tests' tiny run

Variants: size S | M | L (LipConvNet-10/20/40, default S), schedule multistep (the original: per step x0.1 at
50 % and 75 % of training) | cosine (the seed paper's alternative), cifar100, lln (normalised last layer
instead of the 1x1 LOT layer), tiny_imagenet (Tiny-ImageNet-200 at 64 x 64 with the CIFAR recipe, which
LOT never published: after the five stages the 2 x 2 map is folded into the channels by space-to-depth, so the
1x1 head sees one pixel), demo (embedded sample, init_channels 8, a few epochs), tiny (the tests' tiny
run, tests/conftest.py: 1 epoch of 4 steps at batch 64 on 256 images, 250 test images, init_channels 4, the
cosine schedule at lr 0.05, certify.eps 0.02, so not with multistep; with demo for the embedded sample).

Recipe: SGD 0.1, momentum 0.9, no weight decay, batch 256, 200 epochs, cross-entropy.
"""

from __future__ import annotations

from configs.common import get_common, parse_variant, use_demo_data, use_tiny_run

# What each variant is for, one line each (`certjax list` prints them); the keys are the valid variants.
VARIANT_NOTES = {
    "S": "LipConvNet-10",
    "M": "LipConvNet-20",
    "L": "LipConvNet-40",
    "multistep": "the original lr schedule, x0.1 at 50 % and 75 % of training (the default)",
    "cosine": "cosine annealing instead (the seed paper's alternative, its Table 4)",
    "cifar100": "CIFAR-100 (normalised with CIFAR-10's mean and std, as LOT does)",
    "tiny_imagenet": "Tiny-ImageNet-200 at 64 x 64, unchanged otherwise (no published recipe): see above",
    "lln": "a normalised last layer instead of the 1x1 LOT layer",
    "demo": "the embedded 5k/1k CIFAR-10 sample, init channels 8, 8 epochs: minutes on a CPU, offline",
    "tiny": "the tests' tiny run (with demo): 1 epoch of 4 steps, init channels 4, cosine; seconds",
}
VARIANTS = set(VARIANT_NOTES)
PUBLISHED = (
    "LOT paper (Xu et al., NeurIPS'22, abstract), supervised, at 36/255: the 40-layer net (L) certifies "
    "63.50 % of CIFAR-10 and 34.59 % of CIFAR-100"
)


def get_config(arg: str = "S"):
    parts = parse_variant(arg, VARIANTS)
    sizes = parts & {"S", "M", "L"}
    if len(sizes) > 1:
        raise ValueError(f"choose one size of S, M, L; got {sorted(sizes)}")
    if {"multistep", "cosine"} <= parts:
        raise ValueError("choose one of 'multistep' and 'cosine'")
    if {"tiny", "multistep"} <= parts:
        raise ValueError("'tiny' trains with the cosine schedule; drop 'multistep'")
    if "tiny" in parts:
        parts.add("cosine")
    config = get_common()
    config.family = "lot"
    config.variant = arg or ""

    config.model = dict(
        name="lot", size=(sizes or {"S"}).pop(), init_channels=32, lln="lln" in parts, iterations=10
    )
    # LOT lip_convnets / utils: mean (0.4914, 0.4822, 0.4465), one std 0.2507 -> L_input = 1 / 0.2507.
    config.data.std = (0.2507, 0.2507, 0.2507)
    config.augment.pad = 4
    config.augment.pad_mode = "constant"

    config.train.epochs = 200
    config.train.batch_size = 256
    config.optimizer = dict(
        name="sgd", lr=0.1, scale_lr=0.0, momentum=0.9, weight_decay=0.0,
        schedule="cosine" if "cosine" in parts else "multistep", milestones=(0.5, 0.75), gamma=0.1,
        warmup_epochs=0, clip_norm=0.0,
    )  # fmt: skip
    config.loss = dict(name="cross_entropy")
    config.p_schedule = dict(enabled=False, p_start=8.0, p_end=1000.0, start_fraction=0.0, end_fraction=0.0)
    config.certify.eps = 36 / 255
    config.checkpoint.every_epochs = 10

    if "cifar100" in parts:
        # LOT's utils.py get_loaders normalises CIFAR-100 with the CIFAR-10 mean and std 0.2507 as well.
        config.data.dataset = "cifar100"
    if "tiny_imagenet" in parts:
        # No 64 x 64 recipe exists (AI-secure/Layerwise-Orthogonal-Training is CIFAR only): the CIFAR recipe,
        # its normalisation, 200 classes; LipConvNet folds its final 2 x 2 map into the channels.
        config.data.dataset = "tiny_imagenet"
    if "demo" in parts:
        use_demo_data(config, depth=0, width=0)
        del config.model["depth"], config.model["width"]
        config.model.init_channels = 8
        config.train.epochs = 8
        config.train.batch_size = 128
    if "tiny" in parts:
        use_tiny_run(config)
        config.model.init_channels = 4
        config.optimizer.lr = 0.05
        config.certify.eps = 0.02
    return config
