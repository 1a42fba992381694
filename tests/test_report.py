"""cwa report on artificial runs: every section, and no finding that the numbers contradict."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from test_compare import LAYOUT, load_runs, make_run, random_scores

from cwa.cli import main
from cwa.common.errors import CwaError
from cwa.report.analysis import Analysis, analyse, headlines
from cwa.report.findings import ALPHA, CONCENTRATED_FACTOR, ENRICHED_FACTOR, Finding
from cwa.report.markdown import render
from cwa.report.recipe import report

SECTIONS = [
    "## Executive Summary",
    "## Models Tested",
    "## Metrics Used",
    "## Experiment Details",
    "## Key Findings",
    "### How concentrated the scores are",
    "### Where the critical weights live",
    "### Agreement between runs",
    "### Stability over calibration subsets",
    "### Perturbation effects",
    "### Reproducibility",
    "## Next Steps",
    "## Method and thresholds",
]


def uniform_scores() -> dict[str, torch.Tensor]:
    return {n: torch.full(s, 0.25) for n, s in LAYOUT.items()}


def concentrated_scores() -> dict[str, torch.Tensor]:
    """A few weights carry most of the score; they share input column 5 of q_proj across the layers."""
    scores = {n: torch.rand(s, generator=torch.Generator().manual_seed(3)) * 1e-3 for n, s in LAYOUT.items()}
    for layer in range(3):
        q = scores[f"model.layers.{layer}.self_attn.q_proj.weight"]
        q[:, 5] = 1.0 + layer + 0.01 * torch.arange(8)  # distinct values: no tie decides the top-K
    scores["model.norm.weight"][5] = 5.0  # the same hidden dimension, in another module type
    return scores


def analysis_of(runs, **kwargs) -> Analysis:
    return analyse(load_runs(runs), [10], sample=5000, **kwargs)


def text_of(analysis: Analysis, tmp_path) -> str:
    return render(analysis, tmp_path / "out" / "report.md", {}, headlines(analysis))


def verdicts(analysis: Analysis, section: str) -> list[str]:
    return [f.verdict for f in analysis.of(section)]


def test_uniform_scores_make_no_concentration_claim(tmp_path):
    run = make_run(tmp_path, "uniform", uniform_scores(), k=10, metric="magnitude")
    analysis = analysis_of([run])
    text = text_of(analysis, tmp_path)
    for section in SECTIONS:
        assert section in text
    assert verdicts(analysis, "concentration") == ["evenly_spread"]
    top1 = analysis.concentration[0]["top_shares"]["0.01"]
    assert top1["count"] == 7 and top1["share"] == pytest.approx(7 / 680)  # 7 of 680 equal weights
    assert "1.03% (7)" in text
    assert analysis.of("placement") == []  # a tie-break is not a finding
    assert analysis.placements[0].tied > 0
    assert not any(analysis.perturbation) and not headlines(analysis)
    assert "no claim that the selected weights matter" in text


def test_concentrated_run_is_called_concentrated_with_its_numbers(tmp_path):
    run = make_run(tmp_path, "conc", concentrated_scores(), k=10)
    analysis = analysis_of([run], location_k=20)
    (claim,) = analysis.of("concentration")
    assert claim.verdict == "concentrated" and claim.runs == (0,)
    assert claim.numbers["top_share"] > 0.10 and claim.value >= claim.threshold == CONCENTRATED_FACTOR
    scores = torch.cat([s.reshape(-1) for s in concentrated_scores().values()]).abs().sort(descending=True).values
    assert claim.numbers["top_share"] == pytest.approx(float(scores[:7].sum() / scores.sum()), rel=1e-5)
    where = analysis.of("placement")
    recurs = [f.numbers for f in where if f.verdict == "recurs"]
    assert any(
        r["module"] == "self_attn.q_proj" and r["axis"] == "input column" and r["coordinate"] == 5 for r in recurs
    )
    enriched = [f.numbers for f in where if f.verdict == "enriched_module"]
    assert any(r["where"] == "self_attn.q_proj" and r["count"] == 19 and r["k"] == 20 for r in enriched)
    residual = [f.numbers for f in where if f.verdict == "residual_dimension_recurs"]
    assert any(r["dimension"] == 5 and "norm" in r["modules"] for r in residual)
    assert all(f.value < f.threshold for f in where if f.verdict != "enriched_module")  # adjusted p < alpha
    summary = [g[0] for g in headlines(analysis)]
    assert summary[0].verdict == "concentrated"
    recurring = [f for f in where if f.verdict in ("recurs", "residual_dimension_recurs")]
    assert summary[1] is recurring[0]  # the strongest recurring row, column or dimension leads


def test_agreement_claims_follow_the_correlations(tmp_path):
    base = random_scores(1)
    noisy = {n: s + 0.01 * torch.rand(s.shape, generator=torch.Generator().manual_seed(2)) for n, s in base.items()}
    a = make_run(tmp_path, "a", base, k=10)
    b = make_run(tmp_path, "b", noisy, k=10, metric="magnitude")
    c = make_run(tmp_path, "c", random_scores(7), k=10, metric="hutchinson_diag")
    analysis = analysis_of([a, b, c])
    found = {(f.runs, f.verdict): f for f in analysis.of("agreement")}
    alike = found[((0, 1), "rank_alike")]
    assert alike.interval[0] >= alike.threshold
    assert not any(v == "rank_alike" and 2 in runs for runs, v in found)
    assert any(v == "rank_differently" and 2 in runs for runs, v in found)
    assert all(f.interval[1] < f.threshold for f in found.values() if f.verdict == "rank_differently")
    text = text_of(analysis, tmp_path)
    assert str(tmp_path) not in text  # runs are named by their labels, defined once in the run table
    assert "version_0" not in text.split("## Key Findings", 1)[1]


def test_stability_and_reproducibility_sections(tmp_path):
    runs = [make_run(tmp_path, f"s{seed}", random_scores(seed), k=10, seed=seed) for seed in range(3)]
    same = make_run(tmp_path, "s0", random_scores(0), k=10, seed=0, version=1)
    analysis = analysis_of([*runs, same])
    (group, positions) = analysis.stability[0]
    assert len(analysis.stability) == 1
    assert group.seeds == [0, 1, 2] and positions == (0, 1, 2)  # a repeat of seed 0 is not a new subset
    assert group.by_k[10].mean is not None
    repro = {f.verdict: f for f in analysis.of("reproducibility")}
    assert repro["deterministic"].runs == (0, 3) and repro["deterministic"].value == 1.0
    text = text_of(analysis, tmp_path)
    assert "mean pairwise Jaccard" in text and "the analysis is deterministic" in text


def test_perturbation_claims_need_an_interval_that_excludes_zero(tmp_path):
    base = {
        "condition": "c",
        "perturbation": "zero",
        "k": 10,
        "rank": "",
        "seed": 0,
        "n_weights": 10,
        "perplexity": 30.0,
        "nll": 3.4,
        "accuracy": 0.3,
        "delta_nll": 0.1,
        "delta_nll_low": 0.05,
        "delta_nll_high": 0.2,
        "delta_accuracy": -0.01,
        "delta_accuracy_low": -0.02,
        "delta_accuracy_high": 0.0,
        "p_value_vs": "baseline",
    }
    rows = [
        {
            **base,
            "target": "baseline",
            "n_weights": 0,
            "delta_perplexity": 0,
            "delta_perplexity_low": 0,
            "delta_perplexity_high": 0,
            "p_value": "",
        },
        {
            **base,
            "target": "topk",
            "delta_perplexity": 12.0,
            "delta_perplexity_low": 8.0,
            "delta_perplexity_high": 16.0,
            "p_value": 0.001,
        },
        {
            **base,
            "target": "random_matched",
            "delta_perplexity": 0.01,
            "delta_perplexity_low": -0.02,
            "delta_perplexity_high": 0.03,
            "p_value": 0.002,
            "p_value_vs": "topk",
        },
    ]
    run = make_run(tmp_path, "p", random_scores(1), k=10, perturb_rows=rows)
    output = report([str(run)], tmp_path / "out" / "report.md", ks=[10], sample=5000)
    assert (tmp_path / "out" / "report-figures" / "perturbation_effects.png").exists()
    analysis = analysis_of([run])
    found = {f.verdict: f for f in analysis.of("perturbation")}
    raises = found["raises_perplexity"]
    assert (raises.value, raises.interval, raises.numbers["target"]) == (12.0, (8.0, 16.0), "topk")
    control = found["costs_more_than_control"]
    assert control.numbers["control"] == "random_matched" and control.numbers["p_value"] == 0.002
    assert {g[0].verdict for g in headlines(analysis)} == {"raises_perplexity", "costs_more_than_control"}
    saved = json.loads(output.with_suffix(".json").read_text())
    assert saved["perturbation"]["p/version_0"][0]["rows"][0]["delta_perplexity"] == 12.0
    assert {f["verdict"] for f in saved["findings"]} >= {"raises_perplexity", "costs_more_than_control"}

    null = [rows[0], {**rows[1], "delta_perplexity": 0.1, "delta_perplexity_low": -0.2, "p_value": 0.4}]
    run = make_run(tmp_path, "q", random_scores(1), k=10, perturb_rows=null)
    assert verdicts(analysis_of([run]), "perturbation") == ["no_effect"]

    # A significant fall in perplexity is a finding too; a jump whose interval covers 0 but reaches a doubling
    # of the baseline (30) is undetermined, not "no detectable effect".
    lower = {**rows[1], "delta_perplexity": -14.0, "delta_perplexity_low": -18.0, "delta_perplexity_high": -10.0}
    run = make_run(tmp_path, "r", random_scores(1), k=10, perturb_rows=[rows[0], {**lower, "p_value": 2e-4}])
    analysis = analysis_of([run])
    assert verdicts(analysis, "perturbation") == ["lowers_perplexity"]
    assert "lowers held-out perplexity" in text_of(analysis, tmp_path)
    jump = {**rows[1], "perplexity": 3e6 + 30, "delta_perplexity": 3e6}
    jump.update(delta_perplexity_low=-20.0, delta_perplexity_high=9e6)
    run = make_run(tmp_path, "s", random_scores(1), k=10, perturb_rows=[rows[0], {**jump, "p_value": 0.25}])
    analysis = analysis_of([run])
    assert verdicts(analysis, "perturbation") == ["undetermined"]
    assert "no detectable effect" not in text_of(analysis, tmp_path)


def test_the_tail_table_counts_in_the_singular_and_has_no_stray_markup(tmp_path):
    from cwa.report.markdown import _tail

    finding = Finding("concentration", "concentrated", (0,), "top-1% share / equal share", 40.0, 10.0, None, 1.0,
                      {"top_share": 0.4, "gini": 0.9})  # fmt: skip
    analysis = analysis_of([make_run(tmp_path, "c", concentrated_scores(), k=10)])
    lines = _tail([finding], analysis)
    assert lines[0] == "1 further finding:"
    assert not any("**" in line for line in lines)


def test_cli_writes_markdown_json_and_figures_with_relative_links(tmp_path, capsys):
    a = make_run(tmp_path, "a", concentrated_scores(), k=10)
    b = make_run(tmp_path, "b", random_scores(1), k=10, metric="magnitude")
    out = tmp_path / "reports" / "r.md"
    assert main(["report", str(a), str(b), "--output", str(out), "--ks", "5,10", "--sample", "500"]) == 0
    text = out.read_text()
    assert out.with_suffix(".json").exists()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links and all(not link.startswith("/") and (out.parent / link).exists() for link in links)
    assert main(["report", str(a), "--output", str(tmp_path / "r.txt")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ".md" in err[0], err


def test_incomplete_run_directories_are_skipped_with_a_note(tmp_path, capsys):
    good = make_run(tmp_path, "exp", random_scores(1), k=10)
    failed = tmp_path / "exp" / "version_1"
    failed.mkdir()  # a crashed run: no summary.json
    out = report([str(good), str(failed)], tmp_path / "r.md", ks="5,10", sample=500, figures=False)
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["runs"] == ["exp/version_0"] and len(saved["skipped"]) == 1 and "version_1" in saved["skipped"][0]
    assert "version_1" in capsys.readouterr().err
    with pytest.raises(CwaError, match="none of the given directories is a complete run"):
        report([str(failed)], tmp_path / "r.md")


def test_findings_are_dataclasses_with_their_threshold(tmp_path):
    """Every finding of a concentrated run is a Finding carrying the threshold its verdict is gated on, and its
    value is on the verdict's side of that threshold."""
    run = make_run(tmp_path, "conc", concentrated_scores(), k=10)
    found = analysis_of([run], location_k=20).findings
    gates = {  # verdict -> (threshold, the value clears it)
        "concentrated": (CONCENTRATED_FACTOR, lambda v, t: v >= t),
        "enriched_module": (ENRICHED_FACTOR, lambda v, t: v >= t),
        "enriched_layer": (ENRICHED_FACTOR, lambda v, t: v >= t),
        "recurs": (ALPHA, lambda v, t: v < t),
        "residual_dimension_recurs": (ALPHA, lambda v, t: v < t),
    }
    assert {f.verdict for f in found} >= {"concentrated", "enriched_module", "recurs", "residual_dimension_recurs"}
    for f in found:
        assert dataclasses.is_dataclass(f) and isinstance(f, Finding) and f.runs == (0,) and f.statistic
        threshold, clears = gates[f.verdict]
        assert f.threshold == threshold and clears(f.value, f.threshold), f
        assert f.as_dict()["threshold"] == threshold  # the JSON carries it too


