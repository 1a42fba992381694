"""Findings: what a set of runs shows, as data.

A finding is one statistic about one or more runs, with its value, its interval, the threshold its verdict
is gated on and the verdict itself. Each ``*_findings`` function here is pure: it takes what was computed
from the runs (concentration, comparisons, perturbation rows) and returns :class:`Finding` objects; it
never formats a sentence. ``cwa.report.markdown`` renders them; the report's executive summary picks them
by section, verdict and strength (:func:`cwa.report.analysis.headlines`). Where the placement findings are, see
``cwa.report.placement``.

To add a finding: write a function from the runs to ``Finding``s with a new ``verdict`` and register it with
:func:`finding_source` (``cwa.report.analysis.analyse`` calls every registered source); a new verdict is worded
by the generic sentence until :func:`cwa.report.text.sentence` gives it a branch (docs/architecture.md).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from cwa.compare.result import Comparison, RankCorrelation, StabilityGroup
from cwa.rundir import ConditionKind, PerturbRow, Run
from cwa.scoring import agreement

FRACTIONS = (1e-4, 1e-3, 1e-2)

# Thresholds every verdict is gated on (stated in the report's "Method and thresholds" section).
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
STRUCTURAL_P_FLOOR = 1e-6  # placement p-values (where one run's top-K sit) are floored here: "p < 1e-06"


@dataclass
class Finding:
    """One statistic about one or more runs and the verdict its numbers support.

    Args:
        section: the report section it belongs to (``concentration``, ``placement``, ``agreement``,
            ``stability``, ``perturbation``, ``reproducibility``).
        verdict: what the numbers support, e.g. ``concentrated``, ``rank_alike``, ``raises_perplexity``;
            ``no_effect`` is a verdict too (an interval that covers zero).
        runs: positions of the runs it concerns in the report's run list.
        statistic: what was measured, in words.
        value: the statistic's value.
        threshold: the number the verdict is gated on (its rule is stated in the Method section).
        interval: the value's 95% interval, where it has one.
        strength: how decisively the threshold is cleared (larger first; comparable within a section).
        numbers: everything else the finding rests on (counts, shares, p-values, K).
    """

    section: str
    verdict: str
    runs: tuple[int, ...]
    statistic: str
    value: float | None
    threshold: float | None
    interval: tuple[float | None, float | None] | None = None
    strength: float = 0.0
    numbers: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


FindingSource = Callable[[list[Run]], list[Finding]]

FINDING_SOURCES: dict[str, FindingSource] = {}
"""Finding functions beyond the built-in sections, by name: ``analyse`` adds what each finds, in this order."""


def finding_source(source: FindingSource) -> FindingSource:
    """Register ``source`` (a function from the runs to findings) so that every report runs it; registering a
    function of the same name again replaces it."""
    FINDING_SOURCES[source.__name__] = source
    return source


def strongest(findings: list[Finding]) -> list[Finding]:
    """Findings by strength, strongest first (stable for equal strength)."""
    return sorted(findings, key=lambda f: -f.strength)


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
    total = sum(float(t.get("abs_sum", 0.0)) for t in run.summary.tensors.values())
    scores = run.topk.score.abs().tolist()
    n = run.num_scored
    return {
        "n": n,
        "gini": None,
        "top_shares": {},
        "source": "topk.csv",
        "topk_share": {
            "count": len(scores),
            "fraction": len(scores) / n,
            "share": sum(scores) / total if total > 0 else None,
        },
    }


def concentration_findings(position: int, c: dict) -> list[Finding]:
    """Concentrated (top 1% hold ≥ 10× an equal share) or close to evenly spread (< 2×); nothing between."""
    top1 = c.get("top_shares", {}).get("0.01")
    if not top1 or top1["share"] is None:
        return []
    factor = top1["share"] / top1["fraction"]
    numbers = {"top_share": top1["share"], "top_fraction": top1["fraction"], "gini": c["gini"]}
    top01 = c["top_shares"].get("0.0001")
    if top01:
        numbers.update(tiny_count=top01["count"], tiny_share=top01["share"])
    statistic = "share of the total |score| held by the top 1% of weights, as a multiple of an equal share"
    if factor >= CONCENTRATED_FACTOR:
        verdict, threshold = "concentrated", CONCENTRATED_FACTOR
    elif factor < NEAR_UNIFORM_FACTOR:
        verdict, threshold = "evenly_spread", NEAR_UNIFORM_FACTOR
    else:
        return []
    strength = factor / threshold if verdict == "concentrated" else threshold / max(factor, 1e-12)
    return [Finding("concentration", verdict, (position,), statistic, factor, threshold, None, strength, numbers)]


# -- agreement between runs ---------------------------------------------------------------------
def pair_findings(pair: tuple[int, int], k: int, jac: float | None, rho: RankCorrelation | None) -> list[Finding]:
    """Two runs' agreement: rank correlation over random weights (gated on its interval) and top-K Jaccard."""
    out = []
    if rho is not None and rho.low is not None and rho.high is not None:
        statistic = "Spearman ρ of |score| over a uniform random sample of weights"
        interval = (rho.low, rho.high)
        numbers = {"n": rho.n}
        if rho.low >= AGREE_RHO:
            out.append(
                Finding("agreement", "rank_alike", pair, statistic, rho.value, AGREE_RHO, interval,
                        rho.low - AGREE_RHO + 1, numbers)
            )  # fmt: skip
        elif rho.high < DISAGREE_RHO:
            out.append(
                Finding("agreement", "rank_differently", pair, statistic, rho.value, DISAGREE_RHO, interval,
                        DISAGREE_RHO - rho.high + 1, numbers)
            )  # fmt: skip
    if jac is not None:
        statistic = f"Jaccard overlap of the global top-{k}"
        if jac >= SHARE_JACCARD:
            out.append(Finding("agreement", "share_topk", pair, statistic, jac, SHARE_JACCARD, None, jac, {"k": k}))
        elif jac < DISJOINT_JACCARD:
            out.append(
                Finding("agreement", "disjoint_topk", pair, statistic, jac, DISJOINT_JACCARD, None, 1 - jac, {"k": k})
            )
    return out


