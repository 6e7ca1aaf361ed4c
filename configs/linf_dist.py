"""l_inf-dist Net (zbh2047/L_inf-dist-net and -v2): depth 6, width 5120, 800 epochs, batch 512, eps 8/255.

  python launch.py --config=configs/linf_dist.py --workdir=runs/linf_dist          # v2 (the default)
  python launch.py --config=configs/linf_dist.py:v1 --workdir=runs/linf_dist_v1    # ICML'21 recipe
  python launch.py --config=configs/linf_dist.py:v2,cifar100 --workdir=runs/linf_dist_c100
  python launch.py --config=configs/linf_dist.py:demo --workdir=runs/demo      # CPU, minutes, offline
  python launch.py --config=configs/linf_dist.py:demo,tiny --workdir=runs/tiny # the tests' tiny run, seconds
  python launch.py --config=configs/linf_dist.py:v1,tiny_imagenet --workdir=runs/linf_dist_tiny \\
      --config.data.real=/data/tiny-imagenet-200.zip          # l_inf-dist Net+MLP, Tiny-ImageNet, 1/255

Variants (comma separated): "v2" (default: zbh2047/L_inf-dist-net-v2, Adam, mixture loss) or "v1"
(zbh2047/L_inf-dist-net, the recipe of the seed paper's Table 1 row: its l_p AdamW, lr held then cosine,
hinge loss on worst-case margins), "cifar100", "demo" (embedded 5k/1k CIFAR-10 sample, small net, few epochs),
"tiny" (the tests' tiny run, tests/conftest.py: 1 epoch of 4 steps at batch 64 on 256 images, 250 test images,
depth 3, width 32, certify.eps 2/255; with "demo" for the embedded sample), "tiny_imagenet" (with v1 only).
Both certify by the margin and by interval bounds (certify.method = "both"), except tiny_imagenet.

v1,tiny_imagenet: the l_inf-dist Net+MLP of zbh2047/L_inf-dist-net command/ell_inf_dist_net++_tinyimagenet.sh
(--model 'MLPFeature(depth=5,width=5)' --predictor-hidden-size 512 --loss cross_entropy --kappa 1.0 --p-start
8 --p-end 1000 --epochs 0,100,200,450,500 --eps-train 0.005 -b 512 --lr 0.04 --wd 5e-3). Model: the hybrid
family with the l_inf-dist body (model.name "sortnet_hybrid", model.body "dist", depth 7 = 5 NormDist layers
-> 5120, no bias, mean shift, identity init where in <= out; then linear 5120 -> 512 + tanh, linear 512 ->
200, N(0, 1) weights times 1 / sqrt(fan_in), biases 0: model/bound_module.py Predictor). Loss
ibp_cross_entropy with kappa 1: CE of the interval worst-case margins (main.py Loss; the head's bounds from y
+- eps after the body in training, model/model.py). Schedules from --epochs: eps linear 0 -> 0.005 (pixel
units; main.py divides by std) over epochs 0-200, p = 8 for 0-100, geometric to 1000 over 100-450, inf after;
lr 0.04 held for 0-100, cosine to 0 over 100-500. Its l_p AdamW (0.9, 0.99, 1e-10), wd 5e-3. Data
(dataset.py): mean (0.4802, 0.4481, 0.3975), one std 0.2276; certified by interval bounds at 1/255
(default_eps; certify.method "ibp": the tanh head is not 1-Lipschitz).
Not as the original (certjax cannot express them yet): (1) it trains on RandomCrop(56) + flip and tests on
CenterCrop(56), a 9408-input first layer; certjax keeps 64x64 images (12288 inputs) and shifts them by pad 4
(edge) + crop 64, the same 9 x 9 offsets around the centre; (2) its AdamW decays the head's parameters
plainly (p *= 1 - lr wd: no l_p norm in those modules), adamw_lp decays every row at the current p;
(3) in training its last layer bounds z_j - z_y with rows w_j - w_y for the label y, certjax's head with
rows w_j - w_k for the clean prediction k (the same when k = y, looser otherwise; the model sees no labels).
"""

from __future__ import annotations

from configs.common import get_common, parse_variant, use_cifar100_linf, use_demo_data, use_tiny_run

