"""``cwa report RUN ... --output report.md``: a research report whose every finding is computed from the runs.

Sections follow the seed report (summary, models tested, metrics used, experiment details, key findings,
next steps). Each finding is a sentence gated on a threshold stated in the report, with its numbers (and
their uncertainty) beside it; where the numbers do not clear a threshold, the report gives the numbers and
makes no claim.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import math
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cwa import agreement
from cwa.compare import DEFAULT_KS, DEFAULT_SAMPLE, compare_runs
from cwa.errors import CwaError
from cwa.io import atomic_open, write_json
from cwa.runs import Run, load_runs, unique_names

FRACTIONS = (1e-4, 1e-3, 1e-2)

# Thresholds every claim is gated on (stated in the report's "Method" section).
CONCENTRATED_FACTOR = 10.0  # top 1% hold ≥ 10× their equal share (≥ 10% of the total |score|)
NEAR_UNIFORM_FACTOR = 2.0  # top 1% hold < 2× their equal share: "close to evenly spread"
ENRICHED_FACTOR = 2.0  # a module/layer holds ≥ 2× its share of weights among the top-K ...
ALPHA = 0.01  # ... and the Bonferroni-adjusted binomial p-value is below this
RECUR_MIN = 3  # a row/column "recurs" with ≥ 3 top-K weights and an adjusted p below ALPHA
AGREE_RHO = 0.7  # "agree": Spearman's lower 95% bound ≥ 0.7
DISAGREE_RHO = 0.3  # "rank weights differently": Spearman's upper 95% bound < 0.3
SHARE_JACCARD = 0.5  # top-K sets "largely shared" at Jaccard ≥ 0.5; "largely different" below 0.1
DISJOINT_JACCARD = 0.1
STABLE_JACCARD = 0.7  # "stable" over seeds: lower bound of the mean pairwise Jaccard ≥ 0.7
UNSTABLE_JACCARD = 0.3  # "unstable": upper bound < 0.3
P_SIGNIFICANT = 0.05


def _pct(x: float | None, digits: int = 2) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    if 0 < abs(x) < 10 ** -(digits + 2):  # a tiny share (one layer norm of a model) keeps two significant digits
        return f"{100 * x:.2g}%"
    return f"{100 * x:.{digits}f}%"


def _num(x: float | None, digits: int = 3) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    if x != 0 and (abs(x) < 10**-digits or abs(x) >= 1e5):
        return f"{x:.2e}"
    return f"{x:.{digits}f}"


def _p(p: float | None) -> str:
    if p is None or not math.isfinite(p):
        return "n/a"
    return f"{p:.1e}" if p < 1e-3 else f"{p:.3f}"


# -- concentration ------------------------------------------------------------------------------
def concentration_of(run: Run, curve_points: int = 60) -> dict:
    """Gini, top-fraction shares and a concentration curve of a run's |scores|.

    Without scores.safetensors only the share of the run's topk.csv weights in the total |score| (from the
    summary's per-tensor abs_sum) can be given.
    """
    if run.has_scores:
        values = run.all_abs_scores()
        result = agreement.concentration(values, FRACTIONS)  # sorts values ascending in place
        n = values.size
        qs = np.unique(np.clip(np.logspace(math.log10(1.0 / n), 0, curve_points), 1.0 / n, 1.0))
        counts = np.unique(np.maximum(1, np.ceil(qs * n).astype(np.int64)))
        # Sum the descending tail segment by segment: one pass over the sorted values for the whole curve.
        total = float(values.sum(dtype=np.float64))
        shares, acc, prev = [], 0.0, 0
        for c in counts:
            acc += float(values[n - c : n - prev].sum(dtype=np.float64))
            prev = c
            shares.append(acc / total if total > 0 else math.nan)
        result["curve"] = {"q": (counts / n).tolist(), "share": shares}
        result["source"] = "scores"
        del values
        return result
    total = sum(float(t.get("abs_sum", 0.0)) for t in run.summary["tensors"].values())
    top = sum(abs(float(r["score"])) for r in run.topk_rows)
    n = run.num_scored
    return {
        "n": n,
        "gini": None,
        "top_shares": {},
        "source": "topk.csv",
        "topk_share": {
            "count": len(run.topk_rows),
            "fraction": len(run.topk_rows) / n,
            "share": top / total if total > 0 else None,
        },
    }


def concentration_sentence(name: str, c: dict) -> str | None:
    """The one claim a run's concentration supports, or None when the numbers clear no threshold."""
    top1 = c.get("top_shares", {}).get("0.01")
    if not top1 or top1["share"] is None:
        return None
    factor = top1["share"] / top1["fraction"]
    numbers = (
        f"top 1% hold {_pct(top1['share'])} of the total |score| ({factor:.1f}× an equal share), Gini {_num(c['gini'])}"
    )
    if factor >= CONCENTRATED_FACTOR:
        top01 = c["top_shares"].get("0.0001")
        extra = f"; the top 0.01% alone ({top01['count']:,} weights) hold {_pct(top01['share'])}" if top01 else ""
        return f"**{name}: the scores are concentrated**: {numbers}{extra}."
    if factor < NEAR_UNIFORM_FACTOR:
        return f"**{name}: the scores are close to evenly spread** (no concentration): {numbers}."
    return None


# -- where the critical weights live ------------------------------------------------------------
LOCATION_K = 100


@dataclass
class Placement:
    """Where a run's global top-K sit, with enrichment tests against the share of weights."""

    k: int
    tied: int = 0
    by_module: list[dict] = field(default_factory=list)
    by_layer: list[dict] = field(default_factory=list)
    recurring: list[dict] = field(default_factory=list)
    residual: list[dict] = field(default_factory=list)


