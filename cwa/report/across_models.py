"""The report's "Across models" section, as data: where each model's critical weights sit by relative depth and
normalised module type, the perturbation effects of each model side by side, and each model's strongest
super-weight candidate.

A weight's coordinates mean nothing across models, so nothing here compares them: runs of different models are
compared only through coordinates every model shares (:mod:`cwa.report.module_types`) and through effect sizes
on the scale of each model's own baseline (the perplexity ratio exp(Δ mean NLL)). :func:`across_models_of` returns
None when the runs scored one model. The Markdown and the figure are :mod:`cwa.report.across_models_text`'s.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cwa.ablation.stats import exp_or_inf
from cwa.compare.models import ModelId, display_names, group_models, model_of
from cwa.model.params import ParamInfo, split_name
from cwa.report.findings import Finding
from cwa.report.module_types import (
    BEFORE,
    DEPTH_BINS,
    MODULE_TYPES,
    count_layers,
    depth_bin,
    module_type,
    relative_depth,
)
from cwa.report.placement import untied_topk
from cwa.rundir import ConditionKind, PerturbRow, Run

SECTION = "across_models"
MIN_SHARE_DIFFERENCE = 0.1  # a placement difference is claimed from 10 points of the top-K on


@dataclass
class Shares:
    """Where one model's top-K of one metric sit, averaged over that model's runs of the metric.

    Args:
        model: the model's display name.
        metric: the metric.
        runs: positions of the runs averaged.
        k: per run, how many top-K weights were placed (ties at the cutoff left out).
        layers: the number of blocks the model's tensors span.
        depth: relative-depth bin -> share of the top-K (mean over ``runs``).
        module: normalised module type -> share of the top-K.
        cells: relative-depth bin -> module type -> share of the top-K (the figure's stacked bars).
        depth_counts: relative-depth bin -> top-K weights there, summed over ``runs`` (out of ``sum(k)``).
        module_counts: module type -> top-K weights of that type, summed over ``runs``.
    """

    model: str
    metric: str
    runs: tuple[int, ...]
    k: list[int]
    layers: int
    depth: dict[str, float] = field(default_factory=dict)
    module: dict[str, float] = field(default_factory=dict)
    cells: dict[str, dict[str, float]] = field(default_factory=dict)
    depth_counts: dict[str, int] = field(default_factory=dict)
    module_counts: dict[str, int] = field(default_factory=dict)


@dataclass
class Effect:
    """One model's result for one perturbation condition: the perplexity ratio to its own baseline
    (exp(Δ mean NLL)) and Δ mean NLL, each with its 95% interval from perturb.csv."""

    run: int
    ratio: float
    ratio_low: float | None
    ratio_high: float | None
    delta_nll: float
    delta_nll_low: float | None
    delta_nll_high: float | None
    n_weights: int
    p_value: float | None


@dataclass
class EffectRow:
    """A condition that means the same in every model: metric, perturbation, target (top-K or a control), unit,
    K and control seed; ``effects`` maps each model's display name to its result (the first of its runs)."""

    metric: str
    perturbation: str
    target: str
    unit: str
    k: int | None
    seed: int | None
    effects: dict[str, Effect] = field(default_factory=dict)


@dataclass
class SuperCandidate:
    """A model's strongest super-weight candidate (the largest ablation effect; rank 1 when none was ablated)."""

    model: str
    run: str
    parameter: str
    layer: int
    layers: int
    relative_depth: float
    module: str
    verdict: str
    candidates: int
    super_weights: int
    ratio: float | None
    ratio_low: float | None
    ratio_high: float | None
    p_value: float | None


@dataclass
class CrossModel:
    """The section: the models (display names, in order of first appearance), their runs' positions, the shares,
    the effects side by side, the super-weight candidates and the findings."""

    models: list[str]
    members: dict[str, list[int]]
    shares: list[Shares]
    effects: list[EffectRow]
    super_weights: list[SuperCandidate]
    findings: list[Finding] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "models": self.models,
            "members": self.members,
            "shares": [asdict(s) for s in self.shares],
            "effects": [asdict(e) for e in self.effects],
            "super_weights": [asdict(c) for c in self.super_weights],
        }


