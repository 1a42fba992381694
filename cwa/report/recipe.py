"""``cwa report RUN ... --output report.md``: a research report whose every finding is computed from the runs.

Two layers: ``cwa.report.analysis`` computes every statistic and finding from the runs and picks the headlines;
``cwa.report.markdown`` renders that :class:`~cwa.report.analysis.Analysis` to Markdown without deciding anything.
This module draws the figures and writes the report; the numbers behind it go to ``<stem>.json`` beside it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from cwa.common import format as fmt
from cwa.common.errors import CwaError
from cwa.common.io import atomic_open, draw_or_note, write_json
from cwa.compare.recipe import DEFAULT_KS, DEFAULT_SAMPLE, locations, parse_ks
from cwa.compare.result import Comparison, RankCorrelation
from cwa.report.analysis import Analysis, analyse, headlines
from cwa.report.findings import P_SIGNIFICANT
from cwa.report.markdown import render
from cwa.report.placement import LOCATION_K
from cwa.rundir import ConditionKind, PerturbRow, Run, load_runs
from cwa.rundir.super_weights import SuperWeightsRun


def distinct_runs(runs: list[Run]) -> tuple[list[Run], list[str]]:
    """The runs without copies: a directory whose summary.json, topk.csv and perturbation sets (if any) are
    byte-identical to an earlier one's is the same run under another path, and would repeat every finding.
    (A deterministic rerun differs in its summary's timings and stays: the reproducibility section uses it.)"""
    from cwa.rundir.files import PERTURB_CSV, SUMMARY, TOPK
    from cwa.rundir.outputs import set_dirs, sha256
    from cwa.rundir.perturbation import PERTURB

    kept: list[Run] = []
    notes: list[str] = []
    seen: dict[tuple[str, ...], Run] = {}
    for run in runs:
        files = [run.path / SUMMARY, run.path / TOPK, *(d.path / PERTURB_CSV for d in set_dirs(run.path, PERTURB))]
        key = tuple(sha256(f) if f.is_file() else "" for f in files)
        if key in seen:
            notes.append(f"'{run.path}' left out: a copy of '{seen[key].path}' (identical files).")
            continue
        seen[key] = run
        kept.append(run)
    return kept, notes


def _load(paths: list[str]) -> tuple[list[Run], list[SuperWeightsRun], list[str]]:
    """The fit-sensitivity runs (copies left out), the find-super-weights runs, and notes on what was skipped. Only
    super-weight runs is a report too; neither is one sentence."""
    from cwa.rundir.super_weights import is_super_weights_run, read_super_weights

    scans, seen = [], set()
    for path in paths:
        if is_super_weights_run(path) and Path(path).resolve() not in seen:
            seen.add(Path(path).resolve())
            scans.append(read_super_weights(path))
    fits = [p for p in paths if not is_super_weights_run(p)]
    if not fits and scans:
        return [], scans, []
    loaded, skipped = load_runs(fits, skip_incomplete=True)
    loaded, copies = distinct_runs(loaded)
    return loaded, scans, skipped + copies


# -- figures -------------------------------------------------------------------------------------
def draw_figures(analysis: Analysis, fig_dir: Path) -> dict[str, Path]:
    """Draw the report's own figures; returns {figure key: path} for the renderer to embed."""
    from cwa.report import figures as report_figures

    out: dict[str, Path] = {}
    labels = analysis.labels
    curves = {
        labels[i]: (c["curve"]["q"], c["curve"]["share"]) for i, c in enumerate(analysis.concentration) if "curve" in c
    }
    if curves:
        _draw(out, "concentration", fig_dir / "concentration.png", report_figures.concentration_curves, curves)
    locs = {
        labels[i]: locations(run, p.k)
        for i, (run, p) in enumerate(zip(analysis.runs, analysis.placements, strict=True))
        if p is not None
    }
    if locs:
        _draw(out, "topk_by_layer", fig_dir / "topk_by_layer.png", report_figures.layer_distribution, locs)
        _draw(out, "topk_by_module", fig_dir / "topk_by_module.png", report_figures.module_distribution, locs)
    for members, result in analysis.comparisons:
        out.update(_comparison_figures(analysis, members, result, fig_dir))
    if analysis.across_models is not None and analysis.across_models.shares:
        from cwa.report import across_models_text as across

        path = fig_dir / "across_models_depth.png"
        _draw(out, across.FIGURE_KEY, path, across.draw_depth_figure, analysis.across_models.shares)
    pages = forest_pages(analysis)
    for number, page in enumerate(pages, 1):
        key = "perturbation_effects" if number == 1 else f"perturbation_effects:{number}"
        name = "perturbation_effects.png" if number == 1 else f"perturbation_effects_{number}.png"
        title = "Perturbation effects" + (f" ({number} of {len(pages)})" if len(pages) > 1 else "")
        _draw(out, key, fig_dir / name, report_figures.perturbation_effects, page, title)
    return out


FOREST_ROWS = 60
"""Conditions per page of the perturbation-effects figure; more make several pages, never fewer rows."""


def forest_pages(analysis: Analysis, per_page: int = FOREST_ROWS) -> list[list[dict]]:
    """The rows of the perturbation-effects figure (every top-K and control condition of every experiment),
    the significant ones first (interval excludes 0 and p < 0.05), cut into pages of ``per_page``: every row
    is on some page."""
    rows = []
    for i, experiments in enumerate(analysis.experiments):
        for experiment in experiments:
            where = f" · {experiment.label}" if len(experiments) > 1 else ""
            rows += [_forest_row(f"{analysis.labels[i]}{where}", r) for r in experiment.rows if _in_forest(r)]
    rows.sort(key=lambda r: not r["significant"])  # stable: the given order within each group
    return [rows[start : start + per_page] for start in range(0, len(rows), per_page)]


def _in_forest(r: PerturbRow) -> bool:
    return (r.kind is ConditionKind.TOPK or r.is_control) and not r.restore and r.delta_perplexity is not None


def _forest_row(label: str, r: PerturbRow) -> dict:
    low, high, p = r.delta_perplexity_low, r.delta_perplexity_high, r.p_value
    excludes_zero = low is not None and high is not None and (low > 0 or high < 0)
    return {
        "label": f"{label} · {r.target} · {r.perturbation} · K={r.k}"
        + ("" if r.unit == "weight" else f" · {r.unit}s")
        + ("" if r.seed is None else f" · seed {r.seed}"),
        "delta": r.delta_perplexity,
        "low": low,
        "high": high,
        "significant": excludes_zero and (p is None or p < P_SIGNIFICANT),
    }


def _comparison_figures(analysis: Analysis, members: list[int], result: Comparison, fig_dir: Path) -> dict[str, Path]:
    from cwa.report import figures as report_figures

    largest = result.largest_k
    if not largest:
        return {}
    tag = "-".join(analysis.labels[i] for i in members)
    names = [f"{analysis.labels[i]} ({analysis.runs[i].metric})" for i in members]
    ticks = [analysis.labels[i] for i in members]
    out: dict[str, Path] = {}
    matrix = np.array(result.overlap[largest].jaccard, dtype=float)
    title = f"Jaccard overlap of the global top-{largest}"
    path = fig_dir / f"jaccard_k{largest}_{tag}.png"
    _draw(out, f"jaccard:{tag}", path, lambda p: report_figures.overlap_heatmap(matrix, names, title, p, ticks))
    sample = result.random_sample
    if sample:
        n = len(members)
        rho = np.array(
            [[1.0 if i == j else _value_or_nan(sample.spearman[i][j]) for j in range(n)] for i in range(n)],
            dtype=float,
        )
        title = f"Spearman ρ of |score| over {fmt.count(sample.size)} random weights"
        path = fig_dir / f"spearman_{tag}.png"
        _draw(out, f"spearman:{tag}", path, lambda p: report_figures.overlap_heatmap(rho, names, title, p, ticks))
    return out


def _draw(out: dict[str, Path], key: str, path: Path, draw: Callable[..., None], *args: object) -> None:
    """Draw one figure into ``path`` and list it under ``key``; a failure is a printed note and the report
    goes on without that figure."""
    note = draw_or_note(path.name, lambda: draw(*args, path))
    if note is None:
        out[key] = path
    else:
        print(f"note: {note}.", file=sys.stderr)


def _value_or_nan(c: RankCorrelation | None) -> float:
    return c.value if c is not None and c.value else np.nan  # a missing or zero ρ stays blank, as before


# -- the command ---------------------------------------------------------------------------------
def report(
    runs: list[str],
    output: Path = Path("reports/critical-weights.md"),
    ks: Sequence[int] | str = DEFAULT_KS,
    sample: int = DEFAULT_SAMPLE,
    seed: int = 0,
    location_k: int = LOCATION_K,
    figures: bool = True,
) -> Path:
    """A Markdown research report over fit-sensitivity runs (and their perturbation results): concentration of
    the scores, where the critical weights live, agreement between metrics, stability over calibration seeds,
    perturbation effects and reproducibility, each finding computed from the runs.

    Args:
        runs: run directories (``lightning_logs/NAME/version_N``) of fit-sensitivity and of find-super-weights
            (its own section); a directory that is not a complete run (a failed or running one matched by a
            glob) is skipped with a note.
        output: Markdown file to write; figures go to ``<stem>-figures/`` beside it and the numbers to
            ``<stem>.json``.
        ks: K of the top-K overlaps between runs, e.g. ``[10,100,1000]`` (a comma string works too).
        sample: random weights for the rank correlations between runs (0 skips them).
        seed: seed of the random sample and of the bootstraps.
        location_k: size of the global top-K whose placement (module types, layers, recurring rows and
            columns) is analysed.
        figures: draw and embed figures.

    Returns:
        The Markdown file written.
    """
    output = Path(output)
    if output.suffix.lower() != ".md":
        raise CwaError(f"--output must name a Markdown file ending in .md, not '{output}'.")
    if location_k < 1:
        raise CwaError(f"--location_k must be at least 1, got {location_k}.")
    if sample < 0:
        raise CwaError(f"--sample must be 0 or more, got {sample}.")
    k_values = parse_ks(ks)
    loaded, found, skipped = _load(runs)
    for note in skipped:
        print(f"note: {note}", file=sys.stderr)
    analysis = analyse(loaded, k_values, int(sample), seed, location_k, [(s.path, s.summary) for s in found])
    analysis.skipped, analysis.super_weights = skipped, found
    figure_paths = draw_figures(analysis, output.with_name(output.stem + "-figures")) if figures else {}
    text = render(analysis, output, figure_paths, headlines(analysis))
    shrunk = sum(bool(run.summary.smoke) for run in loaded)
    if shrunk:  # a smoke run checks that cwa runs; its numbers must not pass for measurements
        warning = f"{shrunk} of the {len(loaded)} runs were made with CWA_SMOKE (sizes shrunk): not measurements."
        print(f"note: {warning}", file=sys.stderr)
        text = f"> **Note:** {warning}\n\n{text}"
    with atomic_open(output) as handle:
        handle.write(text)
    write_json(output.with_suffix(".json"), analysis.to_json())
    more = f" and {len(found)} find-super-weights runs" if found else ""
    print(f"cwa report: {len(loaded)} runs{more} -> {output}")
    return output
