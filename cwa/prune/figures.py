"""Figures of ``cwa prune`` and ``cwa protect``, drawn from their typed rows (matplotlib is imported only here).

Each function draws into the path it is given: :func:`cwa.rundir.interventions.write_intervention` stages it
beside the csv, so a figure is never newer or older than its table. With ``--tasks`` rows (``downstream``,
joined to the table by :attr:`~cwa.rundir.interventions.PruneRow.condition`), a second row of panels shows the
task accuracy on the same axis.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

from cwa.common import format as fmt
from cwa.rundir import DownstreamRow
from cwa.rundir.interventions import BASELINE, ProtectRow, PruneRow


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        fig.savefig(path, dpi=130, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)


def _error(rows: list, attribute: str = "perplexity") -> tuple[list[float], list[list[float]]]:
    """Values and their (below, above) distances to the interval of ``delta_<attribute>``."""
    values = [getattr(r, attribute) for r in rows]
    below = [max(0.0, getattr(r, f"delta_{attribute}") - getattr(r, f"delta_{attribute}_low")) for r in rows]
    above = [max(0.0, getattr(r, f"delta_{attribute}_high") - getattr(r, f"delta_{attribute}")) for r in rows]
    return values, [[0.0 if math.isnan(b) else b for b in below], [0.0 if math.isnan(a) else a for a in above]]


def _tasks(downstream: list[DownstreamRow] | None) -> tuple[list[str], dict[tuple[str, str], DownstreamRow]]:
    """The task names and the rows by (condition, task)."""
    rows = downstream or []
    return list(dict.fromkeys(r.task for r in rows)), {(r.condition, r.task): r for r in rows}


def quality_against_sparsity(
    rows: list[PruneRow], title: str, path: Path, downstream: list[DownstreamRow] | None = None
) -> None:
    """Held-out perplexity (log axis) against sparsity, one line per metric, one panel per structure and group;
    N:M points at their sparsity N/M; the dense model as a dashed line; bars: the bootstrap intervals. With
    task rows, below each panel the task accuracy (dense dashed; bars: the paired intervals over items)."""
    plt = _pyplot()
    dense = rows[0]
    pruned = rows[1:]
    tasks, by = _tasks(downstream)
    panels = list(dict.fromkeys(("unstructured" if ":" not in r.structure else "N:M", r.group) for r in pruned))
    n, height = max(1, len(panels)), 2 if tasks else 1
    fig, axes = plt.subplots(height, n, figsize=(5.2 * n, 4 * height), squeeze=False)
    for column, (ax, (kind, group)) in enumerate(zip(axes[0], panels, strict=False)):
        chosen = [r for r in pruned if ("N:M" if ":" in r.structure else "unstructured") == kind and r.group == group]
        if tasks:
            _accuracy_panel(axes[1][column], chosen, tasks, by, kind)
        for metric in dict.fromkeys(r.metric for r in chosen):
            line = sorted((r for r in chosen if r.metric == metric), key=lambda r: r.sparsity)
            values, error = _error(line)
            style = "o-" if kind == "unstructured" else "s"
            ax.errorbar([r.sparsity for r in line], values, yerr=error, fmt=style, capsize=3, label=metric)
            if kind != "unstructured":
                for r in line:
                    ax.annotate(
                        r.structure, (r.sparsity, r.perplexity), fontsize=7, xytext=(4, 2), textcoords="offset points"
                    )
        ax.axhline(dense.perplexity, color="black", linestyle="--", linewidth=1, label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("sparsity (share of weights removed)")
        ax.set_ylabel("held-out perplexity")
        ax.set_title(f"{kind} · {group}" if kind == "unstructured" else "N:M (per row)", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title}: pruning by each metric", fontsize=10)
    _save(fig, path)


def _accuracy_panel(ax, chosen: list[PruneRow], tasks: list[str], by: dict, kind: str) -> None:
    """Task accuracy against sparsity for the rows of one panel, one line per metric (and task)."""
    for task in tasks:
        for metric in dict.fromkeys(r.metric for r in chosen):
            line = sorted(
                (r for r in chosen if r.metric == metric and (r.condition, task) in by), key=lambda r: r.sparsity
            )
            values, error = _error([by[(r.condition, task)] for r in line], "accuracy")
            label = metric if len(tasks) == 1 else f"{metric} · {task}"
            style = "o-" if kind == "unstructured" else "s"
            ax.errorbar([r.sparsity for r in line], values, yerr=error, fmt=style, capsize=3, label=label)
        if (BASELINE, task) in by:
            ax.axhline(
                by[(BASELINE, task)].accuracy, color="black", linestyle="--", linewidth=1, label=f"dense · {task}"
            )
    ax.set_xlabel("sparsity (share of weights removed)")
    ax.set_ylabel("task accuracy (lm-eval)")
    ax.legend(fontsize=7)


def _label(row: ProtectRow) -> str:
    return row.protected if row.unit == "weight" else f"{row.protected} ({row.unit}s)"


def _against_k(ax, at: list[ProtectRow], value, suffix: str = "") -> None:
    """One line per protected set of ``value(row)`` (None: no point) against K, K = 0 first."""
    nothing = [value(r) for r in at if r.protected == "none" and value(r) is not None]
    for label in dict.fromkeys(_label(r) for r in at if r.protected != "none"):
        points = {}
        for r in at:  # a random set drawn with several seeds: their mean
            if _label(r) == label and value(r) is not None:
                points.setdefault(r.k, []).append(value(r))
        line = [(0, nothing[0])] if nothing else []
        line += sorted((k, sum(v) / len(v)) for k, v in points.items())
        ax.plot([k for k, _ in line], [v for _, v in line], "o-", label=label + suffix)
    fmt.symlog_axis(ax, "x", 1)
    ax.set_xlabel("protected weights K")
    if ax.get_legend_handles_labels()[0]:  # only K = 0 was asked for: no line to label
        ax.legend(fontsize=7)


def _delta_accuracy(by: dict[tuple[str, str], DownstreamRow], task: str, row: ProtectRow) -> float | None:
    found = by.get((row.condition, task))
    return None if found is None else found.delta_accuracy


def protect_against_k(
    rows: list[ProtectRow], title: str, path: Path, downstream: list[DownstreamRow] | None = None
) -> None:
    """Δ perplexity against protected K (symlog axis), one line per protected set, one panel per stress level;
    K = 0 (nothing protected) is every line's first point. Random stresses: the mean over seeds. With task
    rows, below each panel the Δ task accuracy against K the same way."""
    plt = _pyplot()
    rows = [r for r in rows if r.stress != "none" and (r.seeds == 1 or r.over == "seeds")]
    tasks, by = _tasks(downstream)
    levels = list(dict.fromkeys(r.level for r in rows))
    n, height = max(1, len(levels)), 2 if tasks else 1
    fig, axes = plt.subplots(height, n, figsize=(5 * n, 4 * height), squeeze=False)
    for column, level in enumerate(levels):
        at = [r for r in rows if r.level == level]
        ax = axes[0][column]
        _against_k(ax, at, lambda r: r.delta_perplexity)
        ax.set_ylabel("Δ held-out perplexity")
        ax.set_title(f"{rows[0].stress} {rows[0].level_name}={level:g}", fontsize=9)
        for task in tasks:
            found = partial(_delta_accuracy, by, task)
            _against_k(axes[1][column], at, found, "" if len(tasks) == 1 else f" · {task}")
        if tasks:
            axes[1][column].set_ylabel("Δ task accuracy (lm-eval)")
    fig.suptitle(f"{title}: what protecting K weights buys", fontsize=10)
    _save(fig, path)


def protect_against_level(rows: list[ProtectRow], title: str, path: Path) -> None:
    """Δ perplexity against the stress level: nothing protected, and each protected set at its largest K."""
    plt = _pyplot()
    rows = [r for r in rows if r.stress != "none" and (r.seeds == 1 or r.over == "seeds")]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    largest = max((r.k for r in rows), default=0)
    for label in dict.fromkeys(_label(r) for r in rows):
        chosen = [r for r in rows if _label(r) == label and (r.k == largest or r.protected == "none")]
        points: dict[float, list[float]] = {}
        for r in chosen:
            points.setdefault(r.level, []).append(r.delta_perplexity)
        line = sorted((level, sum(v) / len(v)) for level, v in points.items())
        name = label if label == "none" else f"{label}, K={largest}"
        ax.plot([x for x, _ in line], [y for _, y in line], "o-", label=name)
    if rows:
        ax.set_xlabel(f"{rows[0].stress} {rows[0].level_name}")
        if rows[0].level_name in ("p", "sigma"):
            ax.set_xscale("log")
    ax.set_ylabel("Δ held-out perplexity")
    fmt.symlog_axis(ax, "y", 0.1)
    ax.legend(fontsize=7)
    ax.set_title(f"{title}: quality against stress", fontsize=10)
    _save(fig, path)