# -- find-super-weights runs (only what this section needs: their summary.json) ---------------------------
def _strongest_candidate(model: str, path: Path, summary: dict) -> SuperCandidate | None:
    """The candidate with the largest ablation effect (else the lowest rank); malformed entries are left out."""
    candidates = [
        c for c in _list(summary.get("candidates"))
        if isinstance(c, dict) and isinstance(c.get("parameter"), str) and _integer(c.get("layer")) is not None
    ]  # fmt: skip
    if not candidates:
        return None

    def ablation(c: dict) -> dict:
        return c["ablation"] if isinstance(c.get("ablation"), dict) else {}

    def effect(c: dict) -> float:
        value = ablation(c).get("delta_nll")
        return value if isinstance(value, int | float) and math.isfinite(value) else -math.inf

    ablated = [c for c in candidates if effect(c) > -math.inf]
    best = max(ablated, key=effect) if ablated else min(candidates, key=lambda c: _integer(c.get("rank")) or math.inf)
    numbers = ablation(best)
    layer = _integer(best["layer"])
    layers = max(_integer(summary.get("layers")) or 0, layer + 1)
    p = numbers.get("p_value")
    return SuperCandidate(
        model=model, run=str(path), parameter=best["parameter"], layer=layer, layers=layers,
        relative_depth=relative_depth(layer, layers), module=module_type(ParamInfo(best["parameter"], (),
        *split_name(best["parameter"]))), verdict=str(best.get("verdict", "")), candidates=len(candidates),
        super_weights=len(_list(summary.get("super_weights"))), ratio=_exp(numbers.get("delta_nll")),
        ratio_low=_exp(numbers.get("delta_nll_low")), ratio_high=_exp(numbers.get("delta_nll_high")),
        p_value=float(p) if isinstance(p, int | float) else None,
    )  # fmt: skip


def _list(x: object) -> list:
    return x if isinstance(x, list) else []


def _integer(x: object) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) and x >= 0 else None


def _exp(x: object) -> float | None:
    if not isinstance(x, int | float) or math.isnan(x):
        return None
    return exp_or_inf(x)


# -- where the top-K sit -----------------------------------------------------------------------------
def _run_counts(run: Run, k: int) -> tuple[int, Counter, Counter, Counter] | None:
    top = untied_topk(run, k)
    if top is None or len(top) == 0:
        return None
    layers = count_layers(run.infos)
    depth, module, cells = Counter(), Counter(), Counter()
    for p in top.param.tolist():
        info = run.infos[top.names[p]]
        d, m = depth_bin(info, layers), module_type(info)
        depth[d] += 1
        module[m] += 1
        cells[(d, m)] += 1
    return len(top), depth, module, cells


def shares_of(runs: list[Run], positions: list[int], model: str, metric: str, k: int) -> Shares | None:
    """The mean shares of the top-``k`` over one model's runs of one metric (None when none can give a top-K)."""
    counted = [(i, _run_counts(runs[i], k)) for i in positions]
    counted = [(i, c) for i, c in counted if c is not None]
    if not counted:
        return None
    out = Shares(model, metric, tuple(i for i, _ in counted), [c[0] for _, c in counted],
                 max(count_layers(runs[i].infos) for i, _ in counted))  # fmt: skip
    n = len(counted)
    for d in DEPTH_BINS:
        out.depth[d] = sum(c[1][d] / c[0] for _, c in counted) / n
        row = {m: sum(c[3][(d, m)] / c[0] for _, c in counted) / n for m in MODULE_TYPES}
        out.cells[d] = {m: v for m, v in row.items() if v}
    for m in MODULE_TYPES:
        out.module[m] = sum(c[2][m] / c[0] for _, c in counted) / n
    out.depth_counts = {d: sum(c[1][d] for _, c in counted) for d in DEPTH_BINS}
    out.module_counts = {m: sum(c[2][m] for _, c in counted) for m in MODULE_TYPES}
    return out


