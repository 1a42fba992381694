"""Render an :class:`~cwa.report.analysis.Analysis` to Markdown, section by section.

A dumb renderer: which findings exist, their verdicts and which of them lead the executive summary are
decided in ``cwa.report.findings`` and ``cwa.report.recipe``; the wording is ``cwa.report.text``. Each section gives its
table, then its strongest findings as sentences, and the rest as a table (all of them are in the JSON).
"""

from __future__ import annotations

import datetime as dt
import itertools
import math
from collections.abc import Callable
from pathlib import Path

from cwa.common import format as fmt
from cwa.compare.result import Comparison
from cwa.report import across_models_text as across_models
from cwa.report import findings as th
from cwa.report import interventions, super_weights
from cwa.report.analysis import Analysis, agreement_pairs
from cwa.report.findings import FRACTIONS, Finding
from cwa.report.text import _bullets, _rel, _table, headline_sentence, pair_sentence, sentence
from cwa.rundir import ConditionKind, DownstreamRow, Perturbation, PerturbRow

LEAD = 5  # findings per section given as sentences; the rest go to a table

Figure = Callable[[str, str], list[str]]


def render(analysis: Analysis, output: Path, figures: dict[str, Path], headlines: list[list[Finding]]) -> str:
    """The report's Markdown.

    Args:
        analysis: what the runs show.
        output: path of the Markdown file (links are relative to its folder).
        figures: {figure key: path} of the figures drawn (empty without figures).
        headlines: the executive summary's claims (``cwa.report.analysis.headlines``).
    """

    def fig(key: str, alt: str) -> list[str]:
        return [f"![{alt}]({_rel(figures[key], output.parent)})", ""] if key in figures else []

    lines = ["# Critical Weight Analysis Research Report", ""]
    if not analysis.runs:  # find-super-weights runs only: their section is the report
        stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        lines += [f"**Generated:** {stamp} by `cwa report` from {_plural(len(analysis.super_weights), 'run')} of "
                  "`cwa find-super-weights` (no fit-sensitivity run was given).", ""]  # fmt: skip
        return "\n".join(lines + super_weights.section(analysis.super_weights, output))
    lines += [
        f"**Generated:** {dt.datetime.now().strftime('%Y-%m-%d %H:%M:%S')} by `cwa report` from "
        f"{len(analysis.runs)} run directories. Every finding below is computed from those runs; a statement "
        "appears only when its numbers clear the threshold given in [Method and thresholds](#method-and-thresholds). "
        "Runs are named R1, R2, ... as in the table under [Experiment Details](#experiment-details).",
        "",
    ]
    lines += executive_summary(analysis, headlines)
    lines += models_and_metrics(analysis)
    lines += details(analysis, output)
    lines += ["## Key Findings", ""]
    lines += concentration(analysis, fig)
    lines += placement(analysis, fig)
    lines += agreement(analysis, fig)
    lines += across_models.section(analysis.across_models, analysis.labels, fig)
    lines += stability(analysis)
    lines += perturbation(analysis, output, fig)
    lines += downstream(analysis)
    lines += interventions.section(analysis.labels, analysis.interventions, output)
    lines += super_weights.section(analysis.super_weights, output)
    lines += reproducibility(analysis)
    lines += next_steps(analysis)
    lines += method(analysis.location_k)
    return "\n".join(lines)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def _tail(rest: list[Finding], analysis: Analysis) -> list[str]:
    """Findings beyond the lead, one table row each."""
    if not rest:
        return []
    rows = [
        [
            ", ".join(analysis.labels[i] for i in f.runs),
            f.verdict.replace("_", " "),
            sentence(f, analysis.labels).replace("**", "").split(": ", 1)[-1].rstrip("."),
        ]
        for f in rest
    ]
    return [f"{_plural(len(rest), 'further finding')}:", ""] + _table(["run", "verdict", "numbers"], rows)


def _lead(found: list[Finding], analysis: Analysis, none: str) -> list[str]:
    lines = _bullets([sentence(f, analysis.labels) for f in found[:LEAD]], none)
    return lines + _tail(found[LEAD:], analysis)


