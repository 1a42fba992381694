"""The report's wording: number formats, Markdown tables and one sentence per finding.

A sentence only words a :class:`~cwa.report.findings.Finding`; it never decides a verdict. Runs are named by their
label (R1, R2, ...). To add a finding, give its verdict a branch in :func:`sentence`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from cwa.common import format as fmt
from cwa.report import findings as th
from cwa.report.findings import Finding
from cwa.rundir import ConditionKind

if TYPE_CHECKING:
    from cwa.report.analysis import Analysis


# -- formatting (the rules are cwa.common.format's) -------------------------------------------------
def _ci(value: float | None, interval: tuple | None, rule=fmt.number) -> str:
    low, high = interval or (None, None)
    return fmt.interval(value, low, high, rule)


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return out + [""]


def _bullets(sentences: list[str], none: str) -> list[str]:
    return [f"- {s}" for s in sentences] + [""] if sentences else [f"- {none}", ""]


# -- one sentence per finding --------------------------------------------------------------------
def _where(r: dict, kind: str) -> str:
    if r["where"] == "outside":
        return "the tensors outside the blocks hold"
    return f"layer {r['where']} holds" if kind == "layer" else f"`{r['where']}` holds"


def _layers(layers: list) -> str:
    if len(layers) > 1:
        return f" across layers {', '.join(map(str, layers))}"
    return f" in layer {layers[0]}" if layers else ""


def _unit_of(n: dict, one: bool = False) -> str:
    """``the rows of `` / ``the column of ``...: every weight of the chosen weights' units ("" for weights)."""
    unit = n.get("unit") or "weight"
    return "" if unit == "weight" else f"the {unit}{'' if one else 's'} of "


def _perturbed(n: dict) -> str:
    if ConditionKind.of(n["target"]) is ConditionKind.SINGLE:
        return f"{n['perturbation']} of {_unit_of(n, one=True)}the single weight of rank {n['rank']}"
    return f"{n['perturbation']} of {_unit_of(n)}the top {n['k']} ({fmt.counted(n['n_weights'], 'weight')})"


def _structural(p: float | None) -> str:
    """``= 0.003`` or ``< 1e-06``: a placement p-value, shown with its floor (the Method section's rule)."""
    shown = fmt.p_floored(p, th.STRUCTURAL_P_FLOOR)
    return shown if shown.startswith("<") else f"= {shown}"


def sentence(f: Finding, labels: list[str]) -> str:
    """The finding as one sentence with its numbers, its runs named by their labels."""
    n, who = f.numbers, " and ".join(labels[i] for i in f.runs)
    if f.section == "across_models":
        from cwa.report import across_models_text

        return across_models_text.sentence(f, labels)
    if n.get("experiment"):
        who = f"{who} ({n['experiment']})"
    if f.verdict in ("concentrated", "evenly_spread"):
        numbers = (
            f"the top 1% hold {fmt.percent(n['top_share'])} of the total |score| ({f.value:.1f}× an equal share), "
            f"Gini {fmt.number(n['gini'])}"
        )
        if f.verdict == "evenly_spread":
            return f"{who}: the scores are close to evenly spread (no concentration): {numbers}."
        tiny = (
            f"; the top 0.01% alone ({fmt.count(n['tiny_count'])} weights) hold {fmt.percent(n['tiny_share'])}"
            if "tiny_count" in n
            else ""
        )
        return f"**{who}: the scores are concentrated**: {numbers}{tiny}."
    if f.verdict in ("enriched_module", "enriched_layer"):
        return (
            f"{who}: {_where(n, f.verdict.split('_')[1])} {n['count']} of the top {n['k']} ({fmt.percent(n['share'])}) "
            f"against {fmt.percent(n['weight_share'])} of the weights ({f.value:.1f}×, adjusted p "
            f"{_structural(n['p_adjusted'])})."
        )
    if f.verdict == "residual_dimension_recurs":
        return (
            f"{who}: residual-stream dimension {n['dimension']} recurs across module types "
            f"({', '.join(f'`{m}`' for m in n['modules'])}): {n['count']} of the {n['of']} top-{n['k']} weights that "
            f"read or write the residual stream use it (adjusted binomial p {_structural(f.value)} against a uniform "
            f"spread over its {n['hidden']} dimensions)."
        )
    if f.verdict == "recurs":
        return (
            f"{who}: {n['axis']} {n['coordinate']} of `{n['module']}` recurs: {n['count']} of the {n['of']} "
            f"top-{n['k']} weights in that module type{_layers(n['layers'])} (adjusted binomial p "
            f"{_structural(f.value)})."
        )
    if f.verdict in ("stable", "unstable"):
        return (
            f"The top-{n['k']} of {n['label']} ({who}) is {f.verdict} across calibration seeds "
            f"(mean pairwise Jaccard {_ci(f.value, f.interval)})."
        )
    if f.verdict in ("raises_perplexity", "lowers_perplexity"):
        numbers = f"Δppl = {_ci(f.value, f.interval, fmt.effect)}, p = {fmt.p_value(n['p_value'])}"
        return f"{who}: {_perturbed(n)} {f.verdict.split('_')[0]} held-out perplexity ({numbers})."
    if f.verdict == "undetermined":
        return (
            f"{who}: the effect of {_perturbed(n)} on held-out perplexity is undetermined: the interval covers 0 "
            f"but reaches a doubling or more (Δppl = {_ci(f.value, f.interval, fmt.effect)}, "
            f"p = {fmt.p_value(n['p_value'])}); evaluate more held-out sequences."
        )
    if f.verdict == "no_effect":
        return (
            f"{who}: {_perturbed(n)} has no detectable effect on held-out perplexity "
            f"(Δppl = {_ci(f.value, f.interval, fmt.effect)}, p = {fmt.p_value(n['p_value'])})."
        )
    if f.verdict == "costs_more_than_control":
        return (
            f"{who}: at K={n['k']}, {n['perturbation']} of {_unit_of(n)}the top-K costs more than the {n['control']} "
            f"control "
            f"(Δppl {fmt.effect(n['topk_delta'])} vs {_ci(f.value, f.interval, fmt.effect)}, "
            f"paired p = {fmt.p_value(n['p_value'])})."
        )
    if f.verdict == "deterministic":
        return (
            f"{who} repeat the same settings on the same calibration data (fingerprint `{n['fingerprint']}`) and "
            f"select the identical top-{n['k']} (Jaccard 1.000): the analysis is deterministic."
        )
    if f.verdict == "not_reproduced":
        same = "same" if n["same_data"] else "different"
        return (
            f"{who} repeat the same settings ({same} calibration fingerprint) but their top-{n['k']} differ "
            f"(Jaccard {fmt.number(f.value)})."
        )
    if f.verdict == "same_heldout":
        return f"All {len(f.runs)} runs hold out the same evaluation text (held-out fingerprint `{n['fingerprint']}`)."
    return f"{who}: {f.verdict} ({f.statistic} = {fmt.number(f.value)})."