def _wilson(count: int, n: int, z: float) -> tuple[float, float]:
    p, z2 = count / n, z * z
    centre, half = (p + z2 / (2 * n)) / (1 + z2 / n), z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def share_difference(x1: int, n1: int, x2: int, n2: int, z: float) -> tuple[float, float, float]:
    """p1 − p2 of two binomial shares with Newcombe's hybrid score interval (from the two Wilson intervals)."""
    p1, p2 = x1 / n1, x2 / n2
    (l1, u1), (l2, u2) = _wilson(x1, n1, z), _wilson(x2, n2, z)
    d = p1 - p2
    return d, d - math.hypot(p1 - l1, u2 - p2), d + math.hypot(u1 - p1, p2 - l2)


def placement_findings(shares: list[Shares]) -> list[Finding]:
    """``placement_differs``: for two models' top-K of one metric, a relative-depth bin or module type whose share
    differs by at least MIN_SHARE_DIFFERENCE with a Newcombe interval that excludes 0 at 95% after Bonferroni over
    the bins and types compared for that pair (the top-K weights counted as independent draws, as the placement
    section's binomial tests do)."""
    from scipy.stats import norm

    out = []
    for a, b in itertools.combinations(shares, 2):
        if a.metric != b.metric or a.model == b.model:
            continue
        na, nb = sum(a.k), sum(b.k)
        # The bin before the blocks holds exactly the embeddings outside them: compared once, as a module type.
        depth_a, depth_b = ({d: c for d, c in s.depth_counts.items() if d != BEFORE} for s in (a, b))
        kinds = (("relative depth", depth_a, depth_b), ("module type", a.module_counts, b.module_counts))
        tests = [(kind, key) for kind, ca, cb in kinds for key in ca if ca[key] or cb[key]]
        z = float(norm.ppf(1 - 0.05 / (2 * max(1, len(tests)))))
        for kind, ca, cb in kinds:
            for key in (key for key in ca if ca[key] or cb[key]):
                d, low, high = share_difference(ca[key], na, cb[key], nb, z)
                if abs(d) < MIN_SHARE_DIFFERENCE or low <= 0 <= high:
                    continue
                # The model with the larger share first.
                more, less = ((a, ca[key], na), (b, cb[key], nb)) if d > 0 else ((b, cb[key], nb), (a, ca[key], na))
                d, low, high = (d, low, high) if d > 0 else (-d, -high, -low)
                numbers = {"kind": kind, "where": key, "metric": a.metric, "models": [more[0].model, less[0].model],
                           "counts": [more[1], less[1]], "placed": [more[2], less[2]], "tests": len(tests)}  # fmt: skip
                statistic = f"difference between the models' shares of the top-K in this {kind}"
                out.append(Finding(SECTION, "placement_differs", more[0].runs + less[0].runs, statistic, d,
                                   MIN_SHARE_DIFFERENCE, (low, high), low, numbers))  # fmt: skip
    return sorted(out, key=lambda f: -f.strength)


# -- effects side by side -------------------------------------------------------------------------------
def perturb_rows(run: Run) -> list[PerturbRow]:
    """The rows of every perturb experiment of the run, oldest first (``Run.perturbations``): the one place this
    section reads perturb results. A condition run in several experiments counts once, from the first."""
    return [r for experiment in run.perturbations for r in experiment.rows]


def _effect(i: int, r: PerturbRow) -> Effect | None:
    if r.delta_nll is None or not math.isfinite(r.delta_nll):
        return None
    low, high = r.delta_nll_low, r.delta_nll_high
    return Effect(i, _exp(r.delta_nll), _exp(low), _exp(high), r.delta_nll, low, high, r.n_weights, r.p_value)


def effect_rows(runs: list[Run], groups: dict[str, list[int]]) -> list[EffectRow]:
    """Top-K and control conditions (not restored twins) that at least two models ran, side by side."""
    rows: dict[tuple, EffectRow] = {}
    for model, positions in groups.items():
        for i in positions:
            for r in perturb_rows(runs[i]):
                if r.kind not in (ConditionKind.TOPK, ConditionKind.CONTROL) or r.restore:
                    continue
                key = (runs[i].metric, r.perturbation, r.target, r.unit, r.k, r.seed)
                effect = _effect(i, r)
                if effect is not None:
                    rows.setdefault(key, EffectRow(*key)).effects.setdefault(model, effect)
    order = {m: n for n, m in enumerate(groups)}
    shared = [row for row in rows.values() if len(row.effects) >= 2]
    for row in shared:
        row.effects = dict(sorted(row.effects.items(), key=lambda item: order[item[0]]))
    return sorted(shared, key=lambda r: (r.metric, r.perturbation, r.unit, r.k or 0, r.target != "topk", r.target,
                                         r.seed or 0))  # fmt: skip


