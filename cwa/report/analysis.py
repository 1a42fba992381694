"""The report's first layer: :func:`analyse` reads the runs (through ``cwa.rundir`` only) and computes every
statistic and every :class:`~cwa.report.findings.Finding` into one :class:`Analysis`; :func:`headlines` picks the
executive summary from the findings' sections, verdicts and strength. The renderer
(``cwa.report.markdown``) and the command (``cwa.report.recipe``) both build on it; it imports neither.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cwa.compare.models import model_groups
from cwa.compare.recipe import DEFAULT_SAMPLE, compare_runs
from cwa.compare.result import Comparison, StabilityGroup
from cwa.report.across_models import CrossModel, across_models_of
from cwa.report.findings import (
    FINDING_SOURCES,
    Finding,
    comparison_findings,
    concentration_findings,
    concentration_of,
    perturbation_findings,
    reproducibility_findings,
    stability_findings,
    strongest,
)
from cwa.report.interventions import Interventions, interventions_of
from cwa.report.placement import LOCATION_K, Placement, placement_findings, placement_of
from cwa.rundir import ConditionKind, DownstreamRow, Perturbation, PerturbRow, Run, unique_names
from cwa.rundir.super_weights import SuperWeightsRun


@dataclass
class Analysis:
    """Everything the report says, computed from the runs; positions index ``runs`` throughout.

    Args:
        runs: the runs, in the order given.
        names: their directory names (``experiment/version_n``), unique.
        labels: their short labels (``R1``, ``R2``, ...), defined once in the report's run table.
        location_k: size of the global top-K whose placement is analysed.
        concentration: per run, the concentration statistics (``cwa.report.findings.concentration_of``).
        placements: per run, where its top-K live (None when it cannot give a global top-K).
        comparisons: (member positions, ``compare_runs`` result) per group of runs scoring the same tensors.
        stability: (``compare_runs`` stability group, member positions) per group of seed replicates.
        experiments: per run, its experiments of ``cwa perturb`` (``perturb/<n>/``, oldest first; [] when none).
        interventions: per run, the prune and protect sets written into its directory (empty when none).
        across_models: the "Across models" section when the runs scored more than one model, else None.
        findings: every finding, in section order.
        skipped: notes on the directories left out (not complete runs).
        super_weights: the find-super-weights runs given (their own section, labelled ``S1``, ``S2``, ...).
    """

    runs: list[Run]
    names: list[str]
    labels: list[str]
    location_k: int
    concentration: list[dict]
    placements: list[Placement | None]
    comparisons: list[tuple[list[int], Comparison]]
    stability: list[tuple[StabilityGroup, tuple[int, ...]]]
    experiments: list[list[Perturbation]]
    interventions: list[Interventions] = field(default_factory=list)
    across_models: CrossModel | None = None
    findings: list[Finding] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    super_weights: list[SuperWeightsRun] = field(default_factory=list)

    @property
    def perturbation(self) -> list[list[PerturbRow]]:
        """Per run, the rows of all its experiments without their baselines ([] when it has none)."""
        return [[r for e in experiments for r in conditions(e)] for experiments in self.experiments]

    @property
    def downstream(self) -> list[list[tuple[Perturbation, list[DownstreamRow]]]]:
        """Per run, (experiment, its lm-eval task rows) for each experiment that ran tasks (downstream.csv)."""
        return [[(e, e.downstream) for e in experiments if e.downstream] for experiments in self.experiments]

    def of(self, section: str) -> list[Finding]:
        """The findings of one section, strongest first."""
        return strongest([f for f in self.findings if f.section == section])

    def to_json(self) -> dict:
        """The numbers behind the report (``<stem>.json``)."""
        return {
            "runs": self.names,
            "labels": self.labels,
            "concentration": {
                n: {k: v for k, v in c.items() if k != "curve"}
                for n, c in zip(self.names, self.concentration, strict=True)
            },
            "placement": {n: (p.__dict__ if p else None) for n, p in zip(self.names, self.placements, strict=True)},
            "comparisons": [{"members": [self.names[i] for i in m], **c.to_json()} for m, c in self.comparisons],
            "perturbation": {
                self.names[i]: [self._experiment_json(i, e) for e in experiments]
                for i, experiments in enumerate(self.experiments)
                if experiments
            },
            "across_models": None if self.across_models is None else self.across_models.to_json(),
            "interventions": {self.names[i]: x.to_json() for i, x in enumerate(self.interventions) if x},
            "findings": [f.as_dict() for f in self.findings],
            "super_weights": {r.name: {"path": str(r.path), **_scan_json(r.summary)} for r in self.super_weights},
            "skipped": self.skipped,
        }

    def _experiment_json(self, position: int, experiment: Perturbation) -> dict:
        claims = [
            f.as_dict()
            for f in self.of("perturbation")
            if f.runs == (position,) and f.numbers.get("experiment") in (None, experiment.label)
        ]
        return {
            "experiment": experiment.label,
            "path": str(experiment.path),
            "rows": [r.as_dict() for r in conditions(experiment)],
            "downstream": [r.as_dict() for r in experiment.downstream or []],
            "claims": claims,
        }


def _scan_json(summary: dict) -> dict:
    keys = ("model", "settings", "heldout", "candidates", "super_weights", "super_experts", "row_test")
    return {k: summary.get(k) for k in keys}


def conditions(experiment: Perturbation) -> list[PerturbRow]:
    """An experiment's rows without its baseline."""
    return [r for r in experiment.rows if r.kind is not ConditionKind.BASELINE]


