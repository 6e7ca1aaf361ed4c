"""The paper's figures from evaluation records and their radii files, as PNG (matplotlib, Agg backend).

* Fig. 2 `fig2_gain_size_epochs.png`: best certified gain from generated data vs epochs, a line per size, a
  panel per (dataset, family).
* Fig. 3 `fig3_gap_vs_gain.png`: generalisation gap of the model trained without generated data
  (train clean - test clean accuracy) vs the certified gain generated data brings, a point per (family, size,
  epochs).
* Fig. 4 `fig4_real_fraction.png`: clean and certified accuracy vs the real fraction of each batch (1.0 = the
  run without generated data), a line per (family, size, epochs, aux amount).
* Fig. 5 `fig5_radius_cdf_<run>.png`: cumulative distribution of the certified radius of the predicted class,
  for correctly and incorrectly classified test points, without and with generated data.
* Fig. 7 `fig7_confusion_<run>.png`: per class (named on the axis), counts of correct & certified, correct &
  not certified, and wrong test points, without and with generated data.
* App. C `best_vs_last.png`: certified accuracy of the best and the last checkpoint of every run.

Only recorded values are drawn; a figure without data is not written. Radii files of every version are read
in today's names (certjax.radii_file.read_radii: `radius` is the prediction's, `certified` correct and
robust).
"""

from __future__ import annotations

import os
import re
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from certjax.analysis import records as rec  # noqa: E402
from certjax.radii_file import read_radii  # noqa: E402

RUN_KEYS = ("dataset", "family", "size", "epochs")


def slug(*parts) -> str:
    return re.sub(r"[^A-Za-z0-9._]+", "-", "_".join(str(p) for p in parts)).strip("-_")


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # long axis labels stay whole
    plt.close(fig)
    return path


def _rows(records, checkpoint):
    """{(dataset, family, size, epochs): {aux column: summary}} for one checkpoint kind."""
    return rec.mean_cells(rec.select(records, checkpoint=checkpoint), RUN_KEYS, "aux_column")


def gain_vs_size_epochs(records, out_dir, checkpoint="best") -> str | None:
    panels: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for (dataset, family, size, epochs), columns in _rows(records, checkpoint).items():
        gain, _ = rec.best_gain(columns)
        if gain is not None:
            panels[(dataset, family)][size].append((int(epochs), 100 * gain))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, ((dataset, family), sizes) in zip(axes[0], sorted(panels.items())):
        for size, points in sorted(sizes.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=f"size {size}")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(title=f"{family} ({dataset})", xlabel="epochs", ylabel="certified gain (pts)")
        ax.legend(fontsize=8)
    return _save(fig, os.path.join(out_dir, "fig2_gain_size_epochs.png"))


def gap_vs_gain(records, out_dir, checkpoint="best") -> str | None:
    points = []
    for (dataset, family, size, epochs), columns in _rows(records, checkpoint).items():
        gain, _ = rec.best_gain(columns)
        gap = columns.get("none", {}).get("gap")
        if gain is not None and gap is not None:
            points.append((100 * gap, 100 * gain, f"{family} {size} {epochs}ep {dataset}"))
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    ax.scatter([p[0] for p in points], [p[1] for p in points])
    for x, y, label in points:
        ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(
        xlabel="generalisation gap without generated data (train - test clean, pts)",
        ylabel="certified gain with generated data (pts)",
        title="Fig. 3: gap vs gain",
    )
    return _save(fig, os.path.join(out_dir, "fig3_gap_vs_gain.png"))


