"""Figures of one run's scores: where the mass is and where the top-K weights live."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from cwa.common.io import atomic_path
from cwa.model.params import ParamInfo
from cwa.scoring.topk import TopK

_BINS = 120


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def log10_histogram(scores: Mapping[str, Tensor], bins: int = _BINS) -> tuple[Tensor, Tensor, int]:
    """(bin edges, counts) of log10|score| over all positive scores, and the number of zeros."""
    lo, hi, zeros = float("inf"), float("-inf"), 0
    for s in scores.values():
        a = s.detach().abs().reshape(-1)
        pos = a[a > 0]
        zeros += a.numel() - pos.numel()
        if pos.numel():
            lo, hi = min(lo, float(pos.min())), max(hi, float(pos.max()))
    if lo == float("inf"):
        return torch.linspace(0, 1, bins + 1), torch.zeros(bins), zeros
    lo, hi = torch.log10(torch.tensor(lo)).item(), torch.log10(torch.tensor(hi)).item()
    hi = hi if hi > lo else lo + 1
    counts = torch.zeros(bins, dtype=torch.float64)
    for s in scores.values():
        a = s.detach().abs().reshape(-1).float()
        pos = a[a > 0]
        counts += torch.histc(pos.log10(), bins=bins, min=lo, max=hi).double().cpu()  # the scores may be on a GPU
    return torch.linspace(lo, hi, bins + 1), counts, zeros


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=130, bbox_inches="tight")
    _pyplot().close(fig)


def score_histogram(scores: Mapping[str, Tensor], topk: TopK, title: str, path: Path) -> None:
    plt = _pyplot()
    edges, counts, zeros = log10_histogram(scores)
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    ax.stairs(counts.numpy(), edges.numpy(), fill=True, alpha=0.8, color="tab:blue")
    ax.set_yscale("log")
    ax.set_xlabel("log10 |score|")
    ax.set_ylabel("weights")
    if len(topk):
        cut = float(topk.score.abs().min())
        if cut > 0:
            ax.axvline(torch.log10(torch.tensor(cut)).item(), color="tab:red", ls="--", label=f"top-{len(topk)} cutoff")
            ax.legend()
    total = int(sum(s.numel() for s in scores.values()))
    note = f"{total:,} weights" + (f", {zeros:,} exactly zero" if zeros else "")
    ax.set_title(f"{title}\n{note}", fontsize=10)
    _save(fig, path)


def model_axes(infos: Mapping[str, ParamInfo]) -> tuple[list[str], list[int]]:
    """The modules of the numbered layers in the model's order (as they come in a block, not alphabetical) and
    every layer of the model, whether or not a figure has something to draw in it."""
    modules = list(dict.fromkeys(i.module for i in infos.values() if i.layer is not None))
    layers = sorted({i.layer for i in infos.values() if i.layer is not None})
    return modules, layers


def _grid(infos: Mapping[str, ParamInfo], values: Mapping[str, float]) -> tuple[list[str], list[int], Tensor]:
    modules, layers = model_axes(infos)
    grid = torch.full((len(modules), len(layers)), float("nan"))
    for name, info in infos.items():
        if info.layer is not None and name in values:
            r, c = modules.index(info.module), layers.index(info.layer)
            grid[r, c] = values[name] if torch.isnan(grid[r, c]) else grid[r, c] + values[name]
    return modules, layers, grid


def layer_module_heatmap(scores: Mapping[str, Tensor], infos: Mapping[str, ParamInfo], title: str, path: Path) -> None:
    """log10 of the mean |score| of each (module, layer) tensor (weights and biases of a module summed)."""
    plt = _pyplot()
    sums = {n: float(s.detach().abs().double().sum()) for n, s in scores.items()}
    counts = {n: s.numel() for n, s in scores.items()}
    modules, layers, total = _grid(infos, sums)
    _, _, n = _grid(infos, counts)
    if not modules:
        return
    mean = (total / n).log10()
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(layers) + 3), 0.45 * len(modules) + 1.8))
    image = ax.imshow(mean.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(modules)), modules, fontsize=8)
    step = max(1, len(layers) // 16)
    ax.set_xticks(range(0, len(layers), step), [str(x) for x in layers[::step]], fontsize=8)
    ax.set_xlabel("layer")
    fig.colorbar(image, ax=ax, label="log10 mean |score|")
    ax.set_title(title, fontsize=10)
    _save(fig, path)


def topk_locations(topk: TopK, infos: Mapping[str, ParamInfo], title: str, path: Path) -> None:
    """Stacked bars: how many of the top-K weights sit in each layer, by module type."""
    plt = _pyplot()
    where = Counter()
    for p in topk.param.tolist():
        info = infos[topk.names[p]]
        where[(info.layer, info.module)] += 1
    all_modules, layers = model_axes(infos)  # the model's layers: one without a top-K weight is an empty bar
    outside = sorted({m for layer, m in where if layer is None})
    modules = [m for m in all_modules if any(where[(layer, m)] for layer in layers)]
    columns = [str(x) for x in layers] + outside
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(columns) + 3), 4.2))
    bottom = torch.zeros(len(columns))
    cmap = plt.get_cmap("tab20")
    for j, module in enumerate(modules + (["outside layers"] if outside else [])):
        if module == "outside layers":
            heights = torch.tensor([0.0] * len(layers) + [float(where[(None, m)]) for m in outside])
        else:
            heights = torch.tensor([float(where[(layer, module)]) for layer in layers] + [0.0] * len(outside))
        ax.bar(range(len(columns)), heights.numpy(), bottom=bottom.numpy(), label=module, color=cmap(j % 20))
        bottom += heights
    ax.set_xticks(range(len(columns)), columns, rotation=90 if len(columns) > 20 or outside else 0, fontsize=8)
    ax.set_xlabel("layer (or tensor outside the layers)")
    ax.set_ylabel(f"weights in the top {len(topk)}")
    ax.legend(fontsize=7, ncols=2)
    ax.set_title(title, fontsize=10)
    _save(fig, path)


def activation_spikes(scan, title: str, path: Path) -> None:
    """Largest |activation| per layer at the input and the output of each MLP output projection (log scale),
    with the layers' median channel maxima for reference and the candidates marked.

    Args:
        scan: a :class:`cwa.ablation.super_weights.SuperWeightScan`.
        title: the figure's title.
        path: the PNG to write.
    """
    plt = _pyplot()
    layers = [r.layer for r in scan.layers]
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    for side, color, marker in (("input", "tab:blue", "o"), ("output", "tab:red", "s")):
        values = [getattr(r, side).value for r in scan.layers]
        typical = [
            v / r if r and r != float("inf") else float("nan")
            for v, r in zip(values, (getattr(x, side).ratio for x in scan.layers), strict=True)
        ]
        ax.plot(layers, values, marker=marker, color=color, label=f"largest |{side}|")
        ax.plot(layers, typical, linestyle=":", color=color, alpha=0.7, label=f"median channel max, {side}")
    if scan.experts is not None:  # packed experts: each layer's largest expert output
        peak: dict[int, float] = {}
        for e in scan.experts.experts:
            peak[e.layer] = max(peak.get(e.layer, 0.0), e.output_max)
        ax.plot(list(peak), list(peak.values()), marker="^", color="tab:purple", label="largest |expert output|")
    for c in scan.candidates:
        if c.expert is not None:
            spot = next(e.output_max for e in scan.experts.experts if (e.layer, e.expert) == (c.layer, c.expert))
        else:
            spot = next(r for r in scan.layers if r.layer == c.layer and r.parameter == c.parameter).output.value
        ax.annotate(
            f"#{c.rank} [{'' if c.expert is None else f'{c.expert}, '}{c.row}, {c.col}]",
            (c.layer, spot),
            textcoords="offset points",
            xytext=(4, 6),
            fontsize=8,
        )
    from matplotlib.ticker import MaxNLocator

    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("|activation|")
    ax.set_title(f"{title}\ncandidates: input and output spikes ≥ {scan.threshold:g}× the median channel max")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)