def executive_summary(analysis: Analysis, headlines: list[list[Finding]]) -> list[str]:
    models = sorted({r.model for r in analysis.runs})
    metrics = sorted({r.metric for r in analysis.runs})
    lines = ["## Executive Summary", ""]
    lines += [
        f"This report covers {_plural(len(analysis.runs), 'fit-sensitivity run')} on {_plural(len(models), 'model')} "
        f"with {_plural(len(metrics), 'sensitivity metric')} ({', '.join(metrics)}).",
        "",
    ]
    if analysis.skipped:
        lines += [f"Left out: {'; '.join(s.rstrip('.') for s in analysis.skipped)}.", ""]
    lines += ["Main findings (each detailed below):", ""]
    return lines + _bullets(
        [headline_sentence(g, analysis) for g in headlines],
        "No finding clears its threshold; the tables below give the numbers.",
    )


def models_and_metrics(analysis: Analysis) -> list[str]:
    runs = analysis.runs
    lines = ["## Models Tested", ""]
    rows = []
    for model in sorted({r.model for r in runs}):
        of = [r for r in runs if r.model == model]
        s = of[0].summary
        parameters, scored = fmt.count(s.num_parameters or 0), fmt.count(of[0].num_scored)
        rows.append([f"`{model}`", s.model_class or "?", parameters, scored, str(len(of))])
    lines += _table(["model", "class", "parameters", "weights scored", "runs"], rows)
    lines += ["## Metrics Used", ""]
    rows = []
    for metric in sorted({r.metric for r in runs}):
        of = [r for r in runs if r.metric == metric]
        options = sorted({", ".join(f"{k}={v}" for k, v in r.metric_options.items()) or "—" for r in of})
        unscored = sorted({len(r.metric_facts.get("unscored") or {}) for r in of} - {0})
        if unscored:  # wanda and obs leave out norms, embeddings and biases (listed in each summary.json)
            options.append(f"leaves out {'/'.join(map(str, unscored))} tensors that multiply no layer input")
        described = next((r.metric_description for r in of if r.metric_description), "—")
        rows.append([f"`{metric}`", described, "; ".join(options), str(len(of))])
    return lines + _table(["metric", "score of a weight", "options", "runs"], rows)


def details(analysis: Analysis, output: Path) -> list[str]:
    """The run table that defines each run's label, and links to each run's own figures."""
    lines = ["## Experiment Details", ""]
    rows = []
    for label, name, r in zip(analysis.labels, analysis.names, analysis.runs, strict=True):
        s = r.summary
        rows.append(
            [label, f"`{name}`", f"`{r.model}`", r.metric, r.mode, str(r.k), str(r.samples),
             str(r.data.get("seq_len", "?")), fmt.count(s.tokens or 0), str(r.seed), fmt.number(s.mean_loss, 4),
             fmt.perplexity(s.perplexity), f"{sum(float(v) for v in s.timings.values()):.0f}",
             fmt.number(s.memory.get("peak_rss_mib"), 0), s.created or "?"]
        )  # fmt: skip
    header = ["run", "directory", "model", "metric", "mode", "k", "samples", "seq_len", "tokens", "seed"]
    header += ["mean NLL", "ppl", "time (s)", "peak RSS (MiB)", "completed"]
    lines += _table(header, rows)
    links = [
        f"{label}: "
        + ", ".join(
            f"[{p.stem.replace('_', ' ')}]({_rel(p, output.parent)})" for p in sorted(r.figures_dir.glob("*.png"))
        )
        for label, r in zip(analysis.labels, analysis.runs, strict=True)
        if r.figures_dir.is_dir()
    ]
    if links:
        lines += ["Figures of each run (written by fit-sensitivity and perturb): " + "; ".join(links) + ".", ""]
    return lines


def concentration(analysis: Analysis, fig: Figure) -> list[str]:
    lines = ["### How concentrated the scores are", ""]
    rows = []
    for label, run, c in zip(analysis.labels, analysis.runs, analysis.concentration, strict=True):
        shares = c.get("top_shares", {})
        if c["source"] == "scores":
            top = [shares[f"{q:g}"] for q in FRACTIONS]
            cells = [f"{fmt.percent(t['share'])} ({fmt.count(t['count'])})" for t in top]
            rows.append([label, run.metric, fmt.count(c["n"]), fmt.number(c["gini"]), *cells])
        else:
            t = c["topk_share"]
            top = f"top {t['count']} rows of topk.csv: {fmt.percent(t['share'])}"
            rows.append([label, run.metric, fmt.count(c["n"]), "n/a (no scores file)", top, "", ""])
    lines += _table(["run", "metric", "weights", "Gini", "top 0.01%", "top 0.1%", "top 1%"], rows)
    lines += [
        "Share of the total |score| held by the top fraction of weights (the number of weights in "
        "parentheses); with equal scores the top 1% would hold exactly 1% and the Gini coefficient would be 0.",
        "",
    ]
    lines += _lead(analysis.of("concentration"), analysis, "No run clears a concentration threshold either way.")
    return lines + fig("concentration", "Concentration of the scores")