def test_units_and_sets_are_neither_controls_nor_mislabelled(tmp_path):
    """Leave-one-out sets and pairs are not controls; a control is compared with the top-K of its own unit."""
    base = {"perturbation": "zero", "seed": "", "rank": "", "n_weights": 10, "perplexity": 30.0, "nll": 3.4,
            "accuracy": 0.3, "delta_nll": 0.1, "delta_nll_low": 0.05, "delta_nll_high": 0.2,
            "delta_accuracy": 0.0, "delta_accuracy_low": 0.0, "delta_accuracy_high": 0.0, "p_value_vs": "baseline",
            "delta_perplexity": 0.0, "delta_perplexity_low": 0.0, "delta_perplexity_high": 0.0,
            "p_value": ""}  # fmt: skip
    big = {"delta_perplexity": 12.0, "delta_perplexity_low": 8.0, "delta_perplexity_high": 16.0, "p_value": 0.001}
    small = {"delta_perplexity": 0.01, "delta_perplexity_low": -0.02, "delta_perplexity_high": 0.03}
    rows = [
        {**base, "condition": "baseline", "target": "baseline", "perturbation": "", "n_weights": 0},
        {**base, **big, "condition": "zero/topk/k=10", "target": "topk", "k": 10},
        {
            **base,
            **small,
            "condition": "zero/leave_one_out/k=10/without=3",
            "target": "leave_one_out",
            "k": 10,
            "rank": 3,
            "n_weights": 9,
            "p_value": 0.002,
            "p_value_vs": "topk",
        },  # fmt: skip
        {
            **base,
            **small,
            "condition": "zero/pair/ranks=1+2",
            "target": "pair",
            "ranks": "1+2",
            "n_weights": 2,
            "p_value": 0.5,
        },  # fmt: skip
        {
            **base,
            **small,
            "condition": "zero/topk/k=10/unit=row",
            "target": "topk",
            "k": 10,
            "unit": "row",
            "n_weights": 160,
            "p_value": 0.4,
        },  # fmt: skip
        {
            **base,
            **small,
            "condition": "zero/random_matched/k=10/seed=0/unit=row",
            "target": "random_matched",
            "k": 10,
            "seed": 0,
            "unit": "row",
            "n_weights": 160,
            "p_value": 0.003,
            "p_value_vs": "topk",
        },  # fmt: skip
    ]
    run = make_run(tmp_path, "u", random_scores(1), k=10, perturb_rows=rows)
    output = report([str(run)], tmp_path / "out" / "report.md", ks=[10], sample=5000)
    analysis = analysis_of([run])
    found = analysis.of("perturbation")
    # The weight-level top-10 raises perplexity; the row-level top-10 has no detectable effect; the row-level
    # random control is not "cheaper than the top-K" (its top-K, of rows, costs no more), and the leave-one-out
    # set, tested against the joint set, is no control at all.
    assert sorted((f.verdict, f.numbers["unit"]) for f in found) == [
        ("no_effect", "row"),
        ("raises_perplexity", "weight"),
    ]
    text = output.read_text()
    assert "| leave_one_out | zero | 10 − #3 |" in text and "| pair | zero | #1+#2 |" in text
    assert "| topk (rows) | zero | 10 |" in text and "| random_matched (rows) | zero | 10 |" in text
    assert "zero of the rows of the top 10 (160 weights) has no detectable effect" in text