def comparison_findings(runs: list[Run], members: list[int], result: Comparison) -> list[Finding]:
    """Agreement findings of every pair in one comparison (``result`` from ``compare_runs`` over ``members``);
    pairs with identical settings and seed are reproducibility checks, not agreement."""
    largest = result.largest_k
    out = []
    for a, b in itertools.combinations(range(len(members)), 2):
        ra, rb = runs[members[a]], runs[members[b]]
        if ra.settings_key() == rb.settings_key() and ra.seed == rb.seed:
            continue
        jac = result.jaccard(largest, a, b) if largest else None
        for f in pair_findings((members[a], members[b]), largest or 0, jac, result.sample_spearman(a, b)):
            f.numbers["different_metrics"] = ra.metric != rb.metric
            out.append(f)
    return out


def stability_findings(group: StabilityGroup, positions: tuple[int, ...]) -> list[Finding]:
    """Stable (lower bound of the mean pairwise Jaccard ≥ 0.7) or unstable (upper bound < 0.3), per K."""
    out = []
    for k, s in group.by_k.items():
        if s.low is None or s.high is None:
            continue
        statistic = f"mean pairwise Jaccard of the global top-{k} over calibration seeds"
        numbers = {"k": k, "label": group.label, "seeds": group.seeds, "runs": s.runs}
        if s.low >= STABLE_JACCARD:
            verdict, threshold, strength = "stable", STABLE_JACCARD, s.low
        elif s.high < UNSTABLE_JACCARD:
            verdict, threshold, strength = "unstable", UNSTABLE_JACCARD, 1 - s.high
        else:
            continue
        out.append(Finding("stability", verdict, positions, statistic, s.mean, threshold,
                           (s.low, s.high), strength, numbers))  # fmt: skip
    return out


# -- perturbation --------------------------------------------------------------------------------
def _delta(row: PerturbRow) -> tuple[float | None, tuple[float | None, float | None]]:
    return row.delta_perplexity, (row.delta_perplexity_low, row.delta_perplexity_high)


def _row_numbers(row: PerturbRow) -> dict:
    return {
        "perturbation": row.perturbation,
        "target": row.target,
        "k": row.k,
        "rank": row.rank,
        "unit": row.unit,
        "n_weights": row.n_weights,
        "p_value": row.p_value,
        "p_value_vs": row.p_value_vs,
    }


def _direction(low: float, high: float, p: float | None) -> str | None:
    """``raises_perplexity`` / ``lowers_perplexity`` when the interval excludes 0 on that side and the test
    agrees (p < 0.05, or no test), else None."""
    if p is not None and p >= P_SIGNIFICANT:
        return None
    return "raises_perplexity" if low > 0 else "lowers_perplexity" if high < 0 else None