def _enrichment(counts: Counter, sizes: dict, k: int, total: int) -> list[dict]:
    tests = len(sizes)
    out = []
    for key, size in sizes.items():
        count = counts.get(key, 0)
        expected_share = size / total
        share = count / k
        p = min(1.0, tests * agreement.binomial_tail(count, k, expected_share)) if count else 1.0
        out.append(
            {
                "where": key,
                "count": count,
                "share": share,
                "weight_share": expected_share,
                "enrichment": share / expected_share if expected_share > 0 else math.inf,
                "p_adjusted": p,
            }
        )
    out.sort(key=lambda d: (-d["count"], str(d["where"])))
    return out


# Modules whose output is added to the residual stream (their output rows index it); every other 2-D
# tensor with a hidden-sized input reads the residual stream through its input columns.
_WRITES_RESIDUAL = ("o_proj", "down_proj", "c_proj", "out_proj", "dense_4h_to_h", "fc2", "w2")


def _axes(module: str) -> tuple[str, str]:
    """Names of a 2-D tensor's (row, column): an embedding's rows are tokens, its columns hidden dimensions."""
    if "embed" in module or module in ("wte", "wpe", "lm_head"):
        return "token row" if module != "wpe" else "position row", "hidden dimension"
    return "output row", "input column"


def hidden_size(run: Run) -> int | None:
    """The residual-stream width: the most common size of the 1-D tensors (layer norms), else None."""
    sizes = Counter(i.numel for i in run.infos.values() if len(i.shape) == 1)
    return sizes.most_common(1)[0][0] if sizes else None


def residual_coordinate(info, index: int, hidden: int) -> int | None:
    """The residual-stream dimension a weight reads from or writes to, where its tensor says so."""
    if len(info.shape) == 1:
        return index if info.numel == hidden else None
    rc = info.row_col(np.int64(index))
    if rc is None:
        return None
    out_dim, in_dim = (info.shape[1], info.shape[0]) if info.transposed else info.shape
    if info.module.split(".")[-1] in _WRITES_RESIDUAL:
        return int(rc[0]) if out_dim == hidden else None
    return int(rc[1]) if in_dim == hidden else None  # embeddings, q/k/v, gate/up, lm_head


def _residual_dimensions(run: Run, top) -> list[dict]:
    """Residual-stream dimensions shared by top-K weights of several module types (binomial test against a
    uniform spread over the hidden dimensions, Bonferroni over them) — the pattern of "super weights" and
    massive-activation channels."""
    hidden = hidden_size(run)
    if not hidden or hidden < 2:
        return []
    where: dict[int, list[tuple[str, int | None]]] = defaultdict(list)
    trials = 0
    for p, index in zip(top.param.tolist(), top.index.tolist(), strict=True):
        info = run.infos[top.names[p]]
        d = residual_coordinate(info, index, hidden)
        if d is not None:
            trials += 1
            where[d].append((info.module, info.layer))
    out = []
    for d, hits in where.items():
        modules = sorted({m for m, _ in hits})
        if len(hits) < RECUR_MIN or len(modules) < 2:
            continue
        p = min(1.0, hidden * agreement.binomial_tail(len(hits), trials, 1.0 / hidden))
        if p < ALPHA:
            out.append(
                {
                    "dimension": d,
                    "count": len(hits),
                    "of": trials,
                    "hidden": hidden,
                    "modules": modules,
                    "layers": sorted({layer for _, layer in hits if layer is not None}),
                    "p_adjusted": p,
                }
            )
    out.sort(key=lambda r: r["p_adjusted"])
    return out


def placement_of(run: Run, k: int = LOCATION_K) -> Placement | None:
    """Global top-k by module type and layer (enrichment vs. each one's share of the scored weights, binomial
    test, Bonferroni-adjusted), and rows/columns that hold more top-k weights than chance allows."""
    k = min(k, run.max_global_k)
    top = run.global_topk(k)
    if top is None or len(top) == 0:
        return None
    tied = run.cutoff_tie(k) or 0
    if tied:
        # Weights tied with the first one left out are in the top-K by the tie-break alone: where they sit
        # says nothing about the data, so only the weights strictly above the cutoff are placed.
        keep = len(top) - tied
        top = type(top)(top.names, top.param[:keep], top.index[:keep], top.score[:keep])
    if len(top) == 0:
        return Placement(k=0, tied=tied)
    infos = run.infos
    total = run.num_scored
    modules, layers = Counter(), Counter()
    module_sizes, layer_sizes = Counter(), Counter()
    for info in infos.values():
        module_sizes[info.module] += info.numel
        layer_sizes["outside" if info.layer is None else info.layer] += info.numel
    coords: dict[tuple[str, str, int], list] = defaultdict(list)
    per_module_top = Counter()
    for p, index in zip(top.param.tolist(), top.index.tolist(), strict=True):
        info = infos[top.names[p]]
        modules[info.module] += 1
        layers["outside" if info.layer is None else info.layer] += 1
        per_module_top[info.module] += 1
        rc = info.row_col(np.int64(index))
        row_axis, col_axis = _axes(info.module)
        if rc is None:
            coords[(info.module, "channel", index)].append(info.layer)
        else:
            coords[(info.module, row_axis, int(rc[0]))].append(info.layer)
            coords[(info.module, col_axis, int(rc[1]))].append(info.layer)
    place = Placement(k=len(top), tied=tied)
    place.by_module = _enrichment(modules, dict(module_sizes), len(top), total)
    place.by_layer = _enrichment(layers, dict(layer_sizes), len(top), total)
    dims = {}
    for info in infos.values():
        if len(info.shape) == 2:
            out_dim, in_dim = (info.shape[1], info.shape[0]) if info.transposed else info.shape
            row_axis, col_axis = _axes(info.module)
            dims[(info.module, row_axis)] = out_dim
            dims[(info.module, col_axis)] = in_dim
        else:
            dims[(info.module, "channel")] = info.numel
    place.residual = _residual_dimensions(run, top)
    for (module, axis, coord), where in coords.items():
        count, trials, dim = len(where), per_module_top[module], dims[(module, axis)]
        if count < RECUR_MIN or dim <= 1:
            continue
        p = min(1.0, dim * agreement.binomial_tail(count, trials, 1.0 / dim))
        if p < ALPHA:
            place.recurring.append(
                {
                    "module": module,
                    "axis": axis,
                    "coordinate": coord,
                    "count": count,
                    "of": trials,
                    "layers": sorted({w for w in where if w is not None}),
                    "p_adjusted": p,
                }
            )
    place.recurring.sort(key=lambda d: d["p_adjusted"])
    return place