def placement(analysis: Analysis, fig: Figure) -> list[str]:
    lines = ["### Where the critical weights live", ""]
    rows = []
    for label, p in zip(analysis.labels, analysis.placements, strict=True):
        if p is None:
            continue
        top_modules = ", ".join(f"`{r['where']}` {r['count']}" for r in p.by_module if r["count"])[:160]
        top_layers = ", ".join(f"{r['where']}: {r['count']}" for r in p.by_layer[:5] if r["count"])
        size = str(p.k) + (f" ({p.tied} tied at the cutoff left out)" if p.tied else "")
        rows.append([label, size, top_modules or "—", top_layers or "—"])
    lines += _table(["run", "global top-K", "module types (count)", "most frequent layers (count)"], rows)
    tied = [label for label, p in zip(analysis.labels, analysis.placements, strict=True) if p and p.tied]
    if tied:
        lines += [
            f"In {', '.join(tied)} the last weights of the top-{analysis.location_k} tie with the first weight left "
            "out, so their membership is decided by the tie-break rule, not by the scores; they are left out "
            "of the placement analysis.",
            "",
        ]
    none = "No module type, layer, row or column holds significantly more of the top-K than its share of the weights."
    lines += _lead(analysis.of("placement"), analysis, none)
    return lines + fig("topk_by_layer", "Top-K by layer") + fig("topk_by_module", "Top-K by module type")


def agreement(analysis: Analysis, fig: Figure) -> list[str]:
    lines = ["### Agreement between runs", ""]
    if not analysis.comparisons:
        return lines + [
            "Fewer than two runs score the same parameters of one model, so no two runs can be compared (weight "
            "coordinates are compared within a model only).",
            "",
        ]
    for members, result in analysis.comparisons:
        lines += _comparison_table(analysis, members, result)
    pairs = agreement_pairs(analysis)
    lines += _bullets(
        [pair_sentence(g, analysis) for g in pairs[:LEAD]], "No pair clears an agreement or disagreement threshold."
    )
    if len(pairs) > LEAD:
        lines += [f"{len(pairs) - LEAD} further pairs clear a threshold; the table above gives their numbers.", ""]
    for members, result in analysis.comparisons:
        for note in result.notes:
            for i in members:  # name runs by their labels here too
                note = note.replace(analysis.names[i], analysis.labels[i])
            lines += [f"Note: {note}.", ""]
        tag = "-".join(analysis.labels[i] for i in members)
        lines += fig(f"jaccard:{tag}", "Jaccard overlap") + fig(f"spearman:{tag}", "Spearman correlation")
    return lines


def _comparison_table(analysis: Analysis, members: list[int], result: Comparison) -> list[str]:
    ks = result.ks
    labels = [analysis.labels[i] for i in members]
    lines = [
        f"Runs {', '.join(labels)} score the same parameters ({analysis.runs[members[0]].model}); global top-K "
        f"overlap at K = {', '.join(map(str, ks))}:",
        "",
    ]
    largest = result.largest_k
    union = result.topk_union.get(largest) if largest else None
    sample = result.random_sample
    rows = []
    for a, b in itertools.combinations(range(len(members)), 2):
        cells = [f"{labels[a]} vs {labels[b]}"]
        for k in ks:
            ov = result.overlap[k]
            cells.append(f"{fmt.number(ov.jaccard[a][b])} / {fmt.number(ov.overlap_coefficient[a][b])}")
        rho = sample.spearman[a][b] if sample else None
        tau = sample.kendall[a][b] if sample else None
        urho = union.spearman[a][b] if union else None
        cells.append(fmt.interval(rho.value, rho.low, rho.high) if rho else fmt.MISSING)
        cells.append(fmt.number(tau.value) if tau else fmt.MISSING)
        cells.append(f"{fmt.number(urho.value)} (n={urho.n})" if urho else fmt.MISSING)
        rows.append(cells)
    header = ["pair"] + [f"Jaccard / overlap @{k}" for k in ks]
    header += ["Spearman ρ, random weights [95% CI]", "Kendall τ, random weights", f"Spearman ρ, top-{largest} union"]
    return (
        lines
        + _table(header, rows)
        + [
            "Jaccard = |A∩B|/|A∪B| and overlap = |A∩B|/min(|A|,|B|) of the two global top-K sets. The random-weight "
            "correlations rank |score| over the same uniform sample of weights in every run (the whole distribution); "
            "the top-K-union correlation only ranks weights that at least one run put at the very top, a range so "
            "restricted that it is typically far lower: it measures agreement on the order among the critical weights.",
            "",
        ]
    )


