"""Figures of ``cwa perturb``: the dose-response curve, the single-weight ablation chart and the set chart
(each alone, joint, leave-one-out), and its TensorBoard scalars.

All read the typed rows of ``perturb.csv``; matplotlib is imported only here. A figure function draws
into the path it is given (``rundir.write_perturbation`` stages it beside the other outputs).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from cwa.ablation.controls import FigureStyle
from cwa.common import format as fmt
from cwa.rundir import ConditionKind, PerturbRow

TOPK_STYLE = FigureStyle("top-K", "tab:red", "o")
FREE_COLORS = ("tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
"""Colours for controls that declare none, in order (the declared styles use red, blue, green and gray)."""


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        fig.savefig(path, dpi=130, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panels(rows: list[PerturbRow]) -> list[tuple[str, str]]:
    """(perturbation, unit) pairs in the order they appear."""
    return list(dict.fromkeys((r.perturbation, r.unit) for r in rows))


def _panel_title(title: str, kind: str, unit: str) -> str:
    return f"{title} · {kind}" + ("" if unit == "weight" else f" · unit {unit}")


def line_styles(rows: list[PerturbRow], styles: Mapping[str, FigureStyle] | None = None) -> dict[str, FigureStyle]:
    """The top-K's style, then one per control in ``rows`` (in order of appearance): the control's declared
    style from ``styles`` (its name -> ``Control.figure_style()``) or its name as the label; a style without a
    colour takes the next free one."""
    out = {ConditionKind.TOPK.value: TOPK_STYLE}
    for target in dict.fromkeys(r.target for r in rows if r.is_control):
        out[target] = (styles or {}).get(target) or FigureStyle(label=target)
    used = {style.color for style in out.values()}
    free = iter([c for c in FREE_COLORS if c not in used] * (1 + len(out) // len(FREE_COLORS)))
    return {t: style if style.color else replace(style, color=next(free)) for t, style in out.items()}


def _finite(*values: float | None) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


def dose_response(
    rows: list[PerturbRow], title: str, path: Path, styles: Mapping[str, FigureStyle] | None = None
) -> None:
    """Δ perplexity against K (log axis) for the top-K and each control, one panel per perturbation and unit.

    A random control's line is its mean over seeds and its band spans the lowest to the highest 95%
    bound of its seeds; the top-K and bottom-K bands are their bootstrap intervals. ``styles`` maps a
    control's name to its :class:`~cwa.ablation.controls.FigureStyle`; a control without one is drawn too.
    """
    plt = _pyplot()
    # activation-restore twins are not points of the curve, nor a pass that broke the model (a bit flip to inf
    # or NaN: no finite Δ, its broken fraction is in the table)
    rows = [r for r in rows if not r.restore and _finite(r.delta_perplexity, r.delta_perplexity_low)]
    lines = line_styles(rows, styles)
    panels = _panels([r for r in rows if r.target in lines])
    if not panels:
        return
    kinds, units = list(dict.fromkeys(p[0] for p in panels)), list(dict.fromkeys(p[1] for p in panels))
    size = (6.4 * len(units), 4.6 * len(kinds))
    fig, axes = plt.subplots(len(kinds), len(units), figsize=size, squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.set_visible(False)
    for kind, unit in panels:  # a row per perturbation, a column per unit
        ax = axes[kinds.index(kind), units.index(unit)]
        ax.set_visible(True)
        lowest = 0.0
        for target, style in lines.items():
            mine = [r for r in rows if r.perturbation == kind and r.unit == unit and r.target == target]
            ks = sorted({r.k for r in mine})
            if not ks:
                continue
            mean, low, high = [], [], []
            for k in ks:
                at = [r for r in mine if r.k == k]
                mean.append(sum(r.delta_perplexity for r in at) / len(at))
                low.append(min(r.delta_perplexity_low for r in at))
                high.append(max(r.delta_perplexity_high for r in at))
            seeds = len({r.seed for r in mine})
            tag = f" ({seeds} seeds)" if seeds > 1 else ""
            ax.plot(ks, mean, marker=style.marker, color=style.color, label=style.label + tag)
            ax.fill_between(ks, low, high, color=style.color, alpha=0.18, linewidth=0)
            lowest = min([lowest, *(v for v in low if v == v)])
        ax.set_xscale("log")
        # Damage spans from noise around zero to orders of magnitude: symlog keeps both readable.
        fmt.symlog_axis(ax, "y", 0.01)
        ax.set_ylim(bottom=min(2 * lowest, -0.01))  # symlog autoscaling mirrors the top; only show real lows
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xlabel("K (top weights" + ("" if unit == "weight" else f"; their {unit}s perturbed") + ")")
        ax.set_ylabel("Δ held-out perplexity (95% CI)")
        ax.set_title(_panel_title(title, kind, unit), fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)


def single_weight(rows: list[PerturbRow], where: Mapping[str, str], title: str, path: Path) -> None:
    """Δ perplexity when each of the top-N weights is perturbed alone, with bootstrap error bars."""
    plt = _pyplot()
    singles = [r for r in rows if r.kind is ConditionKind.SINGLE and not r.restore]
    if not singles:
        return
    panels = _panels(singles)
    height = 0.6 + 0.42 * max(len(singles) // len(panels), 3) + 1.2
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, height * len(panels)), squeeze=False, layout="constrained")
    for ax, (kind, unit) in zip(axes[:, 0], panels, strict=True):
        mine = sorted((r for r in singles if r.perturbation == kind and r.unit == unit), key=lambda r: r.rank)
        ys = list(range(len(mine)))
        deltas = [r.delta_perplexity for r in mine]
        err = [
            [max(0.0, d - r.delta_perplexity_low) for d, r in zip(deltas, mine, strict=True)],
            [max(0.0, r.delta_perplexity_high - d) for d, r in zip(deltas, mine, strict=True)],
        ]
        colors = ["tab:red" if (r.p_value or 1.0) < 0.05 else "tab:gray" for r in mine]
        ax.barh(ys, deltas, xerr=err, color=colors, capsize=2)
        ax.set_yticks(ys, [f"#{r.rank} {where.get(r.condition, '')}" for r in mine], fontsize=7)
        ax.invert_yaxis()
        fmt.symlog_axis(ax, "x", 0.01)
        ax.axvline(0, color="black", linewidth=0.6)
        ax.set_xlabel("Δ held-out perplexity (95% CI); red: p < 0.05 vs baseline")
        what = "one weight" if unit == "weight" else f"the {unit} of one weight"
        ax.set_title(f"{title} · {kind} of {what} at a time", fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
    _save(fig, path)


def _bar(ax, y: float, row: PerturbRow, color: str, height: float) -> None:
    delta = row.delta_perplexity
    err = [[max(0.0, delta - row.delta_perplexity_low)], [max(0.0, row.delta_perplexity_high - delta)]]
    ax.barh([y], [delta], xerr=err, color=color, height=height, capsize=2)


def sets(rows: list[PerturbRow], title: str, path: Path) -> None:
    """For the top-N set (N = the leave-one-out size): the joint set, then for each member its Δ perplexity
    alone and the set's without it, with bootstrap error bars; one panel per perturbation and unit."""
    plt = _pyplot()
    loo = [r for r in rows if r.kind is ConditionKind.LEAVE_ONE_OUT]
    if not loo:
        return
    panels = _panels(loo)
    n = max(r.k for r in loo)
    size = (8, (1.4 + 0.55 * (n + 1)) * len(panels))
    fig, axes = plt.subplots(len(panels), 1, figsize=size, squeeze=False, layout="constrained")
    for ax, (kind, unit) in zip(axes[:, 0], panels, strict=True):
        mine = [r for r in rows if r.perturbation == kind and r.unit == unit]
        joint = next((r for r in mine if r.kind is ConditionKind.TOPK and r.k == n), None)
        alone = {r.rank: r for r in mine if r.kind is ConditionKind.SINGLE}
        without = {r.rank: r for r in mine if r.kind is ConditionKind.LEAVE_ONE_OUT and r.k == n}
        labels = []
        if joint is not None:
            _bar(ax, 0, joint, "tab:red", 0.7)
        labels.append(f"joint top {n}")
        for member in range(1, n + 1):
            if member in alone:
                _bar(ax, member - 0.18, alone[member], "tab:blue", 0.34)
            if member in without:
                _bar(ax, member + 0.18, without[member], "tab:orange", 0.34)
            labels.append(f"#{member}")
        ax.set_yticks(range(n + 1), labels, fontsize=8)
        ax.invert_yaxis()
        fmt.symlog_axis(ax, "x", 0.01)
        ax.axvline(0, color="black", linewidth=0.6)
        handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in ("tab:red", "tab:blue", "tab:orange")]
        ax.legend(handles, [f"all {n} together", "this one alone", f"the other {n - 1} (without this one)"], fontsize=7)
        ax.set_xlabel("Δ held-out perplexity (95% CI)")
        ax.set_title(_panel_title(title, kind, unit) + f" · the top {n} as a set", fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
    _save(fig, path)


def tensorboard_scalars(run_dir: Path, rows: list[PerturbRow]) -> None:
    """Δ perplexity per K for top-K and each control (a random control: the mean over its seeds), and
    per rank for single weights, as TensorBoard scalars in the run directory."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(run_dir))
    try:
        writer.add_scalar("perturb/baseline_perplexity", rows[0].perplexity, 0)
        grouped: dict[tuple[str, str, int | None], list[float]] = {}
        for row in (r for r in rows[1:] if not r.restore):
            tail = "" if row.unit == "weight" else f"_{row.unit}"
            if row.kind is ConditionKind.SINGLE:
                tag = f"perturb_{row.perturbation}/single_delta_perplexity{tail}"
                writer.add_scalar(tag, row.delta_perplexity, row.rank)
            elif row.kind is ConditionKind.LEAVE_ONE_OUT:
                tag = f"perturb_{row.perturbation}/leave_one_out_delta_perplexity{tail}"
                writer.add_scalar(tag, row.delta_perplexity, row.rank)
            elif row.kind is not ConditionKind.PAIR:
                grouped.setdefault((row.perturbation, row.target + tail, row.k), []).append(row.delta_perplexity)
        for (kind, target, k), values in grouped.items():
            writer.add_scalar(f"perturb_{kind}/delta_perplexity/{target}", sum(values) / len(values), k)
    finally:
        writer.close()