def real_fraction_sweep(records, out_dir, checkpoint="best") -> str | None:
    chosen = rec.select(records, checkpoint=checkpoint)
    base = rec.mean_cells(rec.select(chosen, aux_column="none"), RUN_KEYS, lambda r: "none")
    lines: dict[tuple, dict[float, dict]] = {}
    with_aux = [r for r in chosen if r.get("aux_amount", 0)]
    by_fraction = rec.mean_cells(with_aux, RUN_KEYS + ("aux_amount",), lambda r: float(r["real_fraction"]))
    for key, fractions in by_fraction.items():
        points = dict(fractions)
        if key[:4] in base:
            points[1.0] = base[key[:4]]["none"]  # real only = fraction 1.0 at the same number of steps
        if len(points) >= 2:
            lines[key] = points
    if not lines:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for key, points in sorted(lines.items(), key=lambda kv: tuple(str(k) for k in kv[0])):
        dataset, family, size, epochs, amount = key
        fractions = sorted(points)
        label = f"{family} {size} {epochs}ep +{rec.aux_bucket(amount)} ({dataset})"
        for ax, metric in zip(axes, ("clean", "certified")):
            ax.plot(fractions, [100 * points[f][metric] for f in fractions], "o-", label=label)
    for ax, metric in zip(axes, ("clean", "certified")):
        ax.set(
            xlabel="real fraction of each batch", ylabel=f"{metric} accuracy (%)", title=f"Fig. 4: {metric}"
        )
    axes[1].legend(fontsize=7)
    return _save(fig, os.path.join(out_dir, "fig4_real_fraction.png"))


def _radii_of(summary) -> dict[str, np.ndarray] | None:
    """The cell's per-example arrays (runs of the cell concatenated), None if no radii file exists."""
    arrays = []
    for record in summary["records"]:
        path = rec.radii_file(record)
        if path:
            arrays.append(read_radii(path))  # files of any version, in today's names
    if not arrays:
        return None
    keys = set.intersection(*(set(a) for a in arrays))
    return {k: np.concatenate([a[k] for a in arrays]) for k in keys}


def _compared_radii(columns) -> dict[str, dict[str, np.ndarray]]:
    """Per-example arrays of 'none' and of the aux column with the best certified accuracy, among the
    columns whose radii files exist."""
    with_radii = {c: d for c, d in ((c, _radii_of(s)) for c, s in columns.items()) if d is not None}
    aux = [c for c in with_radii if c != "none" and columns[c]["certified"] is not None]
    chosen = (["none"] if "none" in with_radii else []) + (
        [max(aux, key=lambda c: columns[c]["certified"])] if aux else []
    )
    return {c: with_radii[c] for c in chosen}


def radius_cdfs(records, out_dir, checkpoint="best") -> list[str]:
    written = []
    for key, columns in sorted(_rows(records, checkpoint).items(), key=lambda kv: str(kv[0])):
        curves = _compared_radii(columns)
        if not curves:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
        for column, data in curves.items():
            # the prediction's radius; the oldest radii files hold only the correct-class one
            radius = data["radius"] if "radius" in data else data["certified_radius"]
            for ax, mask in zip(axes, (data["correct"], ~data["correct"])):
                values = np.sort(radius[mask])
                if len(values):
                    ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post", label=column)
        for ax, name in zip(axes, ("correct", "incorrect")):
            ax.set(xlabel="certified radius of the prediction (pixel units)", title=f"{name} points")
            ax.legend(fontsize=8, title="generated data")
        axes[0].set_ylabel("cumulative fraction")
        fig.suptitle(f"Fig. 5: {' '.join(str(k) for k in key)}")
        written.append(_save(fig, os.path.join(out_dir, f"fig5_radius_cdf_{slug(*key)}.png")))
    return written


def confusion_counts(data: dict[str, np.ndarray], num_classes: int) -> np.ndarray:
    """[num_classes, 3] counts per true class: correct & certified, correct & not certified, wrong."""
    label = data["label"].astype(int)
    correct, certified = data["correct"].astype(bool), data["certified"].astype(bool)
    counts = np.zeros((num_classes, 3), np.int64)
    for column, mask in enumerate((correct & certified, correct & ~certified, ~correct)):
        counts[:, column] = np.bincount(label[mask], minlength=num_classes)[:num_classes]
    return counts