def placement_sentences(name: str, place: Placement) -> list[str]:
    out = []
    if place.k == 0:
        return out
    for kind, rows in (("module type", place.by_module), ("layer", place.by_layer)):
        enriched = [r for r in rows if r["enrichment"] >= ENRICHED_FACTOR and r["p_adjusted"] < ALPHA]
        for r in enriched[:3]:
            where = (
                f"layer {r['where']}"
                if kind == "layer" and r["where"] != "outside"
                else ("the tensors outside the blocks" if r["where"] == "outside" else f"`{r['where']}`")
            )
            out.append(
                f"{name}: {where} {'hold' if r['where'] == 'outside' else 'holds'} {r['count']} of the top {place.k} "
                f"({_pct(r['share'], 0)}) against "
                f"{_pct(r['weight_share'], 1)} of the weights ({r['enrichment']:.1f}×, "
                f"adjusted p = {_p(r['p_adjusted'])})."
            )
    for r in place.residual[:3]:
        out.append(
            f"{name}: residual-stream dimension {r['dimension']} recurs across module types "
            f"({', '.join(f'`{m}`' for m in r['modules'])}): {r['count']} of the {r['of']} top-{place.k} weights that "
            f"read or write the residual stream use it (adjusted binomial p = {_p(r['p_adjusted'])} against a uniform "
            f"spread over its {r['hidden']} dimensions)."
        )
    for r in place.recurring[:4]:
        layers = (
            f" across layers {', '.join(map(str, r['layers']))}"
            if len(r["layers"]) > 1
            else (f" in layer {r['layers'][0]}" if r["layers"] else "")
        )
        out.append(
            f"{name}: {r['axis']} {r['coordinate']} of `{r['module']}` recurs: {r['count']} of the {r['of']} "
            f"top-{place.k} weights in that module type{layers} (adjusted binomial p = {_p(r['p_adjusted'])} against "
            "a uniform spread over its rows/columns)."
        )
    return out


# -- agreement between runs ----------------------------------------------------------------------
def layout_groups(runs: list[Run]) -> list[list[int]]:
    """Runs that score the same parameters with the same shapes (the only ones whose scores compare)."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, run in enumerate(runs):
        groups[tuple((n, s) for n, s in run.shapes.items())].append(i)
    return list(groups.values())


def agreement_sentence(a: str, b: str, jac: float | None, k: int, rho: dict | None) -> str | None:
    """A claim about two runs' agreement, gated on rank correlation (with its interval) and top-K Jaccard."""
    parts = []
    if rho and rho.get("low") is not None:
        numbers = (
            f"Spearman ρ = {_num(rho['value'])} [{_num(rho['low'])}, {_num(rho['high'])}] "
            f"over {rho['n']:,} random weights"
        )
        if rho["low"] >= AGREE_RHO:
            parts.append(f"rank the weights alike ({numbers})")
        elif rho["high"] < DISAGREE_RHO:
            parts.append(f"rank the weights differently ({numbers})")
    if jac is not None:
        if jac >= SHARE_JACCARD:
            parts.append(f"largely share their top-{k} (Jaccard {_num(jac)})")
        elif jac < DISJOINT_JACCARD:
            parts.append(f"share almost none of their top-{k} (Jaccard {_num(jac)})")
    if not parts:
        return None
    return f"{a} and {b} " + " and ".join(parts) + "."


# -- perturbation --------------------------------------------------------------------------------
def perturbation_findings(name: str, run: Run) -> tuple[list[dict], list[str]]:
    """Rows for the perturbation table and the claims its intervals and p-values support."""
    rows, claims = [], []
    for row in run.perturb_rows:
        if row.get("target") == "baseline":
            continue
        rows.append(row)
    for r in rows:
        if r.get("target") != "single" or r.get("delta_perplexity_low") is None:
            continue
        if r["delta_perplexity_low"] > 0 and r.get("p_value") is not None and r["p_value"] < P_SIGNIFICANT:
            claims.append(
                f"{name}: {r.get('perturbation')} of the single weight of rank {r.get('rank')} raises held-out "
                f"perplexity (Δppl = {_num(r.get('delta_perplexity'))} [{_num(r['delta_perplexity_low'])}, "
                f"{_num(r.get('delta_perplexity_high'))}], p = {_p(r['p_value'])})."
            )
    topk = [r for r in rows if r.get("target") == "topk"]
    for r in topk:
        low, high, delta = r.get("delta_perplexity_low"), r.get("delta_perplexity_high"), r.get("delta_perplexity")
        cond = f"{r.get('perturbation')} of the top {r.get('k')} ({r.get('n_weights')} weights)"
        if delta is None or low is None or high is None:
            continue
        numbers = f"Δppl = {_num(delta)} [{_num(low)}, {_num(high)}], p = {_p(r.get('p_value'))}"
        if low > 0 and (r.get("p_value") is None or r["p_value"] < P_SIGNIFICANT):
            claims.append(f"{name}: {cond} raises held-out perplexity ({numbers}).")
        elif low <= 0 <= high:
            claims.append(f"{name}: {cond} has no detectable effect on held-out perplexity ({numbers}).")
        for c in rows:
            if c.get("target") in ("topk", "single", "baseline") or c.get("k") != r.get("k"):
                continue
            if c.get("perturbation") != r.get("perturbation") or c.get("p_value") is None:
                continue
            cd = c.get("delta_perplexity")
            if c["p_value"] < P_SIGNIFICANT and cd is not None and delta > cd:
                claims.append(
                    f"{name}: at K={r.get('k')}, {r.get('perturbation')} of the top-K costs more than the "
                    f"{c.get('target')} control (Δppl {_num(delta)} vs {_num(cd)} "
                    f"[{_num(c.get('delta_perplexity_low'))}, "
                    f"{_num(c.get('delta_perplexity_high'))}], paired p = {_p(c['p_value'])})."
                )
    return rows, claims


