"""cwa report on artificial runs: every section, and no finding that the numbers contradict."""

from __future__ import annotations

import re

import pytest
import torch
from test_compare import LAYOUT, make_run, random_scores

from cwa.errors import CwaError
from cwa.report import build_report, main
from cwa.runs import load_runs

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


def report_text(tmp_path, runs, **kwargs) -> str:
    text, _ = build_report(load_runs(runs), tmp_path / "out" / "report.md", [10], sample=5000, **kwargs)
    return text


def _finding_lines(text: str, heading: str) -> list[str]:
    section = text.split(heading, 1)[1].split("\n### ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("- ")]


def test_uniform_scores_make_no_concentration_claim(tmp_path):
    run = make_run(tmp_path, "uniform", uniform_scores(), k=10, metric="magnitude")
    text = report_text(tmp_path, [run], figures=False)
    for section in SECTIONS:
        assert section in text
    findings = _finding_lines(text, "### How concentrated the scores are")
    assert not any("are concentrated" in line for line in findings)
    assert any("close to evenly spread" in line for line in findings)
    assert "1.03% (7)" in text  # the top 1% of 680 weights is 7 of them: 7/680 of the mass
    where = _finding_lines(text, "### Where the critical weights live")
    assert len(where) == 1 and where[0].startswith("- No module type")  # a tie-break is not a finding
    assert "tied at the cutoff" in text
    assert "no claim that the selected weights matter" in text


def test_concentrated_run_is_called_concentrated_with_its_numbers(tmp_path):
    run = make_run(tmp_path, "conc", concentrated_scores(), k=10)
    text = report_text(tmp_path, [run], figures=False, location_k=20)
    findings = _finding_lines(text, "### How concentrated the scores are")
    (claim,) = [line for line in findings if "are concentrated" in line]
    share = float(re.search(r"top 1% hold ([0-9.]+)%", claim).group(1))
    assert share > 10.0  # the threshold the claim is gated on
    where = _finding_lines(text, "### Where the critical weights live")
    assert any("input column 5 of `self_attn.q_proj` recurs" in line for line in where)
    assert any("`self_attn.q_proj` holds 19 of the top 20" in line for line in where)
    assert any("residual-stream dimension 5 recurs" in line and "`norm`" in line for line in where)


def test_agreement_claims_follow_the_correlations(tmp_path):
    base = random_scores(1)
    noisy = {n: s + 0.01 * torch.rand(s.shape, generator=torch.Generator().manual_seed(2)) for n, s in base.items()}
    a = make_run(tmp_path, "a", base, k=10)
    b = make_run(tmp_path, "b", noisy, k=10, metric="magnitude")
    c = make_run(tmp_path, "c", random_scores(7), k=10, metric="hutchinson_diag")
    text = report_text(tmp_path, [a, b, c], figures=False)
    claims = _finding_lines(text, "### Agreement between runs")
    ab = [line for line in claims if line.startswith("- [0]") and "and [1]" in line]
    assert ab and "rank the weights alike" in ab[0]
    ac = [line for line in claims if "and [2]" in line]
    assert all("alike" not in line for line in ac)
    assert any("rank the weights differently" in line for line in ac)


def test_stability_and_reproducibility_sections(tmp_path):
    runs = [make_run(tmp_path, f"s{seed}", random_scores(seed), k=10, seed=seed) for seed in range(3)]
    same = make_run(tmp_path, "s0", random_scores(0), k=10, seed=0, version=1)
    text = report_text(tmp_path, [*runs, same], figures=False)
    stability = text.split("### Stability over calibration subsets", 1)[1].split("### ", 1)[0]
    assert "seeds [0, 1, 2, 0]" not in stability  # a repeat with the same seed is not a new calibration subset
    assert "seeds [0, 1, 2] (3 runs)" in stability
    assert "mean pairwise Jaccard" in stability
    assert "the analysis is deterministic" in text


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
    text = report_text(tmp_path, [run])
    assert (tmp_path / "out" / "report-figures" / "perturbation_effects.png").exists()
    claims = _finding_lines(text, "### Perturbation effects")
    assert any("raises held-out perplexity" in c and "12.000 [8.000, 16.000]" in c for c in claims)
    assert any("costs more than the random_matched control" in c for c in claims)

    null = [rows[0], {**rows[1], "delta_perplexity": 0.1, "delta_perplexity_low": -0.2, "p_value": 0.4}]
    run = make_run(tmp_path, "q", random_scores(1), k=10, perturb_rows=null)
    text = report_text(tmp_path / "q", [run], figures=False)
    claims = _finding_lines(text, "### Perturbation effects")
    assert not any("raises" in c for c in claims)
    assert any("no detectable effect" in c for c in claims)


def test_cli_writes_markdown_json_and_figures_with_relative_links(tmp_path):
    a = make_run(tmp_path, "a", concentrated_scores(), k=10)
    b = make_run(tmp_path, "b", random_scores(1), k=10, metric="magnitude")
    out = tmp_path / "reports" / "r.md"
    assert main([str(a), str(b), "--output", str(out), "--ks", "5,10", "--sample", "500"]) == 0
    text = out.read_text()
    assert out.with_suffix(".json").exists()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links and all(not link.startswith("/") and (out.parent / link).exists() for link in links)
    with pytest.raises(CwaError, match=r"\.md"):
        main([str(a), "--output", str(tmp_path / "r.txt")])
