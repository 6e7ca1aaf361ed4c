"""The paper's tables from evaluation records, as markdown and LaTeX (seed paper Tables 1-4).

Tables 1-3 share one layout: a row per (family, size, epochs), a pair of columns (clean, certified accuracy,
%) per generated-data amount (none / 1M / 5M / 10M, other amounts and non-default real fractions as their own
columns), and the best certified gain over "none". Table 1 holds the CIFAR-10 l_inf families, Table 2 the
CIFAR-10 l_2 families, Table 3 everything on CIFAR-100. Table 4 compares LOT's learning-rate schedulers
(multistep vs cosine, from the variant) per size, epochs and aux amount.

A missing cell is printed empty; a mean of several runs (seeds) shows the count in parentheses.
"""

from __future__ import annotations

import dataclasses

from certjax.analysis import records as rec

ROW_KEYS = ("family", "size", "epochs")


@dataclasses.dataclass
class Table:
    name: str
    title: str
    row_header: list[str]  # one name per row-label column
    groups: list[str]  # column groups, each spanning `group_columns` value columns
    group_columns: list[str]
    extra_columns: list[str]  # single columns after the groups (e.g. the best gain)
    rows: list[tuple[list[str], list[str]]]  # (row labels, cell strings: groups x group_columns + extras)
    note: str = ""

    def cell(self, row_labels, group, column) -> str:
        """The printed cell of a row (matched by its labels) under `group` / `column` (tests use this)."""
        labels = [str(v) for v in row_labels]
        for row, cells in self.rows:
            if row == labels:
                if group in self.extra_columns and column is None:
                    return cells[len(self.groups) * len(self.group_columns) + self.extra_columns.index(group)]
                index = self.groups.index(group) * len(self.group_columns) + self.group_columns.index(column)
                return cells[index]
        raise KeyError(f"no row {labels} in {self.name}")


def percent(value, n: int = 1) -> str:
    if value is None:
        return ""
    text = f"{100 * value:.2f}"
    return f"{text} ({n})" if n > 1 else text


def _clean_and_certified_cells(columns: dict, groups: list) -> list[str]:
    """Clean and certified accuracy (%) for each column group; two empty cells where a group has no record."""
    values = []
    for group in groups:
        summary = columns.get(group)
        values += (
            [percent(summary["clean"], summary["n"]), percent(summary["certified"], summary["n"])]
            if summary
            else ["", ""]
        )
    return values


def signed_points(value) -> str:
    return "" if value is None else f"{100 * value:+.2f}"


def aux_table(records, name: str, title: str, checkpoint: str = "best") -> Table:
    chosen = rec.select(records, checkpoint=checkpoint)
    cells = rec.mean_cells(chosen, ROW_KEYS, "aux_column")
    groups = sorted({c for columns in cells.values() for c in columns}, key=rec.column_order)
    if "none" not in groups:
        groups.insert(0, "none")  # the baseline column is always shown, empty where missing
    rows = []
    for row in sorted(cells, key=lambda r: tuple(str(v) for v in r[:2]) + (int(r[2] or 0),)):
        columns = cells[row]
        values = _clean_and_certified_cells(columns, groups)
        gain, where = rec.best_gain(columns)
        values.append("" if gain is None else f"{signed_points(gain)} ({where})")
        rows.append(([str(v) for v in row], values))
    return Table(
        name=name,
        title=title,
        row_header=["family", "size", "epochs"],
        groups=groups,
        group_columns=["clean", "cert."],
        extra_columns=["best gain (cert.)"],
        rows=rows,
        note=f"{checkpoint} checkpoint; accuracy in %; (k) = mean of k runs; empty = no record.",
    )


