"""Training-step throughput of every family at 64 x 64 (Tiny-ImageNet's shape, 200 classes) against 32 x 32
(CIFAR-10) at the same width and depth (issue 25): certjax's own jitted train step (augmentation, forward,
loss, backward, optimiser) on random uint8 images, each family at its demo size (`configs/<family>.py:demo`,
sortnet_hybrid at `tiny`'s), real images only.

  python bench/size64.py                      # every family, batch 64, 5 steps after one that compiles
  python bench/size64.py --families lot bronet --batch 128 --repeats 10

A 64 x 64 image has 4x the pixels: convolutional families pay about 4x per image; the distance families'
first layer reads 4x the inputs and the rest is unchanged.
"""

from __future__ import annotations

import argparse
import importlib.util
import os

from timing import time_train_steps, train_step_timer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# family -> (its config at 32 x 32, the same at 64 x 64)
VARIANTS = {
    "linf_dist": ("demo", "demo"),
    "sortnet": ("demo,nodropout", "demo,nodropout"),
    "sortnet_hybrid": ("demo,tiny", "tiny"),
    "lot": ("demo", "demo,tiny_imagenet"),
    "liresnet": ("demo", "demo,tiny_imagenet"),
    "liresnet_pp": ("demo", "demo,tiny_imagenet"),
    "bronet": ("demo", "demo,tiny_imagenet"),
}


def family_config(family: str, variant: str, side: int):
    spec = importlib.util.spec_from_file_location(family, os.path.join(REPO, "configs", f"{family}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(variant)
    config.data.dataset = "cifar10" if side == 32 else "tiny_imagenet"
    config.data.real_fraction = 1.0
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"batch {args.batch}, {args.repeats} steps after one that compiles, real images only")
    print("| family | 32 x 32 img/s | 64 x 64 img/s | 64 / 32 |\n|---|---|---|---|")
    for family in args.families:
        speed = {}
        for side, variant in zip((32, 64), VARIANTS[family], strict=True):
            step, state, batch, schedule = train_step_timer(family_config(family, variant, side), args.batch)
            speed[side] = args.batch / time_train_steps(step, state, batch, schedule, args.repeats)
        print(f"| {family} | {speed[32]:.1f} | {speed[64]:.1f} | {speed[64] / speed[32]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
