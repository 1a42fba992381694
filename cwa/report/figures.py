"""Figures of ``cwa compare`` and ``cwa report``: overlap matrix, where the top-K live, concentration."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from cwa.common import format as fmt
from cwa.common.io import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=130, bbox_inches="tight")
    _pyplot().close(fig)


def _short(names: Sequence[str], width: int = 38) -> list[str]:
    return [n if len(n) <= width else "…" + n[-(width - 1) :] for n in names]


def overlap_heatmap(
    matrix: np.ndarray, names: Sequence[str], title: str, path: Path, ticks: Sequence[str] | None = None
) -> None:
    """Pairwise matrix (Jaccard or a correlation) with the value in every cell; NaN cells stay blank.
    ``ticks`` label the columns (and prefix the rows): ``[0]``, ``[1]``, ... unless given."""
    plt = _pyplot()
    n = len(names)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.75 * n + 3.5), max(4.0, 0.6 * n + 2.0)))
    image = ax.imshow(np.ma.masked_invalid(matrix), vmin=0, vmax=1, cmap="viridis")
    labels = _short(names)
    ticks = list(ticks) if ticks is not None else [f"[{i}]" for i in range(n)]
    ax.set_xticks(range(n), ticks, fontsize=8)
    ax.set_yticks(
        range(n), [s if s.startswith(t) else f"{t} {s}" for t, s in zip(ticks, labels, strict=True)], fontsize=8
    )
    for i in range(n):
        for j in range(n):
            if np.isfinite(matrix[i, j]):
                ax.text(
                    j,
                    i,
                    fmt.number(float(matrix[i, j]), 2),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if matrix[i, j] < 0.6 else "black",
                )
    fig.colorbar(image, ax=ax)
    ax.set_title(title, fontsize=10)
    _save(fig, path)


def _layer_order(keys: Sequence[str]) -> list[str]:
    numbers = sorted(int(k) for k in keys if k.lstrip("-").isdigit())
    # Every layer in the range, so a layer no run puts a weight in shows as zero instead of vanishing.
    filled = list(range(numbers[0], numbers[-1] + 1)) if numbers else []
    return [str(k) for k in filled] + sorted(k for k in keys if not k.lstrip("-").isdigit())


def layer_distribution(locations: Mapping[str, Mapping], path: Path) -> None:
    """Share of each run's global top-K in each layer (one line per run; 'outside' = embeddings, final norm)."""
    plt = _pyplot()
    layers = _layer_order(sorted({layer for loc in locations.values() for layer in loc.get("by_layer", {})}))
    fig, ax = plt.subplots(figsize=(max(7.0, 0.25 * len(layers) + 4), 4.2))
    for name, loc in locations.items():
        counts = np.array([loc["by_layer"].get(layer, 0) for layer in layers], dtype=float)
        ax.plot(
            range(len(layers)),
            counts / max(1.0, counts.sum()),
            marker="o",
            ms=3,
            lw=1.2,
            label=f"{_short([name])[0]} (K={loc['k']})",
        )
    step = max(1, len(layers) // 20)
    ax.set_xticks(range(0, len(layers), step), layers[::step], fontsize=8, rotation=90 if "outside" in layers else 0)
    ax.set_xlabel("layer ('outside' = tensors outside the blocks: embeddings, final norm)")
    ax.set_ylabel("share of the run's global top-K")
    ax.legend(fontsize=7)
    ax.set_title("Where the top-K weights live, by layer", fontsize=10)
    _save(fig, path)


def module_distribution(locations: Mapping[str, Mapping], path: Path) -> None:
    """Share of each run's global top-K in each module type (grouped bars)."""
    plt = _pyplot()
    modules = sorted({m for loc in locations.values() for m in loc.get("by_module", {})})
    runs = list(locations)
    width = 0.8 / max(1, len(runs))
    fig, ax = plt.subplots(figsize=(max(7.0, 0.6 * len(modules) + 3), 4.4))
    for i, name in enumerate(runs):
        loc = locations[name]
        counts = np.array([loc["by_module"].get(m, 0) for m in modules], dtype=float)
        ax.bar(
            np.arange(len(modules)) + i * width - 0.4 + width / 2,
            counts / max(1.0, counts.sum()),
            width,
            label=f"{_short([name])[0]} (K={loc['k']})",
        )
    ax.set_xticks(range(len(modules)), modules, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("share of the run's global top-K")
    ax.legend(fontsize=7)
    ax.set_title("Where the top-K weights live, by module type", fontsize=10)
    _save(fig, path)


def concentration_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: Path) -> None:
    """Share of the total |score| held by the top q of weights against q (log x); the diagonal is what
    equal scores would give."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.4))
    lo = 1.0
    for name, (q, share) in curves.items():
        ax.plot(q, share, lw=1.4, label=_short([name])[0])
        lo = min(lo, float(np.min(q)))
    grid = np.logspace(np.log10(lo), 0, 50)
    ax.plot(grid, grid, color="grey", ls="--", lw=1, label="equal scores")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("top fraction q of weights (by |score|)")
    ax.set_ylabel("share of total |score|")
    ax.legend(fontsize=7)
    ax.set_title("Concentration of the sensitivity scores", fontsize=10)
    _save(fig, path)


def perturbation_effects(rows: Sequence[Mapping], title: str, path: Path) -> None:
    """Δ perplexity with its 95% interval for each perturbation condition of each run."""
    plt = _pyplot()
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7.5, max(3.0, 0.32 * len(rows) + 1.5)))
    y = np.arange(len(rows))
    value = np.array([r["delta"] for r in rows], dtype=float)
    low = np.array([r["low"] if r["low"] is not None else r["delta"] for r in rows], dtype=float)
    high = np.array([r["high"] if r["high"] is not None else r["delta"] for r in rows], dtype=float)
    ax.errorbar(value, y, xerr=[value - low, high - value], fmt="o", ms=4, capsize=3)
    ax.axvline(0, color="grey", lw=1)
    ax.set_yticks(y, [r["label"] for r in rows], fontsize=7)
    ax.invert_yaxis()
    fmt.symlog_axis(ax, "x", 0.1)
    ax.set_xlabel("Δ held-out perplexity (perturbed − baseline), 95% bootstrap interval")
    ax.set_title(title, fontsize=10)
    _save(fig, path)