# What each variant is for, one line each (`certjax list` prints them); the keys are the valid variants.
VARIANT_NOTES = {
    "v2": "the default (zbh2047/L_inf-dist-net-v2): Adam 0.03, cosine, mixture loss at eps_train 24/255",
    "v1": "the ICML'21 recipe of the seed paper's Table 1 row: l_p AdamW, lr held then cosine, hinge loss",
    "cifar100": "CIFAR-100: 100 classes, its mean and one std 0.2667 (with v1 or v2)",
    "demo": "the embedded 5k/1k CIFAR-10 sample, depth 5, width 256, 16 epochs: minutes on a CPU, offline",
    "tiny": "the tests' tiny run (with demo): 1 epoch of 4 steps, depth 3, width 32, eps 2/255; seconds",
    "tiny_imagenet": "with v1: l_inf-dist Net+MLP on Tiny-ImageNet-200 at 1/255, 500 epochs, lr 0.04 (64x64; "
    "demo,tiny: depth 4, width 32, hidden 16 on data.real)",
}
VARIANTS = set(VARIANT_NOTES)
PUBLISHED = (
    "CIFAR-10 at 8/255, clean / certified: v2 54.30 / 40.06 % (v2 README); v1 57.34 / 34.25 % at 800 epochs "
    "without generated data, up to 62.02 / 37.53 % with it (seed paper, Table 1; ICML'21 paper 56.80 / 33.30)"
    "; Tiny-ImageNet at 1/255, v1 l_inf-dist Net+MLP: certified 16.31 % (v1 README; no clean figure there)"
)


def get_config(arg: str = ""):
    parts = parse_variant(arg, VARIANTS)
    if {"v1", "v2"} <= parts:
        raise ValueError("choose one of 'v1' and 'v2'")
    if "tiny_imagenet" in parts and "v1" not in parts:
        raise ValueError(
            "'tiny_imagenet' is a v1 recipe (v2 has none for 64x64 data): use 'v1,tiny_imagenet'"
        )
    if {"tiny_imagenet", "cifar100"} <= parts:
        raise ValueError("choose one dataset: 'tiny_imagenet' or 'cifar100'")
    config = get_common()
    config.family = "linf_dist"
    config.variant = arg or ""

    # identity_narrowing: not in the recipe (its 3072 -> 5120 first layer widens); helps narrow CPU-size nets.
    # kernel: distance implementation, "auto" (Pallas on GPU, jnp elsewhere) | "pallas" | "jnp" | "interpret".
    config.model = dict(
        name="linf_dist", depth=6, width=5120, identity_init=True, identity_narrowing=False, kernel="auto"
    )

    # One std for all channels keeps l_inf balls l_inf balls (v2 train.py, v1 dataset.py).
    config.data.std = (0.2009, 0.2009, 0.2009)
    config.train.epochs = 800
    config.train.batch_size = 512
    config.certify.eps = 8 / 255
    config.certify.method = "both"
    config.checkpoint.every_epochs = 20
    if "v1" in parts:
        _v1(config)
    else:
        _v2(config)
    if "tiny_imagenet" in parts:
        return _v1_tiny_imagenet(config, parts)

    if "cifar100" in parts:
        use_cifar100_linf(config)
    if "demo" in parts:
        use_demo_data(config, depth=5, width=256)
    if "tiny" in parts:
        use_tiny_run(config)
        config.model.depth = 3
        config.model.width = 32
        config.certify.eps = 2 / 255
    return config


def _v2(config) -> None:
    """zbh2047/L_inf-dist-net-v2: Adam 0.03 (scale 0.006) cosine, mixture loss with eps_train 24/255."""
    config.augment.pad = 3
    config.augment.pad_mode = "edge"
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


