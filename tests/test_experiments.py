"""experiments/: the paper's grids and the CPU-scale replication print their launch commands (dry run)."""

import subprocess
import sys

from tests.conftest import REPO


def _dry(script, *args):
    result = subprocess.run(
        [sys.executable, f"experiments/{script}", *args], cwd=REPO, capture_output=True, text=True, check=True
    )
    return result.stdout.splitlines()


def test_grid_prints_every_table_cell():
    lines = _dry("grid.py", "--grid", "table", "--family", "lot")
    train = [line for line in lines if "--mode=train_and_evaluate" in line]
    assert len(train) == 3 * 3 * 4  # sizes x epochs x aux amounts
    assert any("lot.py:M" in line and "epochs=400" in line and "10m.npz" in line for line in train)
    assert sum("--checkpoint=last" in line for line in lines) == len(train)


def test_cpu_replication_dry_run():
    lines = _dry("cpu_replication.py", "--dry-run")
    train = [line for line in lines if "--mode=train_and_evaluate" in line]
    assert len(train) == 2 * 4  # threat models x real fractions
    assert all("real_subset=5000" in line for line in train)
    assert sum(line.endswith("real_fraction=0.0") for line in train) == 2
    assert sum("data.generated" in line for line in train) == 2 * 3  # fraction 1.0 runs use no pool
    assert sum("certjax.audit" in line for line in lines) == 8 and "certjax.analysis" in lines[-1]


def test_l2_recipes_dry_run_matches_the_step_budget():
    lines = _dry("l2_recipes.py", "--dry-run")
    train = [line for line in lines if "--mode=train_and_evaluate" in line]
    assert len(train) == 4 * 2  # recipes x (with, without the pool)
    # 16 blocks of 40 steps: the seed's epoch for every run without the pool, real-pass epochs (4x) with it
    assert sum("train.epochs=16" in line for line in train) == 4 + 2
    assert sum("train.epochs=4" in line for line in train) == 2
    assert sum("certjax.audit" in line for line in lines) == len(train)


def test_sign_test_against_enumerating_every_split():
    from itertools import product

    from experiments.l2_recipes import sign_test_p

    for wins, losses in [(0, 5), (5, 5), (2, 7), (9, 3), (0, 0)]:
        n = wins + losses
        splits = [sum(s) for s in product((0, 1), repeat=n)]  # each point goes either way, p = 1/2
        extreme = min(wins, losses)
        tail = sum(min(k, n - k) <= extreme for k in splits) / len(splits)
        assert abs(sign_test_p(wins, losses) - min(1.0, tail)) < 1e-12