def stability(analysis: Analysis) -> list[str]:
    lines = ["### Stability over calibration subsets", ""]
    if not analysis.stability:
        return lines + [
            "No two runs differ only in their calibration seed, so stability over calibration subsets is not "
            "measured here (run one setting with several `--data.seed` values).",
            "",
        ]
    verdicts = {(f.runs, f.numbers["k"]): f.verdict for f in analysis.of("stability")}
    for group, positions in analysis.stability:
        who = ", ".join(analysis.labels[i] for i in positions)
        lines += [f"{group.label} ({who}), seeds {group.seeds} ({len(group.runs)} runs):", ""]
        rows = []
        for k, s in group.by_k.items():
            interval = f"[{fmt.number(s.low)}, {fmt.number(s.high)}]" if s.low is not None else s.note
            rows.append([str(k), fmt.number(s.mean), interval, verdicts.get((positions, k), "")])
        lines += _table(["K", "mean pairwise Jaccard", "95% run-bootstrap interval", "verdict"], rows)
        if len(group.runs) < 3:
            lines += [f"Only {len(group.runs)} runs: too few for an interval, so no verdict.", ""]
    return lines


def _target(row: PerturbRow) -> str:
    """The target, with its unit when the chosen weights' rows or columns were perturbed."""
    target = row.target if row.unit == "weight" else f"{row.target} ({row.unit}s)"
    return target + (f" (restore {row.restore})" if row.restore else "")


def _which(row: PerturbRow) -> str:
    """The K column: K, a single weight's rank, ``10 − #3`` for a leave-one-out set, ``#1+#2`` for a pair."""
    if row.kind is ConditionKind.PAIR:
        return "+".join(f"#{r}" for r in row.ranks.split("+")) if row.ranks else ""
    if row.kind is ConditionKind.LEAVE_ONE_OUT:
        return f"{row.k} − #{row.rank}"
    return str(row.k if row.k is not None else row.rank)


def perturbation(analysis: Analysis, output: Path, fig: Figure) -> list[str]:
    lines = ["### Perturbation effects", ""]
    found = analysis.of("perturbation")
    claims = [f for f in found if f.verdict not in ("no_effect", "undetermined")]
    lines += _bullets(
        [sentence(f, analysis.labels) for f in claims[:LEAD]],
        "No perturbation effect clears its interval and p-value threshold.",
    )
    lines += _tail(claims[LEAD:] + [f for f in found if f.verdict in ("no_effect", "undetermined")], analysis)
    for label, experiments in zip(analysis.labels, analysis.experiments, strict=True):
        for experiment in experiments:
            lines += _experiment_table(label, experiment, output)
    lines += fig("perturbation_effects", "Perturbation effects")
    for page in itertools.count(2):  # every page of the figure: conditions beyond one page are never left out
        more = fig(f"perturbation_effects:{page}", f"Perturbation effects, page {page}")
        if not more:
            break
        lines += more
    if not any(analysis.perturbation):
        lines += [
            "None of these runs has perturbation results (perturb.csv), so this report makes no claim that "
            "the selected weights matter for the model's output; `cwa perturb` measures that.",
            "",
        ]
    return lines


