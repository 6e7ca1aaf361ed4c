"""Tables and figures of the seed paper from any set of run directories.

  python -m certjax.analysis --runs runs/ other_runs/lot_s --out docs/results/analysis
  python -m certjax.analysis --runs runs/ --out out/ --checkpoint last

Reads every `results.jsonl` under --runs (and the radii .npz files the records name) and writes
`<out>/tables.md`, `<out>/table{1,2,3,4}.tex` and the PNG figures (see tables.py and figures.py).
"""

from __future__ import annotations

import argparse
import os
import sys

from certjax.analysis import figures, records, tables


def write_analysis(run_dirs, out_dir: str, checkpoint: str = "best") -> dict[str, list[str]]:
    """Write tables and figures; returns {"tables": paths, "figures": paths}."""
    loaded = records.load_records(run_dirs)
    os.makedirs(out_dir, exist_ok=True)
    built = tables.paper_tables(loaded, checkpoint)
    written_tables = []
    markdown = [f"# Results ({len(loaded)} records from {len(records.find_results(run_dirs))} files)", ""]
    for table in built:
        markdown.append(tables.to_markdown(table))
        path = os.path.join(out_dir, f"{table.name}.tex")
        with open(path, "w") as f:
            f.write(tables.to_latex(table))
        written_tables.append(path)
    path = os.path.join(out_dir, "tables.md")
    with open(path, "w") as f:
        f.write("\n".join(markdown))
    written_tables.insert(0, path)
    return {"tables": written_tables, "figures": figures.paper_figures(loaded, out_dir, checkpoint)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m certjax.analysis", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, help="run directories (searched recursively)")
    parser.add_argument("--out", required=True, help="output directory for tables and figures")
    parser.add_argument(
        "--checkpoint", default="best", choices=["best", "last"], help="which records to tabulate"
    )
    args = parser.parse_args(argv)
    missing = [d for d in args.runs if not os.path.exists(d)]
    if missing:
        print(f"no such run directory: {', '.join(missing)}", file=sys.stderr)
        return 2
    written = write_analysis(args.runs, args.out, args.checkpoint)
    for kind, paths in written.items():
        for path in paths:
            print(f"{kind[:-1]}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