def _v1(config) -> None:
    """zbh2047/L_inf-dist-net, command/ell_inf_dist_net_cifar10.sh: --model 'MLP(depth=6,width=5)' --loss
    'hinge(mix=0.75)' --p-start 8 --p-end 1000 --epochs 0,100,0,750,800 --kappa 1.0 --eps-train 0.1568 -b 512
    --lr 0.02 --wd 5e-3 (main.py defaults: betas 0.9, 0.99, eps 1e-10).

    Model: model/mlp.py MLP = 5 NormDist 3072 -> 5120 (mean shift, no bias) and NormDist 5120 -> 10 (bias);
    logits -distance; model/norm_dist.py initialises N(0, 1) with w[i, i mod in] = -10 where in <= out,
    bias 0, running means 0 with momentum 0.1: v2's module (the logit scale is unused by the hinge).
    Data (dataset.py): one std 0.2009, random crop 32 with padding 4 (zeros) and flip.
    """
    config.augment.pad = 4
    config.augment.pad_mode = "constant"
    # adamw.py: Adam plus a decoupled weight decay along the gradient of (1/2)||row||_p^2 at the current p
    # (certjax.optim); main.py create_schedule: lr constant for epochs 0-100, cosine to 0 over 100-800.
    config.optimizer = dict(
        name="adamw_lp",
        lr=0.02,
        scale_lr=0.0,
        b1=0.9,
        b2=0.99,
        eps=1e-10,
        weight_decay=5e-3,
        schedule="hold_cosine",
        hold_fraction=100 / 800,
        warmup_epochs=0,
        clip_norm=0.0,
    )
    # eps_train 0.1568 (40/255) from the first step: epoch2 = 0 makes the eps ramp of create_schedule empty.
    # bound: "lipschitz" is the original's training (Model adds +-eps to the logits when the feature
    # network returns no bounds, model/model.py); "ibp" trains on interval bounds through every layer.
    config.loss = dict(name="hinge", mix=0.75, eps_train=0.1568, bound="lipschitz")
    # p = 8 for epochs 0-100, geometric to 1000 over 100-750, inf for 750-800 (scaled with train.epochs).
    config.p_schedule = dict(
        enabled=True, p_start=8.0, p_end=1000.0, start_fraction=100 / 800, end_fraction=750 / 800
    )


def _v1_tiny_imagenet(config, parts: set[str]):
    """zbh2047/L_inf-dist-net command/ell_inf_dist_net++_tinyimagenet.sh on top of _v1 (module docstring).

    demo: the CPU-size net and epochs of use_demo_data (hidden 64); the data stays Tiny-ImageNet (the
    embedded sample is CIFAR-10 only), so data.real must name the Tiny-ImageNet zip or folder. tiny: the
    tests' tiny run, depth 4 (2 l_inf-dist layers), width 32, hidden 16, certify.eps 2/255."""
    config.model = dict(
        name="sortnet_hybrid", body="dist", depth=7, width=5120, hidden=512, mode="exact", kernel="auto"
    )
    config.data.dataset = "tiny_imagenet"
    config.data.mean = (0.4802, 0.4481, 0.3975)
    config.data.std = (0.2276, 0.2276, 0.2276)  # dataset.py: one std keeps l_inf balls l_inf balls
    config.augment.pad = 4  # RandomCrop(56)'s offsets 0-8 are +-4 around CenterCrop(56) (docstring)
    config.augment.pad_mode = "edge"
    config.train.epochs = 500
    config.optimizer.lr = 0.04
    config.optimizer.hold_fraction = 100 / 500
    # main.py Loss, kappa 1: CE of the worst-case margins only; eps ramp: --epochs 0,_,200 (epoch0, epoch2)
    config.loss = dict(
        name="ibp_cross_entropy", kappa=1.0, eps_train=0.005, bound="ibp",
        eps_schedule=dict(kind="linear", start_fraction=0.0, end_fraction=200 / 500),
    )  # fmt: skip
    config.p_schedule.start_fraction = 100 / 500
    config.p_schedule.end_fraction = 450 / 500
    config.certify.eps = 1 / 255  # dataset.py default_eps["TinyImageNet"]
    config.certify.method = "ibp"  # the tanh head is not 1-Lipschitz: no margin certificate
    if "demo" in parts:
        use_demo_data(config, depth=5, width=256)
        config.data.real = "tfds"  # the common default: its error names the Tiny-ImageNet paths to give
        config.model.hidden = 64
    if "tiny" in parts:
        use_tiny_run(config)
        config.model.depth = 4
        config.model.width = 32
        config.model.hidden = 16
        config.certify.eps = 2 / 255
    return config