def pair_sentence(group: list[Finding], analysis: Analysis) -> str:
    """Two runs' agreement findings as one sentence."""
    a, b = group[0].runs
    parts = []
    for f in group:
        if f.verdict in ("rank_alike", "rank_differently"):
            how = "alike" if f.verdict == "rank_alike" else "differently"
            parts.append(
                f"rank the weights {how} (Spearman ρ = {_ci(f.value, f.interval)} "
                f"over {fmt.count(f.numbers['n'])} random weights)"
            )
        elif f.verdict == "share_topk":
            parts.append(f"largely share their top-{f.numbers['k']} (Jaccard {fmt.number(f.value)})")
        elif f.verdict == "disjoint_topk":
            parts.append(f"share almost none of their top-{f.numbers['k']} (Jaccard {fmt.number(f.value)})")
    la, lb = analysis.labels[a], analysis.labels[b]
    ma, mb = analysis.runs[a].metric, analysis.runs[b].metric
    return f"{la} ({ma}) and {lb} ({mb}) " + " and ".join(parts) + "."


def headline_sentence(group: list[Finding], analysis: Analysis) -> str:
    """One executive-summary claim from its group of findings."""
    first = group[0]
    if first.verdict == "concentrated":
        who = ", ".join(analysis.labels[f.runs[0]] for f in group)
        return (
            f"The scores of {len(group)} of {len(analysis.runs)} runs ({who}) are concentrated (top 1% of weights "
            f"≥ {th.CONCENTRATED_FACTOR:.0f}× an equal share of the score)."
        )
    if first.verdict in ("recurs", "residual_dimension_recurs"):
        n, who = first.numbers, analysis.labels[first.runs[0]]
        if first.verdict == "recurs":
            return (
                f"Critical weights recur on shared rows/columns: e.g. {n['axis']} {n['coordinate']} of `{n['module']}` "
                f"holds {n['count']} of {n['of']} top-K weights of that module type in {who} "
                f"(adjusted p {_structural(first.value)})."
            )
        return (
            f"Critical weights share residual-stream dimensions: e.g. dimension {n['dimension']} holds {n['count']} "
            f"of {n['of']} top-K weights across {len(n['modules'])} module types in {who} "
            f"(adjusted p {_structural(first.value)})."
        )
    if first.section == "agreement":
        return pair_sentence(group, analysis)
    return sentence(first, analysis.labels)
