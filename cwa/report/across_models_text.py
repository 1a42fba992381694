"""The "Across models" section of the report in Markdown, its sentences and its figure (one panel per model and
metric: the share of the top-K at each relative depth, coloured by module type). Decides nothing: the numbers and
verdicts are :mod:`cwa.report.across_models`'s."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cwa.common import format as fmt
from cwa.report.across_models import MIN_SHARE_DIFFERENCE, CrossModel, Effect, Shares
from cwa.report.findings import Finding
from cwa.report.module_types import AFTER, BEFORE, DEPTH_BINS, MODULE_TYPES

FIGURE_KEY = "across_models_depth"
LEAD = 8  # comparisons of two models given as sentences, the supported differences first

Figure = Callable[[str, str], list[str]]

# One colour per module type in every report: attention in blues, the MLP in oranges, the rest apart.
COLOURS = dict(zip(MODULE_TYPES, ("#7f7f7f", "#c6dbef", "#9ecae1", "#6baed6", "#3182bd", "#08519c", "#fdd0a2",
                                  "#fdae6b", "#fd8d3c", "#d94801", "#bcbd22", "#9467bd", "#8c564b", "#d62728",
                                  "#17becf"), strict=True))  # fmt: skip


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return out + [""]


def _column(s: Shares, labels: list[str]) -> str:
    k = f"K={s.k[0]}" if len(set(s.k)) == 1 else f"K={min(s.k)}–{max(s.k)}"
    return f"{s.model} · {s.metric} ({', '.join(labels[i] for i in s.runs)}; {k})"


def _shares_table(cross: CrossModel, labels: list[str], what: str, keys: tuple[str, ...]) -> list[str]:
    columns = cross.shares
    rows = []
    for key in keys:
        values = [getattr(s, what).get(key, 0.0) for s in columns]
        if any(values):
            rows.append([key] + [fmt.percent(v) if v else "·" for v in values])
    first = "relative depth" if what == "depth" else "module type"
    return _table([first] + [_column(s, labels) for s in columns], rows)


def _ratio(value: float | None, low: float | None, high: float | None) -> str:
    return f"×{fmt.interval(value, low, high, fmt.ratio)}"


def _effect_cell(e: Effect) -> str:
    ratio = _ratio(e.ratio, e.ratio_low, e.ratio_high)
    nll = fmt.interval(e.delta_nll, e.delta_nll_low, e.delta_nll_high, fmt.effect)
    return f"{ratio}; ΔNLL {nll}; {fmt.counted(e.n_weights, 'weight')}"


def sentence(f: Finding, labels: list[str]) -> str:
    """One finding of the section as a sentence (the report's ``sentence`` hands these verdicts here)."""
    n = f.numbers
    if f.verdict == "placement_differs":
        (more, less), (x, y), (nx, ny) = n["models"], n["counts"], n["placed"]
        where = {BEFORE: "before the first block (embeddings)", AFTER: "after the last block (final norm, LM head)"}
        place = where.get(n["where"], f"at relative depth {n['where']}")
        if n["kind"] != "relative depth":
            place = f"in {n['where']} weights"
        low, high = (f"{100 * v:.3g}" for v in f.interval)
        return (
            f"{n['metric']}: {more} puts more of its top-K {place} than {less}: {fmt.percent(x / nx)} ({x} of {nx}) "
            f"against {fmt.percent(y / ny)} ({y} of {ny}), {100 * f.value:.3g} percentage points more [{low}, {high}] "
            f"(Newcombe interval, Bonferroni over {n['tests']} comparisons)."
        )
    high, low = n["models"]
    ra, rb = (labels[i] for i in f.runs)
    unit = "" if n["unit"] == "weight" else f", {n['unit']}s"
    what = f"{n['perturbation']} of the top {n['k']} ({n['metric']}{unit})"
    a = f"{high} ({ra}) {_ratio(f.value, *(f.interval or (None, None)))}"
    b = f"{low} ({rb}) {_ratio(n['other_ratio'], *n['other_interval'])}"
    if f.verdict == "larger_effect":
        return (
            f"{what} costs {high} more than {low}, relative to each model's own baseline perplexity: {a} against "
            f"{b} (the 95% intervals do not overlap)."
        )
    return (
        f"{what}: the intervals do not separate {high} from {low} ({a} against {b}), so a difference between the "
        "models is not supported."
    )


def section(cross: CrossModel | None, labels: list[str], fig: Figure) -> list[str]:
    """The section's Markdown ([] for a report over one model)."""
    if cross is None:
        return []
    lines = ["### Across models", ""]
    who = "; ".join(f"{m}: {', '.join(labels[i] for i in cross.members[m]) or 'find-super-weights only'}"
                    for m in cross.models)  # fmt: skip
    lines += [
        f"The runs score {len(cross.models)} different models ({who}). A weight's coordinates (tensor name, index) "
        'mean nothing across models, so top-K overlaps, rank correlations and "the same weight" are computed within '
        "one model only (the agreement and reproducibility sections); the models are compared here by "
        "relative depth (layer index / number of layers, in tenths; embeddings before the first block, the final "
        "norm and LM head after the last), by module type normalised across families, and by effect sizes on the "
        "scale of each model's own baseline.",
        "",
    ]
    if cross.shares:
        lines += ["Share of each model's global top-K (ties at the cutoff left out, as in the placement section) "
                  "by relative depth:", ""]  # fmt: skip
        lines += _shares_table(cross, labels, "depth", DEPTH_BINS)
        lines += ["and by module type (a linear layer's bias under *bias*, a norm's weight and bias under *norm*; "
                  "GPT-2 `c_attn` and GPT-NeoX `query_key_value` are the fused q/k/v):", ""]  # fmt: skip
        lines += _shares_table(cross, labels, "module", MODULE_TYPES)
        placed = [f for f in cross.findings if f.verdict == "placement_differs"]
        lines += [f"- {sentence(f, labels)}" for f in placed[:LEAD]] or [
            f"- No share differs between two models by {fmt.percent(MIN_SHARE_DIFFERENCE)} or more with an interval "
            "that excludes no difference."
        ]
        lines += [""] + ([f"{len(placed) - LEAD} further differences are in the JSON (`findings`).", ""]
                         if len(placed) > LEAD else [])  # fmt: skip
        lines += fig(FIGURE_KEY, "Share of the top-K by relative depth and module type, one panel per model")
    lines += _effects(cross, labels)
    lines += _super_weights(cross)
    return lines


def _effects(cross: CrossModel, labels: list[str]) -> list[str]:
    if not cross.effects:
        return ["No perturbation condition (top-K or control at the same K, unit and perturbation) was run on two "
                "of the models, so no effect sizes are set side by side.", ""]  # fmt: skip
    models = [m for m in cross.models if any(m in row.effects for row in cross.effects)]
    rows = []
    for r in cross.effects:
        seed = "" if r.seed is None else f" (seed {r.seed})"
        cells = [
            _effect_cell(r.effects[m]) + f" ({labels[r.effects[m].run]})" if m in r.effects else "" for m in models
        ]
        rows.append([r.metric, r.perturbation, r.target + seed, r.unit, str(r.k), *cells])
    lines = ["Perturbation effects side by side: the perplexity ratio to each model's own baseline, exp(Δ mean NLL), "
             "and Δ mean NLL, each with its 95% bootstrap interval from `perturb.csv`; the top-K and its controls at "
             "the same K, unit and perturbation (K counts weights, so it is a different fraction of each model):",
             ""]  # fmt: skip
    lines += _table(["metric", "perturbation", "target", "unit", "K", *models], rows)
    effects = [f for f in cross.findings if f.verdict != "placement_differs"]
    found = [sentence(f, labels) for f in effects[:LEAD]]
    if not found:
        return lines + ["- No top-K condition was run on two models with intervals to compare.", ""]
    lines += [f"- {s}" for s in found] + [""]
    rest = len(effects) - len(found)
    return lines + ([f"{rest} further comparisons of two models are in the JSON (`findings`).", ""] if rest else [])


def _super_weights(cross: CrossModel) -> list[str]:
    if not cross.super_weights:
        return []
    rows = [
        [c.model, f"`{c.parameter}`", f"{c.layer} of {c.layers} ({c.relative_depth:.2f})", c.module,
         c.verdict.replace("_", " ") or "—", _ratio(c.ratio, c.ratio_low, c.ratio_high) if c.ratio else "not ablated",
         fmt.p_value(c.p_value), f"{c.super_weights} of {c.candidates}"]
        for c in cross.super_weights
    ]  # fmt: skip
    header = ["model", "strongest candidate", "layer (relative depth)", "module type", "verdict",
              "perplexity ratio [95% CI]", "p", "super weights / candidates"]  # fmt: skip
    return [
        "Each model's strongest super-weight candidate (`cwa find-super-weights`: the largest ablation effect, or "
        "the strongest activation spike when none was ablated):",
        "",
        *_table(header, rows),
    ]


def draw_depth_figure(shares: list[Shares], path: Path) -> None:
    """One panel per (model, metric): stacked bars of the top-K's share at each relative depth, by module type."""
    import numpy as np

    from cwa.report.figures import _pyplot, _save

    plt = _pyplot()
    used = [m for m in MODULE_TYPES if any(s.module.get(m) for s in shares)]
    n = len(shares)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows + 1.0), sharey=True, squeeze=False)
    x = np.arange(len(DEPTH_BINS))
    ticks = ["emb", *(b.split("–")[0] for b in DEPTH_BINS[1:-1]), "head"]
    top = max(max(s.depth.values(), default=0.0) for s in shares) or 1.0
    for ax, s in zip(axes.flat, shares, strict=False):
        bottom = np.zeros(len(DEPTH_BINS))
        for m in used:
            heights = np.array([s.cells.get(d, {}).get(m, 0.0) for d in DEPTH_BINS])
            ax.bar(x, heights, bottom=bottom, color=COLOURS[m], width=0.8, label=m)
            bottom += heights
        ax.set_title(f"{s.model} · {s.metric} (K={min(s.k)})", fontsize=9)
        ax.set_xticks(x, ticks, fontsize=7)
        ax.set_ylim(0, min(1.0, top * 1.1))
        ax.grid(axis="y", alpha=0.3)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("share of the top-K")
    for i, ax in enumerate(axes.flat[:n]):
        if i + cols >= n:  # no panel below it
            ax.set_xlabel("relative depth (layer / layers)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLOURS[m]) for m in used]
    height = fig.get_size_inches()[1]
    legend_rows = -(-len(used) // 8)
    fig.legend(handles, used, loc="lower center", ncol=min(len(used), 8), fontsize=8, frameon=False)
    fig.suptitle("Where each model's top-K sit, by relative depth and module type", fontsize=10)
    fig.tight_layout(rect=(0, (0.1 + 0.25 * legend_rows) / height, 1, 1))
    _save(fig, path)