def _experiment_table(label: str, experiment: Perturbation, output: Path) -> list[str]:
    """One experiment's rows (its baseline left out), labelled with the run and the set, and its figures."""
    rows = [r for r in experiment.rows if r.kind is not ConditionKind.BASELINE]
    if not rows:
        return []
    header = ["target", "perturbation", "K", "weights", "ppl", "Δppl [95% CI]", "p", "p vs"]
    table = [
        [_target(r), r.perturbation, _which(r), str(r.n_weights), fmt.perplexity(r.perplexity),
         fmt.interval(r.delta_perplexity, r.delta_perplexity_low, r.delta_perplexity_high, fmt.effect),
         fmt.p_value(r.p_value), r.p_value_vs]
        for r in rows
    ]  # fmt: skip
    if any(r.restore for r in rows):  # activation-restore twins: the share of the damage they undo
        header = [*header, "recovered [95% CI]"]
        table = [[*cells, _recovered(r)] for cells, r in zip(table, rows, strict=True)]
    lines = [f"{label} · {experiment.label} (`cwa perturb`; K is the rank for a single weight):", ""]
    lines += _table(header, table)
    folder = experiment.figures_dir
    for name in ("perturb_dose_response.png", "perturb_single_weight.png", "perturb_sets.png"):
        if folder is not None and (folder / name).exists():
            lines += [f"![{label} {experiment.label} {name}]({_rel(folder / name, output.parent)})", ""]
    return lines


def _recovered(row: PerturbRow) -> str:
    """A restored twin's recovered fraction of the damage with its interval ("undefined" without one)."""
    if not row.restore:
        return ""
    low, high = row.recovered_fraction_low, row.recovered_fraction_high
    if row.recovered_fraction is None or low is None or high is None or math.isnan(row.recovered_fraction):
        return "undefined"
    return fmt.interval(row.recovered_fraction, low, high, fmt.percent)


def downstream(analysis: Analysis) -> list[str]:
    """Task accuracy per condition (downstream.csv, from ``cwa perturb --tasks``), when a run has it."""
    if not any(analysis.downstream):
        return []
    lines = ["### Downstream accuracy", ""]
    for label, experiments in zip(analysis.labels, analysis.downstream, strict=True):
        for experiment, rows in experiments:
            lines += _downstream_table(f"{label} · {experiment.label}", rows)
    return lines


def _downstream_table(label: str, rows: list[DownstreamRow]) -> list[str]:
    header = ["condition", "task", "items", "accuracy", "Δ accuracy [95% CI]", "p (McNemar)"]
    table = [
        [r.condition, r.task, fmt.count(r.items), fmt.number(r.accuracy),
         "" if r.p_value is None else fmt.interval(r.delta_accuracy, r.delta_accuracy_low, r.delta_accuracy_high,
                                                  fmt.effect),
         "" if r.p_value is None else fmt.p_value(r.p_value)]
        for r in rows
    ]  # fmt: skip
    lines = [f"{label} (`cwa perturb --tasks`, lm-evaluation-harness; Δ against the unperturbed model):", ""]
    return lines + _table(header, table)


def reproducibility(analysis: Analysis) -> list[str]:
    lines = ["### Reproducibility", ""]
    rows = []
    for label, r in zip(analysis.labels, analysis.runs, strict=True):
        env = r.summary.environment
        v = env.get("versions") or {}
        strategy = f"{r.summary.strategy or '?'} × {r.summary.world_size or '?'}"
        rows.append(
            [label, str(env.get("git_commit") or "not recorded"), v.get("torch", "?"), v.get("transformers", "?"),
             v.get("lightning", "?"), f"`{r.summary.data_fingerprint}`", f"`{r.data.get('heldout_fingerprint')}`",
             str(r.seed), strategy]
        )  # fmt: skip
    header = ["run", "git commit", "torch", "transformers", "lightning", "calibration fingerprint"]
    lines += _table(header + ["held-out fingerprint", "data seed", "strategy × ranks"], rows)
    found = [sentence(f, analysis.labels) for f in analysis.findings if f.section == "reproducibility"]
    lines += [f"- {s}" for s in found] + ([""] if found else [])
    if any(not r.summary.environment.get("git_commit") for r in analysis.runs):
        lines += [
            "- Runs without a git commit were made from a copy of cwa outside a git checkout: their code version "
            "is only the package version.",
            "",
        ]
    return lines


