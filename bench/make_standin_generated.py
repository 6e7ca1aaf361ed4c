"""Write a stand-in "generated data" .npz from real CIFAR-10 images, for CPU experiments without EDM data.

The foundation issue's experiment: train on a deterministic random subset of N real training images
(`--config.data.real_subset=N`, mode random, the config's seed) and draw the generated share of every batch
from an .npz holding the *other* training images, in the real EDM file format (`image` uint8 [M,32,32,3],
`label` [M], written with np.savez, i.e. stored members that certjax memory-maps).

  python bench/make_standin_generated.py --real='../shared/data/cifar10-jpeg-{split}.zip' \
      --subset=10000 --seed=0 --out=/tmp/standin-40k.npz
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from certjax.data import sources


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--real", required=True, help="real data spec, as --config.data.real")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--subset", type=int, required=True, help="the config's data.real_subset")
    parser.add_argument("--mode", default="random", help="the config's data.real_subset_mode")
    parser.add_argument("--seed", type=int, default=0, help="the config's seed")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    train = sources.make_real_source(args.real, "train", args.dataset)
    kept = sources.subset_indices(len(train), args.subset, args.mode, args.seed)
    others = sources.complement_indices(len(train), kept)
    images, labels = train.read(others)
    tmp = args.out + ".tmp.npz"
    np.savez(tmp, image=images, label=labels.astype(np.int64))
    os.replace(tmp, args.out)
    print(f"wrote {args.out}: {len(others)} images not in the {len(kept)}-image real subset")


if __name__ == "__main__":
    main()