def test_a_registered_finding_source_reaches_the_analysis_and_the_report(tmp_path, monkeypatch):
    from cwa.report import findings

    monkeypatch.setattr(findings, "FINDING_SOURCES", {})
    monkeypatch.setattr("cwa.report.analysis.FINDING_SOURCES", findings.FINDING_SOURCES)

    @findings.finding_source
    def loss_findings(runs):
        return [
            Finding("reproducibility", "high_loss", (i,), "mean calibration NLL", r.summary.mean_loss, 2.0)
            for i, r in enumerate(runs)
            if r.summary.mean_loss > 2.0
        ]

    run = make_run(tmp_path, "l", random_scores(1), k=10)  # mean_loss 2.5
    analysis = analysis_of([run])
    (found,) = [f for f in analysis.findings if f.verdict == "high_loss"]
    assert (found.runs, found.value, found.threshold) == ((0,), 2.5, 2.0)
    assert "- R1: high_loss (mean calibration NLL = 2.500)." in text_of(analysis, tmp_path)


def test_copies_of_a_run_are_reported_once(tmp_path, capsys):
    """The same run given under three paths (copies) used to triple every finding; the copies are left out
    with a note, and the report's findings are those of the one run."""
    import shutil

    run = make_run(tmp_path, "c", concentrated_scores(), k=10)
    copies = [tmp_path / "copy1" / "version_0", tmp_path / "copy2" / "version_0"]
    for copy in copies:
        shutil.copytree(run, copy)
    single = report([str(run)], tmp_path / "one.md", ks=[10], sample=500, figures=False)
    triple = report([str(run), *map(str, copies)], tmp_path / "three.md", ks=[10], sample=500, figures=False)
    err = capsys.readouterr().err
    assert err.count("left out: a copy of") == 2
    one, three = (json.loads(p.with_suffix(".json").read_text())["findings"] for p in (single, triple))
    assert len(three) == len(one)


