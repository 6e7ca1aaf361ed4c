"""LiResNet++ (CHORD, exact EMMA, NAdam + Lookahead, per-source augmentation) against the seed's LiResNet
(GloroNet), BRONet (issue 24) and LOT at CPU scale, each with and without an extra pool of images: does the
newer l_2 recipe certify more?

  python experiments/l2_recipes.py --dry-run     # print every step
  python experiments/l2_recipes.py               # run: about two hours on a 2-core CPU

The held-out-pool setup of experiments/cpu_replication.py: the real training set is 5,000 CIFAR-10 training
images (a fixed random subset, seed 0) from ../shared/data/cifar10-jpeg-{split}.zip, and the other 45,000
training images, written once as a generated-format .npz, play the diffusion-generated pool.

Matched parameter count and step budget: every model is shrunk to about the same number of parameters
(`--print-params` prints them: 356k, 340k, 313k and 407k) and every run takes the same number of optimiser
steps at the same batch size. Each recipe keeps its own mix and epoch rule: LiResNet and LOT 30 % real per
batch with the seed's epoch (N_real images), LiResNet++ and BRONet 25 % real with one pass over the real
set per epoch (4x the steps per epoch, so a quarter of the epochs). Without the pool all train on real
images only. Every run evaluates its last checkpoint on the full test set at 36/255 with guaranteed bounds
and is audited by PGD (certjax.audit); the table (clean, certified, train - test gap, the body's measured
and assumed Lipschitz bounds, img/s from the training log) goes to --results/table.md. Speed figures of
runs that shared the CPU with other work are not comparable: time the models side by side under a lock
instead (bench/liresnet.py, bench/bronet.py).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import shlex
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.cpu_replication import REAL, REAL_SUBSET, REPO, SEED, write_pool  # noqa: E402

BATCH = 128
STEPS_PER_REAL_SET = -(-REAL_SUBSET // BATCH)  # 40: the seed's epoch at batch 128
# (config, overrides at the small size, real fraction with the pool, epochs per real-set-sized block of steps)
RECIPES = {
    "liresnet": (
        "configs/liresnet.py:XS",
        ["--config.model.depth=6", "--config.model.width=32", "--config.model.neck_features=256",
         "--config.model.eval_power_iterations=200"],
        0.3, 1,
    ),
    "liresnet_pp": (
        "configs/liresnet_pp.py",
        ["--config.model.depth=6", "--config.model.width=32", "--config.model.neck_features=256",
         "--config.model.mlp_depth=2", "--config.model.eval_power_iterations=200"],
        0.25, 4,
    ),
    "bronet": (  # issue 24: LiResNet++'s stem, neck and MLP around BRO layers, the LA loss
        "configs/bronet.py",
        ["--config.model.depth=6", "--config.model.width=32", "--config.model.neck_features=256",
         "--config.model.mlp_depth=2"],
        0.25, 4,
    ),
    "lot": (
        "configs/lot.py:S,cosine",
        ["--config.model.init_channels=6"],
        0.3, 1,
    ),
}  # fmt: skip


def run_dir(args, recipe: str, pool: bool) -> str:
    return os.path.join(args.runs, f"{recipe}_{'pool' if pool else 'real'}")


def plan(args) -> list[list[str]]:
    commands = []
    for recipe, (config, overrides, fraction, per_block) in RECIPES.items():
        for pool in (False, True):
            workdir = run_dir(args, recipe, pool)
            # the same number of steps for every run: args.blocks x 40 steps of 128 images
            epochs = args.blocks if not pool else args.blocks // per_block
            if pool and args.blocks % per_block:
                raise ValueError(f"--blocks must be divisible by {per_block}")
            train = [
                "python", "launch.py", f"--config={config}", f"--workdir={workdir}",
                "--mode=train_and_evaluate",
                f"--config.data.real={args.real}", f"--config.data.real_subset={REAL_SUBSET}",
                "--config.data.real_subset_mode=random", f"--config.seed={SEED}",
                f"--config.train.epochs={epochs}", f"--config.train.batch_size={BATCH}",
                f"--config.optimizer.warmup_epochs={max(epochs // 20, 1)}",
                f"--config.train.eval_every_epochs={max(epochs // 4, 1)}",
                f"--config.checkpoint.every_epochs={max(epochs // 4, 1)}",
                "--config.train.eval_subset=1000", "--config.train.log_every_steps=40",
                *overrides,
            ]  # fmt: skip
            if pool:
                train += [f"--config.data.generated={args.pool}", f"--config.data.real_fraction={fraction}"]
            else:
                train += ["--config.data.real_fraction=1.0"]
            commands += [
                train,
                ["python", "launch.py", f"--config={config.split(':')[0]}", f"--workdir={workdir}",
                 "--mode=evaluate", "--checkpoint=last"],
                ["python", "-m", "certjax.audit", f"--workdir={workdir}", "--checkpoint=last",
                 f"--limit={args.audit_limit}"],
            ]  # fmt: skip
    return commands


def recipe_config(recipe: str):
    """The recipe's config file with its small-size overrides of RECIPES applied."""
    import importlib.util

    config_path, overrides, _, _ = RECIPES[recipe]
    path, _, variant = config_path.partition(":")
    spec = importlib.util.spec_from_file_location(recipe, os.path.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(variant) if variant else module.get_config()
    for override in overrides:
        key, value = override.removeprefix("--config.").split("=")
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = type(node[leaf])(value)
    return config


def parameter_counts() -> dict[str, int]:
    """Parameters of each recipe at the small size (the overrides above applied to its config)."""
    import jax
    import jax.numpy as jnp

    from certjax.models import get_family

    counts = {}
    for recipe in RECIPES:
        config = recipe_config(recipe)
        model = get_family(config.model.name).build(config.model, 10)
        variables = jax.eval_shape(
            lambda m=model: m.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
        )
        counts[recipe] = sum(int(leaf.size) for leaf in jax.tree.leaves(variables["params"]))
    return counts


def _log_path(command: list[str]) -> str | None:
    """The training command's console output goes to <workdir>/train.log (its img/s lines)."""
    if "--mode=train_and_evaluate" not in command:
        return None
    workdir = next(c.split("=", 1)[1] for c in command if c.startswith("--workdir="))
    os.makedirs(os.path.join(REPO, workdir), exist_ok=True)
    return os.path.join(REPO, workdir, "train.log")


def images_per_second(workdir: str) -> float:
    """Median img/s over the training log's lines after the first (which holds the compilation)."""
    path = os.path.join(workdir, "train.log")
    if not os.path.exists(path):
        return float("nan")
    with open(path) as f:
        speeds = [float(m) for m in re.findall(r"([0-9.]+) img/s", f.read())]
    speeds = speeds[1:] or speeds
    return float(np.median(speeds)) if speeds else float("nan")


def _last_record(path: str) -> dict:
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return lines[-1] if lines else {}


def _audit_cell(workdir: str) -> str:
    """'broken of certified' from the run's newest audit report, or '' when it was not audited."""
    reports = sorted(glob.glob(os.path.join(workdir, "audit_*.json")), key=os.path.getmtime)
    if not reports:
        return ""
    with open(reports[-1]) as f:
        audit = json.load(f)
    return f"{audit['broken']} of {audit['certified_points']} ({audit['num_points']} points)"


def table(args) -> str:
    """One markdown row per run: its results.jsonl (the last checkpoint), its train log and its audit."""
    rows = [
        "| recipe | pool | steps | clean | certified 36/255 | train clean | train - test gap | K measured |"
        " K assumed | certified with K assumed | audit: broken | img/s (log) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for recipe in RECIPES:
        for pool in (False, True):
            workdir = run_dir(args, recipe, pool)
            results = os.path.join(workdir, "results.jsonl")
            if not os.path.exists(results):
                rows.append(f"| {recipe} | {'yes' if pool else 'no'} | (not run) |" + " |" * 9)
                continue
            record = _last_record(results)
            clean = record.get("clean_accuracy", float("nan"))
            cert = record.get("certified_accuracy", float("nan"))
            cert_assumed = record.get("certified_accuracy_assumed", float("nan"))
            train_clean = record.get("train_clean_accuracy", float("nan"))
            speed = images_per_second(workdir)
            bounds = record.get("lipschitz", {})  # the body's guaranteed and assumed Lipschitz bounds
            measured = bounds.get("lipschitz_body_measured", float("nan"))
            assumed = bounds.get("lipschitz_body_assumed", float("nan"))
            rows.append(
                f"| {recipe} | {'yes' if pool else 'no'} | {record.get('step', 0)} | {100 * clean:.2f} % | "
                f"{100 * cert:.2f} % | "
                f"{100 * train_clean:.2f} % | {100 * (train_clean - clean):.2f} | {measured:.6g} | "
                f"{assumed:.6g} | {100 * cert_assumed:.2f} % | {_audit_cell(workdir)} | {speed:.1f} |"
            )
    return "\n".join(rows) + "\n"


def _certified_points(workdir: str) -> np.ndarray | None:
    """Per test point, whether the run's last evaluation certified it (eval/radii_step<N>.npz)."""
    files = glob.glob(os.path.join(workdir, "eval", "radii_step*.npz"))
    if not files:
        return None
    newest = max(files, key=lambda f: int(re.search(r"radii_step(\d+)", f).group(1)))
    return np.load(newest)["certified"]


def sign_test_p(wins: int, losses: int) -> float:
    """Exact two-sided sign test: the chance of a split at least this uneven if each point went either way."""
    n, k = wins + losses, min(wins, losses)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def paired(args, first: str = "bronet", second: str = "liresnet_pp") -> str:
    """Test points certified by one recipe and not the other, with the sign test's p. It measures the test
    set's sampling only: one training seed per recipe says nothing of the seed-to-seed spread."""
    lines = []
    for pool in (False, True):
        a = _certified_points(run_dir(args, first, pool))
        b = _certified_points(run_dir(args, second, pool))
        if a is None or b is None or a.shape != b.shape:
            continue
        wins, losses = int((a & ~b).sum()), int((~a & b).sum())
        difference, p = 100 * (wins - losses) / a.size, sign_test_p(wins, losses)
        lines.append(
            f"- {'with' if pool else 'without'} the pool: certified by {first} only {wins:,}, "
            f"by {second} only {losses:,} of {a.size:,} test points; "
            f"difference {difference:+.2f} points, sign test p = {p:.3f}"
        )
    return "\n".join(lines) + ("\n" if lines else "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the steps, run nothing")
    parser.add_argument("--print-params", action="store_true", help="print each recipe's parameter count")
    parser.add_argument("--table", action="store_true", help="only write the table of finished runs")
    parser.add_argument("--real", default=REAL, help="real CIFAR-10 data ({split} = train / test)")
    parser.add_argument("--pool", default="runs/cpu_replication/pool45k.npz", help="the held-out pool (.npz)")
    parser.add_argument("--runs", default="runs/l2_recipes")
    parser.add_argument("--results", default="docs/results/l2_recipes")
    parser.add_argument("--blocks", type=int, default=16, help="steps budget in units of 40 steps of 128")
    parser.add_argument("--audit-limit", type=int, default=500, help="test points attacked per audit")
    parser.add_argument("--only", action="append", help="run only these recipe_pool|real run names")
    args = parser.parse_args(argv)
    if args.print_params:
        for recipe, count in parameter_counts().items():
            print(f"{recipe}: {count:,} parameters")
        return 0
    commands = plan(args)
    if args.only:
        commands = [c for c in commands if any(f"/{name}" in " ".join(c) for name in args.only)]
    if args.dry_run:
        for command in commands:
            print(shlex.join(command))
        return 0
    if not args.table:
        os.makedirs(os.path.dirname(os.path.abspath(args.pool)), exist_ok=True)
        print(f"pool: {write_pool(args.pool, args.real):,} images in {args.pool}", flush=True)
        for command in commands:
            print("$ " + shlex.join(command), flush=True)
            log = _log_path(command)
            with open(log, "a") if log else open(os.devnull, "w") as out:
                result = subprocess.run(
                    [sys.executable] + command[1:],
                    cwd=REPO,
                    stdout=out if log else None,
                    stderr=subprocess.STDOUT if log else None,
                )
            if result.returncode and "certjax.audit" in command:
                found = "found a broken certificate" if result.returncode == 1 else "did not finish"
                print(f"the audit {found} (exit {result.returncode})", flush=True)
                return result.returncode
            if result.returncode:
                return result.returncode
    os.makedirs(args.results, exist_ok=True)
    text = table(args) + "\n" + paired(args)
    with open(os.path.join(args.results, "table.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