# -- the report ----------------------------------------------------------------------------------
def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return out


def build_report(
    runs: list[Run],
    output: Path,
    ks: list[int],
    sample: int = 1_000_000,
    seed: int = 0,
    figures: bool = True,
    location_k: int = LOCATION_K,
) -> tuple[str, dict]:
    """The Markdown text and the numbers behind it (written beside the report as JSON).

    Args:
        runs: the runs to report on.
        output: path of the Markdown file (figures go to ``<stem>-figures/`` beside it).
        ks: K of the top-K overlaps between runs.
        sample: size of the uniform random sample of weights for rank correlations between runs.
        seed: seed of that sample and of the bootstraps.
        figures: write and embed figures.
        location_k: size of the global top-K whose placement (modules, layers, rows/columns) is analysed.
    """
    from cwa import report_figures

    names = unique_names(runs)
    fig_dir = output.with_name(output.stem + "-figures")
    data: dict = {"runs": names, "concentration": {}, "placement": {}, "comparisons": [], "perturbation": {}}
    summary_claims: list[str] = []
    lines = ["# Critical Weight Analysis Research Report", ""]
    lines += [
        f"**Generated:** {dt.datetime.now().strftime('%Y-%m-%d %H:%M:%S')} by `cwa report` from {len(runs)} "
        "run directories. Every finding below is computed from those runs; a statement appears only when its "
        "numbers clear the threshold given in [Method and thresholds](#method-and-thresholds).",
        "",
    ]

    models = sorted({r.model for r in runs})
    metrics = sorted({r.metric for r in runs})

    # Concentration, placement and comparisons first: the summary quotes them.
    conc = {name: concentration_of(run) for name, run in zip(names, runs, strict=True)}
    data["concentration"] = {n: {k: v for k, v in c.items() if k != "curve"} for n, c in conc.items()}
    places = {name: placement_of(run, location_k) for name, run in zip(names, runs, strict=True)}
    data["placement"] = {n: (p.__dict__ if p else None) for n, p in places.items()}
    comparisons = []
    for members in layout_groups(runs):
        if len(members) >= 2:
            comparisons.append((members, compare_runs([runs[i] for i in members], ks, sample, seed)))
    data["comparisons"] = [{"runs": [names[i] for i in m], **c} for m, c in comparisons]

    # -- Executive summary
    conc_claims = [s for s in (concentration_sentence(n, c) for n, c in conc.items()) if s]
    lines += ["## Executive Summary", ""]
    lines.append(
        f"This report covers {len(runs)} fit-sensitivity run{'s' if len(runs) != 1 else ''} on {len(models)} "
        f"model{'s' if len(models) != 1 else ''} with {len(metrics)} sensitivity "
        f"metric{'s' if len(metrics) != 1 else ''} "
        f"({', '.join(metrics)})."
    )
    lines.append("")

    # -- Models tested
    lines += ["## Models Tested", ""]
    rows = []
    for model in models:
        of = [r for r in runs if r.model == model]
        rows.append(
            [
                f"`{model}`",
                of[0].summary.get("model_class", "?"),
                f"{of[0].summary.get('num_parameters', 0):,}",
                f"{of[0].num_scored:,}",
                str(len(of)),
            ]
        )
    lines += _table(["model", "class", "parameters", "weights scored", "runs"], rows) + [""]

    # -- Metrics used
    lines += ["## Metrics Used", ""]
    described = {
        "magnitude": "|w| (no data)",
        "grad_x_weight": "|g·w|, g the gradient of the mean calibration NLL (first-order loss change when w is zeroed)",
        "grad_squared": "mean over micro-batches of g² (empirical Fisher diagonal)",
        "hutchinson_diag": "Hutchinson estimate of the Hessian diagonal (signed; ranked by |·|)",
    }
    rows = []
    for metric in metrics:
        of = [r for r in runs if r.metric == metric]
        options = sorted({", ".join(f"{k}={v}" for k, v in r.metric_options.items()) or "—" for r in of})
        rows.append([f"`{metric}`", described.get(metric, "—"), "; ".join(options), str(len(of))])
    lines += _table(["metric", "score of a weight", "options", "runs"], rows) + [""]

    # -- Experiment details
    lines += ["## Experiment Details", ""]
    rows = []
    for i, (name, r) in enumerate(zip(names, runs, strict=True)):
        seconds = sum(float(v) for v in (r.summary.get("timings") or {}).values())
        rows.append(
            [
                f"[{i}] `{name}`",
                f"`{r.model}`",
                r.metric,
                r.mode,
                str(r.k),
                str(r.samples),
                str(r.data.get("seq_len", "?")),
                f"{r.summary.get('tokens', 0):,}",
                str(r.seed),
                _num(r.summary.get("mean_loss"), 4),
                _num(r.summary.get("perplexity"), 2),
                f"{seconds:.0f}",
                _num((r.summary.get("memory") or {}).get("peak_rss_mib"), 0),
                r.summary.get("created", "?"),
            ]
        )
    lines += _table(
        [
            "run",
            "model",
            "metric",
            "mode",
            "k",
            "samples",
            "seq_len",
            "tokens",
            "seed",
            "mean NLL",
            "ppl",
            "time (s)",
            "peak RSS (MiB)",
            "completed",
        ],
        rows,
    ) + [""]
    lines.append(
        "Figures of each run (written by fit-sensitivity): "
        + "; ".join(
            f"[{i}] "
            + ", ".join(
                f"[{p.stem.replace('_', ' ')}]({_rel(p, output.parent)})"
                for p in sorted((r.path / "figures").glob("*.png"))
            )
            for i, r in enumerate(runs)
            if (r.path / "figures").is_dir()
        )
        + "."
    )
    lines.append("")

    # -- Key findings
    lines += ["## Key Findings", ""]
    lines += ["### How concentrated the scores are", ""]
    rows = []
    for i, name in enumerate(names):
        c = conc[name]
        shares = c.get("top_shares", {})
        if c["source"] == "scores":
            rows.append(
                [
                    f"[{i}]",
                    runs[i].metric,
                    f"{c['n']:,}",
                    _num(c["gini"]),
                    *(f"{_pct(shares[f'{q:g}']['share'])} ({shares[f'{q:g}']['count']:,})" for q in FRACTIONS),
                ]
            )
        else:
            t = c["topk_share"]
            rows.append(
                [
                    f"[{i}]",
                    runs[i].metric,
                    f"{c['n']:,}",
                    "n/a (no scores file)",
                    f"top {t['count']} rows of topk.csv: {_pct(t['share'])}",
                    "",
                    "",
                ]
            )
    lines += _table(["run", "metric", "weights", "Gini", "top 0.01%", "top 0.1%", "top 1%"], rows) + [""]
    lines.append(
        "Share of the total |score| held by the top fraction of weights (the number of weights in "
        "parentheses); with equal scores the top 1% would hold exactly 1% and the Gini coefficient would be 0."
    )
    lines.append("")
    lines += [f"- {s}" for s in conc_claims] or ["- No run clears a concentration threshold either way; see the table."]
    lines.append("")
    curves = {n: (c["curve"]["q"], c["curve"]["share"]) for n, c in conc.items() if "curve" in c}
    if figures and curves:
        path = fig_dir / "concentration.png"
        report_figures.concentration_curves(curves, path)
        lines += [f"![Concentration of the scores]({_rel(path, output.parent)})", ""]
    conc_runs = [n for n, c in conc.items() if (concentration_sentence(n, c) or "").find("concentrated") >= 0]
    if conc_runs:
        summary_claims.append(
            f"The scores of {len(conc_runs)} of {len(runs)} runs are concentrated "
            f"(top 1% of weights ≥ {CONCENTRATED_FACTOR:.0f}× an equal share of the score)."
        )

    lines += ["### Where the critical weights live", ""]
    rows = []
    for i, name in enumerate(names):
        p = places[name]
        if p is None:
            continue
        top_modules = ", ".join(f"`{r['where']}` {r['count']}" for r in p.by_module if r["count"])[:160]
        top_layers = ", ".join(f"{r['where']}: {r['count']}" for r in p.by_layer[:5] if r["count"])
        size = str(p.k) + (f" ({p.tied} tied at the cutoff left out)" if p.tied else "")
        rows.append([f"[{i}]", size, top_modules or "—", top_layers or "—"])
    lines += _table(["run", "global top-K", "module types (count)", "most frequent layers (count)"], rows) + [""]
    tied_runs = [f"[{i}]" for i, n in enumerate(names) if places[n] and places[n].tied]
    if tied_runs:
        lines += [
            f"In {', '.join(tied_runs)} the last weights of the top-{location_k} tie with the first weight left "
            "out, so their membership is decided by the tie-break rule, not by the scores; they are left out "
            "of the placement analysis.",
            "",
        ]
    found = [s for name in names if places[name] for s in placement_sentences(name, places[name])]
    lines += [f"- {s}" for s in found] or [
        "- No module type, layer, row or column holds significantly more of the top-K than its share of the weights."
    ]
    lines.append("")
    recurring = [(n, r) for n in names if places[n] for r in places[n].recurring]
    if recurring:
        n, r = recurring[0]
        summary_claims.append(
            f"Critical weights recur on shared rows/columns: e.g. {r['axis']} {r['coordinate']} of "
            f"`{r['module']}` holds {r['count']} of {r['of']} top-K weights of that module type in {n}."
        )
    if figures:
        locs = {}
        for name, run in zip(names, runs, strict=True):
            p = places[name]
            if p is not None:
                from cwa.compare import locations

                locs[name] = locations(run, p.k)
        if locs:
            path = fig_dir / "topk_by_layer.png"
            report_figures.layer_distribution(locs, path)
            lines += [f"![Top-K by layer]({_rel(path, output.parent)})", ""]
            path = fig_dir / "topk_by_module.png"
            report_figures.module_distribution(locs, path)
            lines += [f"![Top-K by module type]({_rel(path, output.parent)})", ""]

    lines += ["### Agreement between runs", ""]
    if not comparisons:
        lines += ["Fewer than two runs score the same parameters, so no two runs can be compared.", ""]
    for members, result in comparisons:
        lines += _comparison_section(runs, names, members, result, output, fig_dir, figures, summary_claims)

    lines += ["### Stability over calibration subsets", ""]
    groups = [g for _, result in comparisons for g in result["stability"]]
    if not groups:
        lines += [
            "No two runs differ only in their calibration seed, so stability over calibration subsets is not "
            "measured here (run one setting with several `--data.seed` values).",
            "",
        ]
    for g in groups:
        lines.append(f"{g['label']}, seeds {g['seeds']} ({len(g['runs'])} runs):")
        lines.append("")
        rows = []
        for k, s in g["by_k"].items():
            interval = f"[{_num(s['low'])}, {_num(s['high'])}]" if s["low"] is not None else s["note"]
            verdict = ""
            if s["low"] is not None and s["low"] >= STABLE_JACCARD:
                verdict = "stable"
            elif s["high"] is not None and s["high"] < UNSTABLE_JACCARD:
                verdict = "unstable"
            rows.append([k, _num(s["mean"]), interval, verdict])
        lines += _table(["K", "mean pairwise Jaccard", "95% run-bootstrap interval", "verdict"], rows) + [""]
        for k, s in g["by_k"].items():
            if s["low"] is not None and s["high"] is not None and s["high"] < UNSTABLE_JACCARD:
                summary_claims.append(
                    f"The top-{k} of {g['label']} is unstable across calibration seeds "
                    f"(mean Jaccard {_num(s['mean'])} [{_num(s['low'])}, {_num(s['high'])}])."
                )
            elif s["low"] is not None and s["low"] >= STABLE_JACCARD:
                summary_claims.append(
                    f"The top-{k} of {g['label']} is stable across calibration seeds "
                    f"(mean Jaccard {_num(s['mean'])} [{_num(s['low'])}, {_num(s['high'])}])."
                )
        if len(g["runs"]) < 3:
            lines += [f"Only {len(g['runs'])} runs: too few for an interval, so no verdict.", ""]

    lines += ["### Perturbation effects", ""]
    any_perturb = False
    for i, (name, run) in enumerate(zip(names, runs, strict=True)):
        rows_p, claims = perturbation_findings(name, run)
        if not rows_p:
            continue
        any_perturb = True
        data["perturbation"][name] = {"rows": rows_p, "claims": claims}
        lines += [f"[{i}] `{name}`:", ""]
        table = []
        for r in rows_p:
            table.append(
                [
                    str(r.get("target")),
                    str(r.get("perturbation")),
                    str(r.get("k")),
                    str(r.get("n_weights")),
                    _num(r.get("perplexity"), 3),
                    f"{_num(r.get('delta_perplexity'))} [{_num(r.get('delta_perplexity_low'))}, "
                    f"{_num(r.get('delta_perplexity_high'))}]",
                    _p(r.get("p_value")),
                    str(r.get("p_value_vs") or ""),
                ]
            )
        lines += _table(["target", "perturbation", "K", "weights", "ppl", "Δppl [95% CI]", "p", "p vs"], table) + [""]
        lines += [f"- {c}" for c in claims] or ["- No perturbation effect clears its interval and p-value threshold."]
        lines.append("")
        for fig in ("perturb_dose_response.png", "perturb_single_weight.png"):
            if (run.path / "figures" / fig).exists():
                lines += [f"![{fig}]({_rel(run.path / 'figures' / fig, output.parent)})", ""]
        summary_claims += [c for c in claims if "raises" in c or "costs more" in c][:2]
    forest = [
        {
            "label": f"[{names.index(n)}] {r.get('target')} · {r.get('perturbation')} · K={r.get('k')} "
            f"· seed {r.get('seed')}",
            "delta": r.get("delta_perplexity"),
            "low": r.get("delta_perplexity_low"),
            "high": r.get("delta_perplexity_high"),
        }
        for n, entry in data["perturbation"].items()
        for r in entry["rows"]
        if r.get("target") not in ("single", "baseline") and r.get("delta_perplexity") is not None
    ]
    if figures and forest:
        path = fig_dir / "perturbation_effects.png"
        report_figures.perturbation_effects(forest[:60], path)
        lines += [f"![Perturbation effects]({_rel(path, output.parent)})", ""]
    if not any_perturb:
        lines += [
            "None of these runs has perturbation results (perturb.csv), so this report makes no claim that "
            "the selected weights matter for the model's output; `cwa perturb` measures that.",
            "",
        ]

    lines += ["### Reproducibility", ""]
    rows = []
    for i, r in enumerate(runs):
        env = r.summary.get("environment") or {}
        v = env.get("versions") or {}
        rows.append(
            [
                f"[{i}]",
                str(env.get("git_commit") or "not recorded"),
                v.get("torch", "?"),
                v.get("transformers", "?"),
                v.get("lightning", "?"),
                f"`{r.summary.get('data_fingerprint')}`",
                f"`{r.data.get('heldout_fingerprint')}`",
                str(r.seed),
                f"{r.summary.get('strategy', '?')} × {r.summary.get('world_size', '?')}",
            ]
        )
    lines += _table(
        [
            "run",
            "git commit",
            "torch",
            "transformers",
            "lightning",
            "calibration fingerprint",
            "held-out fingerprint",
            "data seed",
            "strategy × ranks",
        ],
        rows,
    ) + [""]
    repro = _reproducibility_sentences(runs, names, comparisons)
    lines += [f"- {s}" for s in repro] + ([""] if repro else [])
    if any(not (r.summary.get("environment") or {}).get("git_commit") for r in runs):
        lines += [
            "- Runs without a git commit were made from a copy of cwa outside a git checkout: their code version "
            "is only the package version.",
            "",
        ]

    # -- Summary claims go at the top, under the executive summary.
    idx = lines.index("## Models Tested")
    head = [f"- {c}" for c in summary_claims] or [
        "- No finding clears its threshold; the tables below give the numbers."
    ]
    lines[idx:idx] = ["Main findings (each detailed below):", ""] + head + [""]

    # -- Next steps
    lines += ["## Next Steps", ""]
    steps = []
    if not any_perturb:
        steps.append(
            "Validate the selections causally: `cwa perturb` on these runs (top-K vs. matched random and "
            "magnitude controls, with bootstrap intervals)."
        )
    if not groups or any(len(g["runs"]) < 3 for g in groups):
        steps.append("Measure stability: repeat one setting with at least three `--data.seed` values.")
    if any(r.model == "smollm2-135m" for r in runs):
        steps.append(
            "Run the same grid on the hub models (gpt2, microsoft/DialoGPT-small, meta-llama/Llama-3.1-8B) "
            "where the hub is reachable."
        )
    if len(metrics) < 2:
        steps.append("Compare metrics: score the same model with a second metric.")
    steps.append(
        "Test whether the recurring rows/columns coincide with massive activations (super weights) by "
        "recording activations on the same calibration data."
    )
    lines += [f"{i}. {s}" for i, s in enumerate(steps, 1)] + [""]

    lines += ["## Method and thresholds", ""]
    lines += [
        f"- *Concentrated*: the top 1% of weights hold ≥ {CONCENTRATED_FACTOR:.0f}× their equal share of the total "
        f"|score| (≥ {CONCENTRATED_FACTOR:.0f}%); *close to evenly spread*: < {NEAR_UNIFORM_FACTOR:.0f}× (< "
        f"{NEAR_UNIFORM_FACTOR:.0f}%). Gini coefficient of |score| over every scored weight.",
        f"- *Holds more than its share* (module type, layer): ≥ {ENRICHED_FACTOR:.0f}× its share of the scored weights "
        f"among the global top-{location_k} and a one-sided binomial p-value, Bonferroni-adjusted over the module "
        f"types or layers, below {ALPHA}.",
        f"- *Recurs* (row, column or channel of one module type): ≥ {RECUR_MIN} of that module type's top-K weights "
        f"share it and the binomial p-value against a uniform spread over its rows/columns, Bonferroni-adjusted over "
        f"them, is below {ALPHA}.",
        "- *Residual-stream dimension recurs*: top-K weights of at least two module types read or write the same "
        "hidden dimension (norm channels, embedding columns, input columns of q/k/v/gate/up, output rows of "
        f"o_proj/down_proj), ≥ {RECUR_MIN} of them, Bonferroni-adjusted binomial p below {ALPHA} against a uniform "
        "spread over the hidden dimensions.",
        "- *Rank the weights alike*: the lower end of Spearman's 95% interval (Fisher z, se 1.06/√(n−3)) "
        f"over a uniform "
        f"random sample of weights ≥ {AGREE_RHO}; *differently*: its upper end < {DISAGREE_RHO}. Top-K sets *largely "
        f"shared*: Jaccard ≥ {SHARE_JACCARD}; *almost none shared*: < {DISJOINT_JACCARD}.",
        f"- *Stable* over calibration seeds: the lower end of the run-bootstrap 95% interval of the mean pairwise "
        f"Jaccard ≥ {STABLE_JACCARD}; *unstable*: its upper end < {UNSTABLE_JACCARD}; at least three runs.",
        f"- Perturbation claims: the 95% bootstrap interval of Δ perplexity excludes 0 and p < {P_SIGNIFICANT}; "
        "against a control, the paired p-value written by `cwa perturb`.",
        "- Global top-K: ranked by |score|, ties to the earlier parameter then the lower flat index; a per_layer run's "
        "global top-K comes from its scores file (or from its topk.csv for K ≤ its k).",
        "",
    ]
    return "\n".join(lines), data


