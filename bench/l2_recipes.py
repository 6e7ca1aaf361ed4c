"""Training-step throughput of the l_2 recipes of experiments/l2_recipes.py side by side in one run: the
seed's LiResNet, LiResNet++ (CHORD), BRONet and LOT, at the experiment's matched small sizes (313k-407k
parameters) or, for the recipes with a width and depth (all but LOT), at any other.

Each figure is certjax's own jitted training step (Trainer.train_step: per-source augmentation, forward,
loss, backward, optimiser) on random uint8 images, with each recipe's mix when the pool is on (LiResNet and
LOT 30 % real; LiResNet++ and BRONet 25 % real with RandAugment on the real rows, pad 2 on the generated
ones) and real images only otherwise; both mixes are printed.

  python bench/l2_recipes.py                    # the experiment's sizes, batch 128, both mixes
  python bench/l2_recipes.py --width 64 --depth 6 --batch 256 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import sys

from timing import time_train_steps, train_step_timer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from certjax.data.pipeline import real_count  # noqa: E402
from experiments.l2_recipes import RECIPES, recipe_config  # noqa: E402


def bench_config(recipe: str, pool: bool, width: int, depth: int):
    config = recipe_config(recipe)
    if width and "width" in config.model:  # LOT's size is its init channels: it keeps the experiment's
        config.model.width = width
    if depth and "depth" in config.model:
        config.model.depth = depth
    config.data.real_fraction = RECIPES[recipe][2] if pool else 1.0
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--width",
        type=int,
        default=0,
        help="override the width of the recipes that have one (0: experiment's)",
    )
    parser.add_argument(
        "--depth",
        type=int,
        default=0,
        help="override the depth of the recipes that have one (0: experiment's)",
    )
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    print(f"batch {args.batch}, {args.repeats} steps after one that compiles")
    for pool in (False, True):
        speeds = {}
        for recipe in RECIPES:
            config = bench_config(recipe, pool, args.width, args.depth)
            num_real = real_count(args.batch, config.data.real_fraction)
            step, state, batch, schedule = train_step_timer(config, args.batch, num_real)
            seconds = time_train_steps(step, state, batch, schedule, args.repeats)
            speeds[recipe] = args.batch / seconds
            mix = f"{config.data.real_fraction:.0%} real" if pool else "real only"
            print(f"  {recipe:12s} ({mix:9s}) {seconds * 1e3:8.1f} ms/step {speeds[recipe]:8.1f} img/s")
        print(f"  liresnet_pp / liresnet: {speeds['liresnet_pp'] / speeds['liresnet']:.2f}x")


if __name__ == "__main__":
    main()