def perturbation_findings(position: int, rows: list[PerturbRow], experiment: str | None = None) -> list[Finding]:
    """A single weight or the top-K raises or lowers perplexity (interval above or below 0, p < 0.05); the
    top-K has no detectable effect (interval covers 0 and its upper bound is under the baseline perplexity: at
    most a doubling), or the effect is undetermined (interval covers 0 but reaches a doubling or more: the
    sample cannot tell); the top-K costs more than a control of the same unit (paired p < 0.05). Leave-one-out
    sets and pairs make no finding here (their rows are in the report's table). ``experiment`` (the set's
    label, ``perturb/2``) goes into each finding's numbers where the run has several experiments."""
    out = []
    statistic = "Δ held-out perplexity (perturbed − baseline)"
    rows = [r for r in rows if not r.restore]  # an activation-restore twin is tested against its perturbed pass
    for r in rows:
        delta, (low, high) = _delta(r)
        if r.kind is not ConditionKind.SINGLE or low is None or high is None or r.p_value is None:
            continue
        verdict = _direction(low, high, r.p_value)
        if verdict is not None:
            out.append(Finding("perturbation", verdict, (position,), statistic, delta, 0.0,
                               (low, high), -math.log10(max(r.p_value, 1e-300)), _row_numbers(r)))  # fmt: skip
    for r in (r for r in rows if r.kind is ConditionKind.TOPK):
        delta, (low, high) = _delta(r)
        if delta is None or low is None or high is None:
            continue
        p = r.p_value
        verdict = _direction(low, high, p)
        if verdict is not None:
            strength = -math.log10(max(p, 1e-300)) if p is not None else 1.0
            out.append(Finding("perturbation", verdict, (position,), statistic, delta, 0.0,
                               (low, high), strength, _row_numbers(r)))  # fmt: skip
        elif low <= 0 <= high:
            small = math.isfinite(high) and high < r.perplexity - delta  # under the baseline's perplexity
            out.append(Finding("perturbation", "no_effect" if small else "undetermined", (position,), statistic,
                               delta, 0.0, (low, high), 0.0, _row_numbers(r)))  # fmt: skip
        for c in rows:
            if not c.is_control or c.k != r.k or c.unit != r.unit:
                continue
            if c.perturbation != r.perturbation or c.p_value is None or c.delta_perplexity is None:
                continue
            if c.p_value < P_SIGNIFICANT and delta > c.delta_perplexity:
                numbers = {**_row_numbers(c), "topk_delta": delta, "control": c.target}
                out.append(Finding("perturbation", "costs_more_than_control", (position,),
                                   "Δ perplexity of the control (paired p against the top-K)", c.delta_perplexity,
                                   P_SIGNIFICANT, (c.delta_perplexity_low, c.delta_perplexity_high),
                                   -math.log10(max(c.p_value, 1e-300)), numbers))  # fmt: skip
    if experiment is not None:
        for f in out:
            f.numbers["experiment"] = experiment
    return out


# -- reproducibility ------------------------------------------------------------------------------
def reproducibility_findings(runs: list[Run], comparisons: list[tuple[list[int], Comparison]]) -> list[Finding]:
    """Runs that repeat the same settings and seed: identical top-K (deterministic) or not; and whether all
    runs hold out the same evaluation text."""
    out = []
    for members, result in comparisons:
        largest = result.largest_k
        for a, b in itertools.combinations(range(len(members)), 2):
            ra, rb = runs[members[a]], runs[members[b]]
            if ra.settings_key() != rb.settings_key() or ra.seed != rb.seed or not largest:
                continue
            j = result.jaccard(largest, a, b)
            if j is None:
                continue
            same_data = ra.summary.data_fingerprint == rb.summary.data_fingerprint
            numbers = {"k": largest, "same_data": same_data, "fingerprint": ra.summary.data_fingerprint}
            verdict = "deterministic" if j == 1.0 and same_data else "not_reproduced"
            out.append(Finding("reproducibility", verdict, (members[a], members[b]),
                               f"Jaccard overlap of the global top-{largest}", j, 1.0, None, j, numbers))  # fmt: skip
    fps = Counter(r.data.get("heldout_fingerprint") for r in runs)
    if len(fps) == 1 and len(runs) > 1:
        out.append(Finding("reproducibility", "same_heldout", tuple(range(len(runs))), "held-out fingerprint",
                           None, None, None, 0.0, {"fingerprint": next(iter(fps))}))  # fmt: skip
    return out