def _comparison_section(runs, names, members, result, output, fig_dir, figures, summary_claims) -> list[str]:
    from cwa import report_figures

    lines = []
    ks = result["ks"]
    lines.append(
        f"Runs {', '.join(f'[{i}]' for i in members)} score the same parameters "
        f"({runs[members[0]].model}); global top-K overlap at K = {', '.join(map(str, ks))}:"
    )
    lines.append("")
    sample = result["correlation"]["random_sample"]
    largest = str(ks[-1]) if ks else None
    union = result["correlation"]["topk_union"].get(largest) if largest else None
    rows = []
    claims = []
    for a, b in itertools.combinations(range(len(members)), 2):
        cells = [f"[{members[a]}] vs [{members[b]}]"]
        for k in ks:
            j = result["overlap"][str(k)]["jaccard"][a][b]
            o = result["overlap"][str(k)]["overlap_coefficient"][a][b]
            cells.append(f"{_num(j)} / {_num(o)}")
        rho = sample["spearman"][a][b] if sample else None
        tau = sample["kendall"][a][b] if sample else None
        urho = union["spearman"][a][b] if union else None
        cells.append(f"{_num(rho['value'])} [{_num(rho['low'])}, {_num(rho['high'])}]" if rho else "n/a")
        cells.append(f"{_num(tau['value'])}" if tau else "n/a")
        cells.append(f"{_num(urho['value'])} (n={urho['n']})" if urho else "n/a")
        rows.append(cells)
        ra, rb = runs[members[a]], runs[members[b]]
        jac = result["overlap"][largest]["jaccard"][a][b] if largest else None
        if ra.settings_key() == rb.settings_key() and ra.seed == rb.seed:
            continue  # identical settings: reported under reproducibility
        sentence = agreement_sentence(
            f"[{members[a]}] {ra.label}", f"[{members[b]}] {rb.label}", jac, int(largest or 0), rho
        )
        if sentence:
            claims.append(sentence)
            if ra.metric != rb.metric and sum("and [" in c for c in summary_claims) < 3:
                summary_claims.append(sentence)  # the first few; the section lists every pair
    header = ["pair"] + [f"Jaccard / overlap @{k}" for k in ks]
    header += ["Spearman ρ, random weights [95% CI]", "Kendall τ, random weights", f"Spearman ρ, top-{largest} union"]
    lines += _table(header, rows) + [""]
    lines += [
        "Jaccard = |A∩B|/|A∪B| and overlap = |A∩B|/min(|A|,|B|) of the two global top-K sets. The random-weight "
        "correlations rank |score| over the same uniform sample of weights in every run (the whole distribution); "
        "the top-K-union correlation only ranks weights that at least one run put at the very top, a range so "
        "restricted that it is typically far lower: it measures agreement on the order among the critical weights.",
        "",
    ]
    lines += [f"- {c}" for c in claims] or ["- No pair clears an agreement or disagreement threshold."]
    lines.append("")
    for note in result["notes"]:
        lines += [f"Note: {note}.", ""]
    if figures and ks and len(members) >= 2:
        tag = "-".join(map(str, members))
        path = fig_dir / f"jaccard_k{largest}_{tag}.png"
        labels = [f"{names[i]} ({runs[i].metric})" for i in members]
        report_figures.overlap_heatmap(
            np.array(result["overlap"][largest]["jaccard"], dtype=float),
            labels,
            f"Jaccard overlap of the global top-{largest}",
            path,
        )
        lines += [f"![Jaccard overlap]({_rel(path, output.parent)})", ""]
        if sample:
            m = np.array(
                [
                    [
                        1.0 if i == j else (sample["spearman"][i][j] or {}).get("value") or np.nan
                        for j in range(len(members))
                    ]
                    for i in range(len(members))
                ],
                dtype=float,
            )
            path = fig_dir / f"spearman_{tag}.png"
            report_figures.overlap_heatmap(
                m, labels, f"Spearman ρ of |score| over {sample['size']:,} random weights", path
            )
            lines += [f"![Spearman correlation]({_rel(path, output.parent)})", ""]
    return lines