def effect_findings(rows: list[EffectRow], names: list[str]) -> list[Finding]:
    """For each top-K condition run on two models: ``larger_effect`` when one model's 95% interval of Δ mean NLL
    lies entirely above the other's (the difference is supported), ``effects_overlap`` when the intervals overlap
    (the runs cannot tell the models apart). Disjoint 95% intervals imply a difference at p < 0.05 (conservative)."""
    out = []
    statistic = "perplexity ratio to the model's own baseline, exp(Δ mean NLL)"
    for row in rows:
        if row.target != ConditionKind.TOPK:
            continue
        for (ma, a), (mb, b) in itertools.combinations(row.effects.items(), 2):
            if None in (a.delta_nll_low, a.delta_nll_high, b.delta_nll_low, b.delta_nll_high):
                continue
            if a.delta_nll_low < b.delta_nll_high and b.delta_nll_low < a.delta_nll_high:
                verdict, (hi, mh), (lo, ml), strength = "effects_overlap", (a, ma), (b, mb), 0.0
            else:
                (hi, mh), (lo, ml) = ((a, ma), (b, mb)) if a.delta_nll_low >= b.delta_nll_high else ((b, mb), (a, ma))
                verdict, strength = "larger_effect", hi.delta_nll_low - lo.delta_nll_high
            numbers = {
                "metric": row.metric, "perturbation": row.perturbation, "unit": row.unit, "k": row.k,
                "models": [mh, ml], "names": [names[hi.run], names[lo.run]], "other_ratio": lo.ratio,
                "other_interval": [lo.ratio_low, lo.ratio_high], "n_weights": [hi.n_weights, lo.n_weights],
            }  # fmt: skip
            out.append(Finding(SECTION, verdict, (hi.run, lo.run), statistic, hi.ratio, None,
                               (hi.ratio_low, hi.ratio_high), strength, numbers))  # fmt: skip
    return sorted(out, key=lambda f: (f.verdict != "larger_effect", -f.strength))


# -- the section ----------------------------------------------------------------------------------------
def across_models_of(
    runs: list[Run], names: list[str], location_k: int, super_runs: list[tuple[Path, dict]] | None = None
) -> CrossModel | None:
    """The "Across models" section of a report over ``runs`` (and find-super-weights runs), or None when they
    scored a single model.

    Args:
        runs: the report's fit-sensitivity runs.
        names: their names, for the findings' numbers.
        location_k: the top-K placed per run (the report's ``--location_k``).
        super_runs: (directory, summary.json) of find-super-weights runs given to the report.
    """
    super_runs = super_runs or []
    ids = [model_of(r) for r in runs] + [ModelId(str(s["model"])) for _, s in super_runs]
    groups = group_models(ids)
    if len(groups) < 2:
        return None
    labels = display_names([m for m, _ in groups])
    fit_members = {label: [i for i in members if i < len(runs)] for label, (_, members) in zip(labels, groups,
                                                                                              strict=True)}  # fmt: skip
    shares = []
    for metric in sorted({r.metric for r in runs}):
        for label, members in fit_members.items():
            of_metric = [i for i in members if runs[i].metric == metric]
            s = shares_of(runs, of_metric, label, metric, location_k) if of_metric else None
            shares += [s] if s else []
    effects = effect_rows(runs, {label: m for label, m in fit_members.items() if m})
    candidates = []
    for label, (_, members) in zip(labels, groups, strict=True):
        for j in (i - len(runs) for i in members if i >= len(runs)):
            c = _strongest_candidate(label, *super_runs[j])
            candidates += [c] if c else []
    section = CrossModel(labels, fit_members, shares, effects, candidates)
    section.findings = placement_findings(shares) + effect_findings(effects, names)
    return section