# -- issue 20: no row left out of the effects figure; no certainty claimed for where the top-K sit ----------
def test_structural_p_values_are_floored_with_the_rule_stated(tmp_path):
    from cwa.report.findings import STRUCTURAL_P_FLOOR

    run = make_run(tmp_path, "conc", concentrated_scores(), k=10)
    analysis = analysis_of([run], location_k=20)
    where = analysis.of("placement")
    assert {f.verdict for f in where} >= {"enriched_module", "recurs", "residual_dimension_recurs"}
    assert all(f.numbers["p_adjusted"] >= STRUCTURAL_P_FLOOR for f in where)
    assert any(f.numbers["p_adjusted"] == STRUCTURAL_P_FLOOR for f in where)  # these ones were ~1e-17
    text = text_of(analysis, tmp_path)
    assert "adjusted binomial p < 1e-06" in text and not re.search(r"p = \d\.\de-(0[7-9]|[1-9]\d)", text)
    assert "floored at 1e-06" in text  # the rule, in the Method section


def test_every_perturbation_row_is_in_some_page_of_the_effects_figure(tmp_path):
    base = {"condition": "c", "perturbation": "zero", "k": 10, "rank": "", "seed": "", "n_weights": 10,
            "perplexity": 20.0, "nll": 3.0, "accuracy": 0.3, "delta_nll": 0.0, "delta_nll_low": 0.0,
            "delta_nll_high": 0.0, "delta_accuracy": 0.0, "delta_accuracy_low": 0.0, "delta_accuracy_high": 0.0,
            "p_value_vs": "baseline"}  # fmt: skip
    null = {"delta_perplexity": 0.1, "delta_perplexity_low": -0.2, "delta_perplexity_high": 0.3, "p_value": 0.5}
    rows = [{**base, "target": "baseline", "n_weights": 0, **null, "p_value": ""}]
    rows += [{**base, "target": "random_matched", "seed": s, **null} for s in range(70)]
    rows += [{**base, "target": "topk", "delta_perplexity": 9.0, "delta_perplexity_low": 5.0,
              "delta_perplexity_high": 12.0, "p_value": 0.001}]  # fmt: skip
    quiet = make_run(tmp_path, "a", random_scores(1), k=10, perturb_rows=rows[:-1])
    loud = make_run(tmp_path, "b", random_scores(1), k=10, perturb_rows=rows)
    output = report([str(quiet), str(loud)], tmp_path / "out" / "r.md", ks=[10], sample=200)
    text = output.read_text()
    for name in ("perturbation_effects.png", "perturbation_effects_2.png", "perturbation_effects_3.png"):
        assert f"r-figures/{name})" in text and (tmp_path / "out" / "r-figures" / name).exists()
    from cwa.report.recipe import FOREST_ROWS, forest_pages

    pages = forest_pages(analysis_of([quiet, loud]))
    assert [len(p) for p in pages] == [FOREST_ROWS, FOREST_ROWS, 141 - 2 * FOREST_ROWS]
    assert pages[0][0]["label"].startswith("R2 · topk") and pages[0][0]["significant"]  # significant first