def layout_groups(runs: list[Run]) -> list[list[int]]:
    """Runs of one model (``cwa.compare.models``) that score the same parameters with the same shapes: the only
    ones whose weight coordinates and scores compare."""
    groups: dict[tuple, list[int]] = {}
    for g, (_, members) in enumerate(model_groups(runs)):
        for i in members:
            groups.setdefault((g, tuple(runs[i].shapes.items())), []).append(i)
    return sorted(groups.values())


def _stability_positions(runs: list[Run], members: list[int], group: StabilityGroup) -> tuple[int, ...]:
    positions: list[int] = []
    for name in group.runs:
        positions.append(next(i for i in members if runs[i].name == name and i not in positions))
    return tuple(positions)


def analyse(
    runs: list[Run],
    ks: list[int],
    sample: int = DEFAULT_SAMPLE,
    seed: int = 0,
    location_k: int = LOCATION_K,
    super_runs: list[tuple[Path, dict]] | None = None,
) -> Analysis:
    """Every statistic and finding of the report, from the runs alone (pure apart from reading them).

    Args:
        runs: the runs to report on.
        ks: K of the top-K overlaps between runs.
        sample: size of the uniform random sample of weights for rank correlations between runs.
        seed: seed of that sample and of the bootstraps.
        location_k: size of the global top-K whose placement (modules, layers, rows/columns) is analysed.
        super_runs: (directory, summary.json) of find-super-weights runs, for the "Across models" section.
    """
    comparisons = [
        (members, compare_runs([runs[i] for i in members], ks, sample, seed))
        for members in layout_groups(runs)
        if len(members) >= 2
    ]
    analysis = Analysis(
        runs=runs,
        names=unique_names(runs),
        labels=[f"R{i + 1}" for i in range(len(runs))],
        location_k=location_k,
        concentration=[concentration_of(run) for run in runs],
        placements=[placement_of(run, location_k) for run in runs],
        comparisons=comparisons,
        stability=[
            (g, _stability_positions(runs, members, g)) for members, result in comparisons for g in result.stability
        ],
        experiments=[run.perturbations for run in runs],
        interventions=[interventions_of(run) for run in runs],
    )
    found = analysis.findings
    for i, c in enumerate(analysis.concentration):
        found += concentration_findings(i, c)
    for i, place in enumerate(analysis.placements):
        found += placement_findings(i, place) if place else []
    for members, result in comparisons:
        found += comparison_findings(runs, members, result)
    for group, positions in analysis.stability:
        found += stability_findings(group, positions)
    for i, experiments in enumerate(analysis.experiments):
        for e in experiments:  # each experiment's claims stand alone, labelled when the run has several
            found += perturbation_findings(i, conditions(e), e.label if len(experiments) > 1 else None)
    found += reproducibility_findings(runs, comparisons)
    analysis.across_models = across_models_of(runs, analysis.names, location_k, super_runs)
    found += analysis.across_models.findings if analysis.across_models else []
    for source in FINDING_SOURCES.values():
        found += source(runs)
    return analysis


# -- the executive summary: picked by section, verdict and strength, never from rendered text ----------
HEADLINE_AGREEMENT_PAIRS = 3
HEADLINE_PERTURBATION_PER_RUN = 2
HEADLINE_BETWEEN_MODELS = 2


def headlines(analysis: Analysis) -> list[list[Finding]]:
    """The executive summary's claims, each a group of findings rendered as one sentence: the concentrated
    runs together; the strongest recurring row, column or residual dimension; the strongest agreement or
    disagreement between runs of different metrics (up to three pairs); every stability verdict; the
    strongest perturbation effects of each run (up to two); the strongest difference of placement between models
    and the largest supported differences of effect between them (up to two)."""
    out: list[list[Finding]] = []
    concentrated = [f for f in analysis.of("concentration") if f.verdict == "concentrated"]
    if concentrated:
        out.append(sorted(concentrated, key=lambda f: f.runs))
    recurring = [f for f in analysis.of("placement") if f.verdict in ("recurs", "residual_dimension_recurs")]
    if recurring:
        out.append(recurring[:1])
    pairs: dict[tuple[int, ...], list[Finding]] = {}
    for f in analysis.of("agreement"):
        if f.numbers.get("different_metrics"):
            pairs.setdefault(f.runs, []).append(f)
    out += list(pairs.values())[:HEADLINE_AGREEMENT_PAIRS]
    out += [[f] for f in analysis.findings if f.section == "stability"]
    for i in range(len(analysis.runs)):
        effects = [
            f
            for f in analysis.of("perturbation")
            if f.runs == (i,) and f.verdict in ("raises_perplexity", "lowers_perplexity", "costs_more_than_control")
        ]
        out += [[f] for f in effects[:HEADLINE_PERTURBATION_PER_RUN]]
    between = analysis.of("across_models")
    effects = [f for f in between if f.verdict == "larger_effect"][:HEADLINE_BETWEEN_MODELS]
    return out + [[f] for f in [f for f in between if f.verdict == "placement_differs"][:1] + effects]


def agreement_pairs(analysis: Analysis) -> list[list[Finding]]:
    """Agreement findings grouped by pair of runs, the pair with the strongest finding first."""
    pairs: dict[tuple[int, ...], list[Finding]] = {}
    for f in analysis.of("agreement"):
        pairs.setdefault(f.runs, []).append(f)
    return [
        sorted(group, key=lambda f: f.verdict not in ("rank_alike", "rank_differently")) for group in pairs.values()
    ]