def class_names(dataset: str, labels_seen: int) -> list[str]:
    """Every class of the dataset (certjax.data.sources.DATASETS), by name where the dataset names them,
    else by number; `labels_seen` classes (the largest label + 1) for a dataset certjax does not know."""
    try:
        from certjax.data.sources import DATASETS

        info = DATASETS[dataset]
    except (ImportError, KeyError):
        return [str(label) for label in range(labels_seen)]
    if info.class_names and len(info.class_names) == info.num_classes:
        return list(info.class_names)
    return [str(label) for label in range(info.num_classes)]


def confusion_figure(title: str, panels: dict[str, dict[str, np.ndarray]], names: list[str]):
    """Fig. 7's figure: a panel of stacked bars per aux column, a bar per class named on the x axis, and the
    legend outside the panels (right of the last), where it cannot hide a bar.

    Args:
      title: the figure's title.
      panels: aux column -> per-example arrays (label, correct, certified) of the radii file(s).
      names: the class names, in label order.

    Returns:
      The matplotlib figure (not saved).
    """
    num_classes = len(names)
    width = max(5.0, 0.12 * num_classes + 1.5)
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 3.8), squeeze=False, sharey=True)
    for ax, (column, data) in zip(axes[0], panels.items()):
        counts = confusion_counts(data, num_classes)
        bottom = np.zeros(num_classes)
        for part, name in enumerate(("correct & certified", "correct, not certified", "wrong")):
            ax.bar(np.arange(num_classes), counts[:, part], bottom=bottom, label=name)
            bottom += counts[:, part]
        many = num_classes > 20  # CIFAR-100: small, upright names
        ax.set_xticks(
            np.arange(num_classes),
            names,
            rotation=90 if many else 45,
            ha="center" if many else "right",
            fontsize=5 if many else 8,
        )
        ax.set(xlabel="true class", title=f"generated data: {column}")
    axes[0][0].set_ylabel("test points")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.suptitle(title)
    return fig


def certified_confusion(records, out_dir, checkpoint="best") -> list[str]:
    written = []
    for key, columns in sorted(_rows(records, checkpoint).items(), key=lambda kv: str(kv[0])):
        panels = _compared_radii(columns)
        if not panels:
            continue
        names = class_names(key[0], int(max(d["label"].max() for d in panels.values())) + 1)
        fig = confusion_figure(f"Fig. 7: {' '.join(str(k) for k in key)}", panels, names)
        written.append(_save(fig, os.path.join(out_dir, f"fig7_confusion_{slug(*key)}.png")))
    return written


def best_vs_last(records, out_dir) -> str | None:
    runs: dict[str, dict[str, dict]] = defaultdict(dict)
    for record in records:
        runs[record["workdir"]][record.get("checkpoint", "best")] = record
    pairs = [(w, c) for w, c in sorted(runs.items()) if "best" in c and "last" in c]
    if not pairs:
        return None
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(pairs) + 1.5))
    y = np.arange(len(pairs))
    best = [100 * c["best"]["certified_accuracy"] for _, c in pairs]
    last = [100 * c["last"]["certified_accuracy"] for _, c in pairs]
    ax.barh(y - 0.2, best, 0.4, label="best checkpoint")
    ax.barh(y + 0.2, last, 0.4, label="last checkpoint")
    labels = []
    for _, c in pairs:
        r = c["best"]
        labels.append(
            f"{r['family']} {r['size']} {r['epochs']}ep {r['aux_column']} "
            f"(best ep {c['best'].get('epoch')}, last ep {c['last'].get('epoch')})"
        )
    ax.set_yticks(y, labels, fontsize=7)
    ax.set(xlabel="certified accuracy (%)", title="Best vs last epoch (App. C)")
    ax.legend(fontsize=8)
    return _save(fig, os.path.join(out_dir, "best_vs_last.png"))


def paper_figures(records, out_dir, checkpoint="best") -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    written = [
        gain_vs_size_epochs(records, out_dir, checkpoint),
        gap_vs_gain(records, out_dir, checkpoint),
        real_fraction_sweep(records, out_dir, checkpoint),
        best_vs_last(records, out_dir),
    ]
    written += radius_cdfs(records, out_dir, checkpoint) + certified_confusion(records, out_dir, checkpoint)
    return [path for path in written if path]