def _reproducibility_sentences(runs, names, comparisons) -> list[str]:
    out = []
    for members, result in comparisons:
        largest = str(result["ks"][-1]) if result["ks"] else None
        for a, b in itertools.combinations(range(len(members)), 2):
            ra, rb = runs[members[a]], runs[members[b]]
            if ra.settings_key() != rb.settings_key() or ra.seed != rb.seed or not largest:
                continue
            j = result["overlap"][largest]["jaccard"][a][b]
            same_data = ra.summary.get("data_fingerprint") == rb.summary.get("data_fingerprint")
            if j == 1.0 and same_data:
                out.append(
                    f"[{members[a]}] and [{members[b]}] repeat the same settings on the same calibration data "
                    f"(fingerprint `{ra.summary.get('data_fingerprint')}`) and select the identical top-{largest} "
                    "(Jaccard 1.000): the analysis is deterministic."
                )
            elif j is not None:
                out.append(
                    f"[{members[a]}] and [{members[b]}] repeat the same settings "
                    f"({'same' if same_data else 'different'} calibration fingerprint) but their top-{largest} "
                    f"differ (Jaccard {_num(j)})."
                )
    fps = Counter(r.data.get("heldout_fingerprint") for r in runs)
    if len(fps) == 1 and len(runs) > 1:
        out.append(
            f"All {len(runs)} runs hold out the same evaluation text (held-out fingerprint `{next(iter(fps))}`)."
        )
    return out


