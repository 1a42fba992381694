"""Figures of ``cwa perturb``: the dose-response curve and the single-weight ablation chart, and its
TensorBoard scalars.

All read the typed rows of ``perturb.csv``; matplotlib is imported only here. A figure function draws
into the path it is given (``rundir.write_perturbation`` stages it beside the other outputs).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from cwa.rundir import PerturbRow

_STYLE = {
    "topk": ("top-K", "tab:red", "o"),
    "random_matched": ("random, matched per tensor", "tab:blue", "s"),
    "magnitude_matched": ("random, matched |w| bins", "tab:green", "^"),
    "bottomk": ("bottom-K", "tab:gray", "v"),
}


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


def dose_response(rows: list[PerturbRow], title: str, path: Path) -> None:
    """Δ perplexity against K (log axis) for the top-K and each control, one panel per perturbation.

    A random control's line is its mean over seeds and its band spans the lowest to the highest 95%
    bound of its seeds; the top-K and bottom-K bands are their bootstrap intervals.
    """
    plt = _pyplot()
    rows = [r for r in rows if not r.restore]  # activation-restore twins are not points of the curve
    kinds = list(dict.fromkeys(r.perturbation for r in rows if r.target in _STYLE))
    if not kinds:
        return
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.4 * len(kinds), 4.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        lowest = 0.0
        for target, (label, color, marker) in _STYLE.items():
            mine = [r for r in rows if r.perturbation == kind and r.target == target]
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
            ax.plot(ks, mean, marker=marker, color=color, label=label + tag)
            ax.fill_between(ks, low, high, color=color, alpha=0.18, linewidth=0)
            lowest = min([lowest, *(v for v in low if v == v)])
        ax.set_xscale("log")
        # Damage spans from noise around zero to orders of magnitude: symlog keeps both readable.
        ax.set_yscale("symlog", linthresh=0.01)
        ax.set_ylim(bottom=min(2 * lowest, -0.01))  # symlog autoscaling mirrors the top; only show real lows
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xlabel("K (weights perturbed)")
        ax.set_ylabel("Δ held-out perplexity (95% CI)")
        ax.set_title(f"{title} · {kind}", fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)


def single_weight(rows: list[PerturbRow], where: Mapping[str, str], title: str, path: Path) -> None:
    """Δ perplexity when each of the top-N weights is perturbed alone, with bootstrap error bars."""
    plt = _pyplot()
    singles = [r for r in rows if r.target == "single" and not r.restore]
    if not singles:
        return
    kinds = list(dict.fromkeys(r.perturbation for r in singles))
    fig, axes = plt.subplots(
        len(kinds), 1, figsize=(8, 0.6 + 0.42 * max(len(singles) // len(kinds), 3) + 1.2), squeeze=False
    )
    for ax, kind in zip(axes[:, 0], kinds, strict=True):
        mine = sorted((r for r in singles if r.perturbation == kind), key=lambda r: r.rank)
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
        ax.set_xscale("symlog", linthresh=0.01)
        ax.axvline(0, color="black", linewidth=0.6)
        ax.set_xlabel("Δ held-out perplexity (95% CI); red: p < 0.05 vs baseline")
        ax.set_title(f"{title} · {kind} of one weight at a time", fontsize=10)
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
            if row.target == "single":
                writer.add_scalar(f"perturb_{row.perturbation}/single_delta_perplexity", row.delta_perplexity, row.rank)
            else:
                grouped.setdefault((row.perturbation, row.target, row.k), []).append(row.delta_perplexity)
        for (kind, target, k), values in grouped.items():
            writer.add_scalar(f"perturb_{kind}/delta_perplexity/{target}", sum(values) / len(values), k)
    finally:
        writer.close()
