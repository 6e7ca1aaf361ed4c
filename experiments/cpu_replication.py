"""The seed paper's central experiment at CPU scale: does an extra pool of (here: held-out real) images help
certified training?

  python experiments/cpu_replication.py --dry-run          # print every step
  python experiments/cpu_replication.py                    # run: hours on a 2-core CPU

The real training set is 5,000 CIFAR-10 training images (a fixed random subset, `data.real_subset=5000`,
`real_subset_mode=random`, seed 0) from ../shared/data/cifar10-jpeg-{split}.zip; the other 45,000 training
images (`sources.complement_indices` of that subset) are written once as a generated-format .npz
(`image` uint8 [N, 32, 32, 3], `label` [N]) and play the role of the diffusion-generated pool. A small fast
model of each threat model (l_inf: the l_inf-dist Net demo size; l_2: LOT-S demo size) is trained with real
fractions {1.0, 0.7, 0.3, 0.0} per batch. One epoch is ceil(5000 / batch) steps whatever the mix
(pipeline.MixedBatches), so every run takes the same number of steps. Each run evaluates its best and last
checkpoint on the full test set and is audited (certjax.audit); the analysis (tables, Fig. 3/4/5-style
figures) goes to --results.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL = os.path.join(os.path.dirname(REPO), "shared", "data", "cifar10-jpeg-{split}.zip")
REAL_SUBSET = 5_000
SEED = 0
FRACTIONS = (1.0, 0.7, 0.3, 0.0)
# threat model: (config, epochs, extra flags) — small enough for a CPU, large enough to certify something
MODELS = {
    "linf": ("configs/linf_dist.py:demo", 30, []),
    "l2": ("configs/lot.py:S,demo,cosine", 20, []),
}


def write_pool(path: str, real: str = REAL, subset: int = REAL_SUBSET, seed: int = SEED) -> int:
    """The training images outside the real subset, as an uncompressed generated-format .npz (once)."""
    import numpy as np

    from certjax.data import sources
    from certjax.evaluate import atomic_write_bytes

    if os.path.exists(path):
        return len(sources.GeneratedNpzSource(path, 10))
    train = sources.make_real_source(real, "train", "cifar10")
    # the same indices as make_sources picks for data.real_subset / real_subset_mode=random / seed
    held_out = sources.complement_indices(
        len(train), sources.subset_indices(len(train), subset, "random", seed)
    )
    images, labels = train.read(held_out)
    import io

    buffer = io.BytesIO()
    np.savez(buffer, image=np.asarray(images, np.uint8), label=np.asarray(labels, np.int64))
    atomic_write_bytes(path, buffer.getvalue())
    return len(held_out)


def run_dir(args, threat_model: str, fraction: float) -> str:
    return os.path.join(args.runs, f"{threat_model}_real{fraction:g}")


def plan(args) -> list[list[str]]:
    commands = []
    for threat_model in args.threat_model:
        config, epochs, extra = MODELS[threat_model]
        epochs = args.epochs or epochs
        for fraction in FRACTIONS:
            workdir = run_dir(args, threat_model, fraction)
            train = [
                "python",
                "launch.py",
                f"--config={config}",
                f"--workdir={workdir}",
                "--mode=train_and_evaluate",
                f"--config.data.real={args.real}",
                f"--config.data.real_subset={REAL_SUBSET}",
                "--config.data.real_subset_mode=random",
                f"--config.seed={SEED}",
                f"--config.train.epochs={epochs}",
                # per-epoch evaluation (and best-checkpoint choice) on 1,000 test images; the final
                # evaluations of the best and last checkpoints use all 10,000
                "--config.train.eval_subset=1000",
                *extra,
            ]
            if fraction < 1.0:
                train += [f"--config.data.generated={args.pool}", f"--config.data.real_fraction={fraction}"]
            commands += [
                train,
                ["python", "launch.py", f"--config={config.split(':')[0]}", f"--workdir={workdir}",
                 "--mode=evaluate", "--checkpoint=last"],
                ["python", "-m", "certjax.audit", f"--workdir={workdir}", "--checkpoint=best",
                 f"--limit={args.audit_limit}"],
            ]  # fmt: skip
    commands.append(["python", "-m", "certjax.analysis", "--runs", args.runs, "--out", args.results])
    return commands


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the steps, run nothing")
    parser.add_argument("--real", default=REAL, help="real CIFAR-10 data ({split} = train / test)")
    parser.add_argument("--pool", default="runs/cpu_replication/pool45k.npz", help="the held-out pool (.npz)")
    parser.add_argument("--runs", default="runs/cpu_replication")
    parser.add_argument("--results", default="docs/results/cpu_replication")
    parser.add_argument("--threat-model", choices=sorted(MODELS), action="append", help="default: both")
    parser.add_argument("--epochs", type=int, default=0, help="override every model's epochs (0: defaults)")
    parser.add_argument("--audit-limit", type=int, default=1000, help="test points attacked per audit")
    args = parser.parse_args(argv)
    args.threat_model = args.threat_model or sorted(MODELS)
    commands = plan(args)
    if args.dry_run:
        print(f"# write the pool once: {REAL_SUBSET:,}-image real subset (random, seed {SEED}) held out of "
              f"{args.real} -> {args.pool}")  # fmt: skip
        for command in commands:
            print(shlex.join(command))
        return 0
    os.makedirs(os.path.dirname(os.path.abspath(args.pool)), exist_ok=True)
    print(f"pool: {write_pool(args.pool, args.real):,} images in {args.pool}", flush=True)
    for command in commands:
        print("$ " + shlex.join(command), flush=True)
        result = subprocess.run([sys.executable] + command[1:], cwd=REPO)
        if result.returncode and "certjax.audit" in command:
            found = "found a broken certificate" if result.returncode == 1 else "did not finish"
            print(f"the audit {found} (exit {result.returncode}); continuing", flush=True)
        elif result.returncode:
            return result.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