def scheduler_table(records, checkpoint: str = "best", family: str = "lot") -> Table:
    """Table 4: multistep vs cosine for one family, rows (dataset, model = size without scheduler, epochs, aux
    column)."""
    chosen = rec.select(records, checkpoint=checkpoint, family=family)
    cells = rec.mean_cells(
        chosen,
        ("dataset", "model", "epochs", "aux_column"),
        lambda r: r["scheduler"] or "multistep",  # LOT's default schedule is multistep
    )
    groups = ["multistep", "cosine"]
    rows = []
    for row in sorted(cells, key=lambda r: (str(r[0]), str(r[1]), int(r[2] or 0), rec.column_order(r[3]))):
        columns = cells[row]
        values = _clean_and_certified_cells(columns, groups)
        both = all(columns.get(g) and columns[g]["certified"] is not None for g in groups)
        difference = columns["cosine"]["certified"] - columns["multistep"]["certified"] if both else None
        values.append(signed_points(difference))
        rows.append(([str(v) for v in row], values))
    return Table(
        name="table4",
        title=f"Table 4: {family} learning-rate scheduler, multistep vs cosine",
        row_header=["dataset", "size", "epochs", "aux"],
        groups=groups,
        group_columns=["clean", "cert."],
        extra_columns=["cosine - multistep (cert.)"],
        rows=rows,
        note=f"{checkpoint} checkpoint; accuracy in %; (k) = mean of k runs; empty = no record.",
    )


def paper_tables(records, checkpoint: str = "best") -> list[Table]:
    cifar10 = rec.select(records, dataset="cifar10")
    return [
        aux_table(
            rec.select(cifar10, threat_model="linf"),
            "table1",
            "Table 1: l_inf families on CIFAR-10 (eps 8/255)",
            checkpoint,
        ),
        aux_table(
            rec.select(cifar10, threat_model="l2"),
            "table2",
            "Table 2: l_2 families on CIFAR-10 (eps 36/255)",
            checkpoint,
        ),
        aux_table(rec.select(records, dataset="cifar100"), "table3", "Table 3: CIFAR-100", checkpoint),
        scheduler_table(records, checkpoint),
    ]


# ------------------------------------------------------------------------------------------------ rendering


def to_markdown(table: Table) -> str:
    header = table.row_header + [f"{g} {c}" for g in table.groups for c in table.group_columns]
    header += table.extra_columns
    lines = [f"### {table.title}", "", "| " + " | ".join(header) + " |"]
    lines.append(
        "|"
        + "|".join(["---"] * len(table.row_header) + ["---:"] * (len(header) - len(table.row_header)))
        + "|"
    )
    for labels, cells in table.rows:
        lines.append("| " + " | ".join(labels + cells) + " |")
    if not table.rows:
        lines.append("| " + " | ".join(["(no records)"] + [""] * (len(header) - 1)) + " |")
    lines += ["", table.note, ""]
    return "\n".join(lines)


def latex_escape(text: str) -> str:
    for char, escaped in (
        ("\\", r"\textbackslash{}"),
        ("_", r"\_"),
        ("%", r"\%"),
        ("&", r"\&"),
        ("#", r"\#"),
    ):
        text = text.replace(char, escaped)
    return text


def to_latex(table: Table) -> str:
    """A plain tabular (no packages needed): grouped header with \\multicolumn, one line per row."""
    k = len(table.group_columns)
    spec = "l" * len(table.row_header) + ("|" + "r" * k) * len(table.groups) + "|r" * len(table.extra_columns)
    top = [""] * len(table.row_header)
    top += [rf"\multicolumn{{{k}}}{{c|}}{{{latex_escape(g)}}}" for g in table.groups]
    top += [""] * len(table.extra_columns)
    second = [latex_escape(h) for h in table.row_header]
    second += [latex_escape(c) for _ in table.groups for c in table.group_columns]
    second += [latex_escape(c) for c in table.extra_columns]
    lines = [
        f"% {latex_escape(table.title)}; {latex_escape(table.note)}",
        r"\begin{tabular}{" + spec + "}",
        r"\hline",
        " & ".join(top) + r" \\",
        " & ".join(second) + r" \\",
        r"\hline",
    ]
    for labels, cells in table.rows:
        lines.append(" & ".join(latex_escape(v) for v in labels + cells) + r" \\")
    lines += [r"\hline", r"\end{tabular}", ""]
    return "\n".join(lines)