def next_steps(analysis: Analysis) -> list[str]:
    runs = analysis.runs
    steps = []
    if not any(analysis.perturbation):
        steps.append(
            "Validate the selections causally: `cwa perturb` on these runs (top-K vs. matched random and "
            "magnitude controls, with bootstrap intervals)."
        )
    if not analysis.stability or any(len(g.runs) < 3 for g, _ in analysis.stability):
        steps.append("Measure stability: repeat one setting with at least three `--data.seed` values.")
    if any(r.model == "smollm2-135m" for r in runs):
        steps.append(
            "Run the same grid on the hub models (gpt2, microsoft/DialoGPT-small, meta-llama/Llama-3.1-8B) "
            "where the hub is reachable."
        )
    if len({r.metric for r in runs}) < 2:
        steps.append("Compare metrics: score the same model with a second metric.")
    steps.append(
        "Test whether the recurring rows/columns coincide with massive activations (super weights) by "
        "recording activations on the same calibration data."
    )
    return ["## Next Steps", ""] + [f"{i}. {s}" for i, s in enumerate(steps, 1)] + [""]


def method(location_k: int) -> list[str]:
    return [
        "## Method and thresholds",
        "",
        f"- *Concentrated*: the top 1% of weights hold ≥ {th.CONCENTRATED_FACTOR:.0f}× their equal share of the "
        f"total |score| (≥ {th.CONCENTRATED_FACTOR:.0f}%); *close to evenly spread*: < {th.NEAR_UNIFORM_FACTOR:.0f}× "
        f"(< {th.NEAR_UNIFORM_FACTOR:.0f}%). Gini coefficient of |score| over every scored weight.",
        f"- *Holds more than its share* (module type, layer): ≥ {th.ENRICHED_FACTOR:.0f}× its share of the scored "
        f"weights among the global top-{location_k} and a one-sided binomial p-value, Bonferroni-adjusted over the "
        f"module types or layers, below {th.ALPHA}.",
        f"- *Recurs* (row, column or channel of one module type): ≥ {th.RECUR_MIN} of that module type's top-K "
        "weights share it and the binomial p-value against a uniform spread over its rows/columns, "
        f"Bonferroni-adjusted over them, is below {th.ALPHA}.",
        "- *Residual-stream dimension recurs*: top-K weights of at least two module types read or write the same "
        "hidden dimension (norm channels, embedding columns, input columns of q/k/v/gate/up, output rows of "
        f"o_proj/down_proj), ≥ {th.RECUR_MIN} of them, Bonferroni-adjusted binomial p below {th.ALPHA} against a "
        "uniform spread over the hidden dimensions.",
        "- Placement p-values describe where one run's top-K sit against a uniform spread (a structural fact of "
        "that run), not how surely another seed or calibration set would put them there (the stability section "
        f"measures that); they are floored at {th.STRUCTURAL_P_FLOOR:.0e}: a smaller one is written "
        f"p < {th.STRUCTURAL_P_FLOOR:.0e}.",
        "- *Rank the weights alike*: the lower end of Spearman's 95% interval (Fisher z, se 1.06/√(n−3)) over a "
        f"uniform random sample of weights ≥ {th.AGREE_RHO}; *differently*: its upper end < {th.DISAGREE_RHO}. "
        f"Top-K sets *largely shared*: Jaccard ≥ {th.SHARE_JACCARD}; *almost none shared*: < {th.DISJOINT_JACCARD}.",
        "- *Stable* over calibration seeds: the lower end of the run-bootstrap 95% interval of the mean pairwise "
        f"Jaccard ≥ {th.STABLE_JACCARD}; *unstable*: its upper end < {th.UNSTABLE_JACCARD}; at least three runs.",
        f"- Perturbation claims: the 95% bootstrap interval of Δ perplexity excludes 0 and p < {th.P_SIGNIFICANT}; "
        "against a control, the paired p-value written by `cwa perturb`.",
        "- Global top-K: ranked by |score|, ties to the earlier parameter then the lower flat index; a per_layer "
        "run's global top-K comes from its scores file (or from its topk.csv for K ≤ its k).",
        "- Each section gives its strongest findings (by adjusted p-value, or by how far a threshold is cleared) "
        f"as sentences, at most {LEAD}, and the rest in a table; every finding is in the report's JSON.",
        "",
    ]