def default_ks(runs: list[Run]) -> list[int]:
    return list(DEFAULT_KS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cwa report",
        description="A Markdown research report over fit-sensitivity runs (and their perturbation results): "
        "concentration of the scores, where the critical weights live, agreement between metrics, stability over "
        "calibration seeds, perturbation effects and reproducibility, each finding computed from the runs.",
    )
    parser.add_argument("runs", nargs="+", help="run directories (lightning_logs/NAME/version_N)")
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("reports/critical-weights.md"),
        help="Markdown file to write (default %(default)s); figures go to <stem>-figures/ beside it "
        "and the numbers to <stem>.json",
    )
    parser.add_argument(
        "--ks",
        default=",".join(map(str, DEFAULT_KS)),
        help="comma-separated K for the top-K overlap between runs (default %(default)s)",
    )
    parser.add_argument(
        "--sample",
        type=float,
        default=DEFAULT_SAMPLE,
        help="random weights for the rank correlation between runs (default %(default).0f)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random sample and the bootstraps (default 0)")
    parser.add_argument(
        "--location-k",
        type=int,
        default=LOCATION_K,
        help="size of the global top-K whose placement (module types, layers, recurring rows/columns) is analysed "
        "(default %(default)s)",
    )
    parser.add_argument("--no-figures", action="store_true", help="write the Markdown and JSON only")
    return parser


def main(argv: list[str]) -> int:
    from cwa.compare import parse_ks

    args = build_parser().parse_args(argv)
    output = args.output
    if output.suffix.lower() != ".md":
        raise CwaError(f"--output must name a Markdown file ending in .md, not '{output}'.")
    runs = load_runs(args.runs)
    if args.location_k < 1:
        raise CwaError(f"--location-k must be at least 1, got {args.location_k}.")
    text, data = build_report(
        runs, output, parse_ks(args.ks), int(args.sample), args.seed, not args.no_figures, args.location_k
    )
    with atomic_open(output) as handle:
        handle.write(text)
    write_json(output.with_suffix(".json"), data)
    print(f"cwa report: {len(runs)} runs -> {output}")
    return 0
