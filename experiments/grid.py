"""The seed paper's experiment grids as launch.py command lines (sizes and epochs: shared/RECIPES.md).

  python experiments/grid.py                                   # every grid, dry run: print the commands
  python experiments/grid.py --grid table --family lot         # one grid, one family
  python experiments/grid.py --generated-dir /data/edm --runs /scratch/runs --run   # run them, one by one

Grids:
  table      Tables 1/2: family x size x epochs x aux amount (none, 1M, 5M, 10M), CIFAR-10, real fraction 0.3
  cifar100   Table 3: the same on CIFAR-100 (generated files under <generated-dir>/cifar100/)
  scheduler  Table 4: LOT with the cosine scheduler (the table grid holds the multistep runs)
  ratio      Fig. 4: the smallest size of each family at its first epoch count, 1M images, real fractions
             0.1 ... 0.9 (1.0 = the table's run without generated data)

Each run trains and evaluates its best checkpoint, then evaluates the last one (App. C), so that
`python -m certjax.analysis --runs <runs>` fills every table cell and figure. Generated data files are named
1m.npz, 5m.npz and 10m.npz (wzekai99/DM-Improves-AT). The l_inf-dist Net and SortNet have one size (depth 6,
width 5120); SortNet's size column is its training mode (dropout / nodropout).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

# family: (config file, sizes (variant parts), epochs)
FAMILIES = {
    "linf_dist": ("configs/linf_dist.py", [""], [800, 1600]),
    "sortnet": ("configs/sortnet.py", ["dropout", "nodropout"], [3000, 6000]),
    "lot": ("configs/lot.py", ["S", "M", "L"], [200, 400, 600]),
    "liresnet": ("configs/liresnet.py", ["XS", "S", "M", "L"], [800, 1600, 2400]),
}
AUX = {"none": None, "1M": "1m.npz", "5M": "5m.npz", "10M": "10m.npz"}
DEFAULT_REAL_FRACTION = 0.3
RATIO_FRACTIONS = (0.9, 0.7, 0.5, 0.3, 0.1)


def run_name(family, variant, epochs, aux, fraction) -> str:
    parts = [family, variant.replace(",", "-") or "base", f"{epochs}ep", aux]
    if aux != "none" and fraction != DEFAULT_REAL_FRACTION:
        parts.append(f"r{fraction:g}")
    return "_".join(parts)


def commands_for(family, variant, epochs, aux, fraction, args) -> list[list[str]]:
    config, _, _ = FAMILIES[family]
    workdir = os.path.join(args.runs, run_name(family, variant, epochs, aux, fraction))
    train = [
        "python",
        "launch.py",
        f"--config={config}:{variant}" if variant else f"--config={config}",
        f"--workdir={workdir}",
        "--mode=train_and_evaluate",
        f"--config.train.epochs={epochs}",
    ]
    if AUX[aux]:
        subdir = "cifar100" if "cifar100" in variant.split(",") else ""
        train += [
            f"--config.data.generated={os.path.join(args.generated_dir, subdir, AUX[aux])}",
            f"--config.data.real_fraction={fraction}",
        ]
    train += args.extra
    last = ["python", "launch.py", f"--config={config}", f"--workdir={workdir}", "--mode=evaluate",
            "--checkpoint=last"]  # fmt: skip
    return [train, last]


def with_dataset(variant: str, dataset_part: str) -> str:
    return ",".join(p for p in (variant, dataset_part) if p)


def grid(name: str, families, args) -> list[list[str]]:
    out = []
    for family in families:
        _, sizes, epochs_list = FAMILIES[family]
        if name in ("table", "cifar100"):
            dataset = "cifar100" if name == "cifar100" else ""
            for size in sizes:
                for epochs in epochs_list:
                    for aux in AUX:
                        out += commands_for(
                            family, with_dataset(size, dataset), epochs, aux, DEFAULT_REAL_FRACTION, args
                        )
        elif name == "scheduler" and family == "lot":
            for size in sizes:
                for epochs in epochs_list:
                    for aux in AUX:
                        out += commands_for(
                            family, with_dataset(size, "cosine"), epochs, aux, DEFAULT_REAL_FRACTION, args
                        )
        elif name == "ratio":
            for fraction in RATIO_FRACTIONS:
                out += commands_for(family, sizes[0], epochs_list[0], "1M", fraction, args)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", choices=["table", "cifar100", "scheduler", "ratio", "all"], default="all")
    parser.add_argument("--family", choices=sorted(FAMILIES), action="append", help="default: all families")
    parser.add_argument("--generated-dir", default="data/edm", help="folder with 1m.npz, 5m.npz, 10m.npz")
    parser.add_argument("--runs", default="runs/paper", help="parent folder of the run directories")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", default=True, help="print the commands (default)")
    mode.add_argument("--run", action="store_true", help="run the commands one after the other")
    parser.add_argument("extra", nargs="*", help="more launch.py flags for every run (after --)")
    args = parser.parse_args(argv)
    families = args.family or list(FAMILIES)
    grids = ["table", "cifar100", "scheduler", "ratio"] if args.grid == "all" else [args.grid]
    commands = [c for name in grids for c in grid(name, families, args)]
    for command in commands:
        print(shlex.join(command))
        if args.run:
            subprocess.run(
                [sys.executable] + command[1:],
                check=True,
                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            )
    print(f"# {len(commands)} commands ({len(commands) // 2} runs)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
