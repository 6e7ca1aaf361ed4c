"""Loading and grouping evaluation records for the paper's tables and figures (shared/DESIGN.md, "Results and
analysis").

Every `results.jsonl` under the given run directories is read (one JSON record per evaluation, written by
`certjax.evaluate`). Each record gets derived fields used to lay out the tables:

* `workdir`: the directory holding the results file (a run; its seeds are separate runs),
* `size`: the variant without the dataset part ("S", "M,cosine", "nodropout"; "-" if empty): the rows of
  Tables 1-3, so runs of different schedulers are never averaged together,
* `model`: `size` without the scheduler part, and `scheduler`: "cosine" or "multistep" when the variant names
  one, else "" (Table 4),
* `aux_column`: the generated-data amount as the paper's column (none / 1M / 5M / 10M; another amount gets its
  own column, e.g. "45k"), with the real fraction appended when it is not the seed's default 0.3 ("45k
  r=0.7").

A re-evaluation of the same checkpoint replaces the earlier record (the last line of a file wins); records of
several runs in one cell are averaged over their seeds, and the number of distinct seeds is kept so tables can
show it: two records of one seed (a rerun, a copied workdir) are one run, not two. Nothing is filled
in: a cell without records is missing.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections import defaultdict

DEFAULT_REAL_FRACTION = 0.3  # the seed paper's share of real images per batch when generated data is used
AUX_BUCKETS = {0: "none", 1_000_000: "1M", 5_000_000: "5M", 10_000_000: "10M"}
DATASET_TOKENS = {"cifar100", "cifar10"}
SCHEDULER_TOKENS = {"cosine", "multistep"}


def human_count(n: int) -> str:
    """45000 -> '45k', 2500000 -> '2.5M'."""
    for unit, name in ((1_000_000, "M"), (1_000, "k")):
        if n >= unit:
            value = n / unit
            return f"{value:.3g}{name}"
    return str(n)


def aux_bucket(aux_amount: int) -> str:
    return AUX_BUCKETS.get(int(aux_amount), human_count(int(aux_amount)))


def aux_column(record: dict) -> str:
    bucket = aux_bucket(record.get("aux_amount", 0))
    fraction = float(record.get("real_fraction", 1.0))
    if bucket != "none" and not math.isclose(fraction, DEFAULT_REAL_FRACTION):
        bucket += f" r={fraction:g}"
    return bucket


def column_order(column: str) -> tuple:
    """none, then by amount (1M < 5M < 10M, others by their count), then by real fraction."""
    amount, _, fraction = column.partition(" r=")
    if amount == "none":
        return (0, 0.0, 0.0)
    scale = {"k": 1e3, "M": 1e6}.get(amount[-1:], 1.0)
    number = float(amount[:-1]) if amount[-1:] in ("k", "M") else float(amount)
    return (1, number * scale, -(float(fraction) if fraction else DEFAULT_REAL_FRACTION))


def variant_parts(record: dict) -> list[str]:
    return [p.strip() for p in str(record.get("variant", "")).split(",") if p.strip()]


def size_label(record: dict) -> str:
    return ",".join(p for p in variant_parts(record) if p not in DATASET_TOKENS) or "-"


def model_label(record: dict) -> str:
    return ",".join(p for p in variant_parts(record) if p not in DATASET_TOKENS | SCHEDULER_TOKENS) or "-"


def scheduler_of(record: dict) -> str:
    named = [p for p in variant_parts(record) if p in SCHEDULER_TOKENS]
    return named[0] if named else ""


def threat_model_of(record: dict) -> str:
    """The record's threat model, or the family's (older records do not store it); "" if unknown."""
    if record.get("threat_model"):
        return record["threat_model"]
    try:
        from certjax.models import get_family

        return get_family(record.get("family", "")).threat_model
    except (ValueError, ImportError):
        return ""


def radii_file(record: dict) -> str | None:
    """The record's radii .npz: its stored path, or the same file name under <workdir>/eval (runs copied to
    another machine keep their layout but not their absolute paths); None if neither exists."""
    path = record.get("radii_path", "")
    if path and os.path.exists(path):
        return path
    if path and record.get("workdir"):
        moved = os.path.join(record["workdir"], "eval", os.path.basename(path))
        if os.path.exists(moved):
            return moved
    return None


def find_results(dirs) -> list[str]:
    found = []
    for top in dirs:
        if os.path.isfile(top):
            found.append(top)
            continue
        for root, subdirs, files in os.walk(top):
            subdirs.sort()
            if "results.jsonl" in files:
                found.append(os.path.join(root, "results.jsonl"))
    return sorted(set(found))


def load_records(dirs) -> list[dict]:
    """All records under `dirs`, one per (run, checkpoint kind, step): the last line of each wins."""
    latest: dict[tuple, dict] = {}
    for path in find_results(dirs):
        workdir = os.path.dirname(os.path.abspath(path))
        with open(path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    print(f"{path}:{number}: skipped, not JSON ({error})", file=sys.stderr)
                    continue
                record["workdir"] = workdir
                record["size"] = size_label(record)
                record["model"] = model_label(record)
                record["scheduler"] = scheduler_of(record)
                record["aux_column"] = aux_column(record)
                record["threat_model"] = threat_model_of(record)
                key = (workdir, record.get("checkpoint", "best"), record.get("step"))
                latest[key] = record
    return list(latest.values())


def select(records, **conditions) -> list[dict]:
    """Records whose fields equal every condition (a callable condition is a predicate on the value)."""
    out = []
    for record in records:
        if all(v(record.get(k)) if callable(v) else record.get(k) == v for k, v in conditions.items()):
            out.append(record)
    return out


def mean_cells(records, row_keys, column_key) -> dict[tuple, dict[str, dict]]:
    """{row: {column: {"clean", "certified", "gap", "n"}}}: means over the seeds in each cell."""
    groups: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        row = tuple(record.get(k) for k in row_keys)
        groups[row][record[column_key] if isinstance(column_key, str) else column_key(record)].append(record)
    cells = {}
    for row, columns in groups.items():
        cells[row] = {column: summarise(members) for column, members in columns.items()}
    return cells


def _mean(values) -> float | None:
    values = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(values) / len(values) if values else None


def seed_groups(members: list[dict]) -> list[list[dict]]:
    """The records of one cell (one config) grouped by seed: a seed is one run however many records it has
    (a rerun, a copied workdir, an evaluation repeated). Records without a seed count as their workdir."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for record in members:
        seed = ("seed", record["seed"]) if "seed" in record else ("workdir", record.get("workdir"))
        groups[seed].append(record)
    return list(groups.values())


def summarise(members: list[dict]) -> dict:
    """A cell's means over its seeds (each seed's records averaged first), and the number of seeds `n`.

    Returns:
      {"clean", "certified", "gap" (train - test clean accuracy), "n", "records": one record per seed}.
    """
    seeds = seed_groups(members)

    def over_seeds(field: str) -> float | None:
        return _mean(_mean(r.get(field) for r in group) for group in seeds)

    clean, train = over_seeds("clean_accuracy"), over_seeds("train_clean_accuracy")
    return {
        "clean": clean,
        "certified": over_seeds("certified_accuracy"),
        "gap": None if clean is None or train is None else train - clean,
        "n": len(seeds),
        "records": [group[-1] for group in seeds],  # the latest of each seed: its radii for the figures
    }


def best_gain(columns: dict[str, dict]) -> tuple[float | None, str | None]:
    """The largest certified-accuracy gain of an aux column over 'none', and that column (None if either
    side is missing)."""
    base = columns.get("none", {}).get("certified")
    if base is None:
        return None, None
    gains = [
        (c["certified"] - base, name)
        for name, c in columns.items()
        if name != "none" and c["certified"] is not None
    ]
    if not gains:
        return None, None
    return max(gains)
