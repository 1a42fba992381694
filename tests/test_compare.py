"""cwa compare: statistics against hand-computed values, on small artificial run directories."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_run
from scipy import stats

from cwa.cli import main
from cwa.common.errors import CwaError
from cwa.compare.recipe import compare, compare_runs, parse_ks
from cwa.rundir import Run
from cwa.rundir import load_runs as load_runs_with_notes
from cwa.scoring import agreement
from cwa.scoring.topk import select_topk

LAYOUT = {
    "model.embed_tokens.weight": (12, 8),
    "model.layers.0.self_attn.q_proj.weight": (8, 8),
    "model.layers.0.mlp.down_proj.weight": (8, 16),
    "model.layers.1.self_attn.q_proj.weight": (8, 8),
    "model.layers.1.mlp.down_proj.weight": (8, 16),
    "model.layers.2.self_attn.q_proj.weight": (8, 8),
    "model.layers.2.mlp.down_proj.weight": (8, 16),
    "model.norm.weight": (8,),
}
MODEL_PARAMETERS = sum(math.prod(shape) for shape in LAYOUT.values())


def random_scores(seed: int, layout: dict = LAYOUT) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(s, generator=g) for n, s in layout.items()}


def make_run(
    root: Path,
    name: str,
    scores: dict[str, torch.Tensor],
    *,
    metric: str = "grad_x_weight",
    mode: str = "global",
    k: int = 10,
    seed: int = 0,
    save_scores: bool = True,
    version: int = 0,
    perturb_rows: list[dict] | None = None,
) -> Path:
    """A fit-sensitivity run directory of a tiny Llama's layout with the given scores (helpers.write_run)."""
    numel = sum(s.numel() for s in scores.values())
    return write_run(
        root / name / f"version_{version}",
        scores,
        metric=metric,
        mode=mode,
        k=k,
        save_scores=save_scores,
        perturb_rows=perturb_rows,
        created="2026-01-01T00:00:00+00:00",
        model_class="LlamaForCausalLM",
        dtype="float32",
        num_parameters=MODEL_PARAMETERS,  # the model's, whatever the run scores of it
        num_scored=numel,
        scored_tensors=len(scores),
        samples=8,
        tokens=1024,
        mean_loss=2.5,
        perplexity=math.exp(2.5),
        seed=seed,
        data={
            "source": "pydoc",
            "seq_len": 128,
            "num_samples": 8,
            "seed": seed,
            "calibration_fingerprint": f"cal{seed}",
            "heldout_fingerprint": "held",
        },
        data_fingerprint=f"cal{seed}",
        world_size=1,
        strategy="SingleDeviceStrategy",
        timings={"accumulate_s": 1.0},
        memory={"peak_rss_mib": 100.0},
        environment={"versions": {"torch": "2.13"}, "git_commit": "abc123", "device_count": 0},
    )


def load_runs(paths: list) -> list[Run]:
    """The runs, failing on any directory that is not a complete run."""
    runs, _ = load_runs_with_notes(paths)
    return runs


# -- pure statistics ------------------------------------------------------------------------------
def test_jaccard_and_overlap_by_hand():
    assert agreement.jaccard({1, 2, 3}, {2, 3, 4}) == 0.5
    assert agreement.overlap_coefficient({1, 2, 3}, {2, 3, 4}) == pytest.approx(2 / 3)
    assert agreement.overlap_coefficient({1, 2}, {1, 2, 3, 4}) == 1.0
    assert agreement.jaccard({1, 2}, {1, 2, 3, 4}) == 0.5
    assert agreement.jaccard({1}, {2}) == 0.0
    assert agreement.jaccard(set(), set()) == 1.0


def test_rank_correlations_by_hand_and_against_scipy():
    x, y = [1, 2, 3, 4, 5], [2, 1, 4, 3, 5]
    # No ties: rho = 1 - 6·Σd²/(n(n²-1)) = 1 - 6·4/120; tau = (8 concordant - 2 discordant)/10.
    assert agreement.spearman(x, y).value == pytest.approx(0.8)
    assert agreement.kendall(x, y).value == pytest.approx(0.6)
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=50), rng.normal(size=50)
    b[:10] = a[:10]
    rho = agreement.spearman(a, b)
    assert rho.value == pytest.approx(stats.spearmanr(a, b).statistic)
    assert rho.low < rho.value < rho.high
    z, se = math.atanh(rho.value), 1.06 / math.sqrt(47)
    assert rho.low == pytest.approx(math.tanh(z - 1.959963984540054 * se))
    assert agreement.kendall(a, b).value == pytest.approx(stats.kendalltau(a, b).statistic)
    assert math.isnan(agreement.spearman([1, 1, 1, 1], [1, 2, 3, 4]).value)


def test_gini_and_concentration_by_hand():
    assert agreement.gini(np.ones(1000)) == pytest.approx(0.0, abs=1e-12)
    one_hot = np.zeros(1000)
    one_hot[7] = 3.0
    assert agreement.gini(one_hot) == pytest.approx(999 / 1000)
    # Σ_ij |xi - xj| / (2 n² mean) for [1, 2, 3, 4] = 20 / 80.
    assert agreement.gini([4, 1, 3, 2]) == pytest.approx(0.25)
    assert agreement.gini([-4, 1, -3, 2]) == pytest.approx(0.25)  # ranked by magnitude
    values = np.ones(10_000, dtype=np.float32)
    values[123] = 9999.0
    c = agreement.concentration(values.copy())
    assert c["top_shares"]["0.0001"]["count"] == 1
    assert c["top_shares"]["0.0001"]["share"] == pytest.approx(0.5)
    assert c["top_shares"]["0.01"]["count"] == 100
    assert c["top_shares"]["0.01"]["share"] == pytest.approx((9999 + 99) / 19998)
    uniform = agreement.concentration(np.full(10_000, 0.5, dtype=np.float32))
    assert uniform["top_shares"]["0.01"]["share"] == pytest.approx(0.01)
    assert uniform["gini"] == pytest.approx(0.0, abs=1e-9)


def test_stability_interval_and_too_few_runs():
    m = np.array([[1, 0.5, 0.3], [0.5, 1, 0.4], [0.3, 0.4, 1]])
    s = agreement.stability(m, resamples=500)
    assert s["mean"] == pytest.approx(0.4)
    assert 0.3 <= s["low"] <= s["mean"] <= s["high"] <= 0.5
    two = agreement.stability(np.array([[1, 0.2], [0.2, 1]]))
    assert two["mean"] == pytest.approx(0.2) and two["low"] is None and "too few" in two["note"]
    low, high = agreement.bootstrap_interval(lambda idx: 3.0, 10, resamples=50)
    assert low == high == 3.0


# -- run directories ------------------------------------------------------------------------------
def test_run_loader_errors(tmp_path):
    with pytest.raises(CwaError, match="not a directory"):
        Run.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CwaError, match="no summary.json"):
        Run.load(tmp_path / "empty")
    run = make_run(tmp_path, "a", random_scores(0))
    summary = json.loads((run / "summary.json").read_text())
    summary["status"] = "running"
    (run / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(CwaError, match="not a complete run"):
        Run.load(run)


def _scores_with_top(top: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
    """Scores in [0, 1) except the given weights, which get 10, 9, 8, ... in that order."""
    scores = {n: torch.rand(s, generator=torch.Generator().manual_seed(5)) * 0.5 for n, s in LAYOUT.items()}
    for rank, (name, index) in enumerate(top):
        scores[name].view(-1)[index] = 10.0 - rank
    return scores


def test_overlap_of_known_topk_sets(tmp_path):
    q, d = "model.layers.0.self_attn.q_proj.weight", "model.layers.2.mlp.down_proj.weight"
    a = make_run(tmp_path, "a", _scores_with_top([(q, 1), (q, 2), (d, 3)]), k=3)
    b = make_run(tmp_path, "b", _scores_with_top([(q, 2), (d, 3), (d, 4)]), k=3, metric="magnitude")
    result = compare_runs(load_runs([a, b]), [3], sample=200)
    assert result.ks == [3]
    assert result.jaccard(3, 0, 1) == pytest.approx(0.5)
    assert result.overlap[3].overlap_coefficient[0][1] == pytest.approx(2 / 3)
    # Below the planted weights both runs share the same scores, so the random sample ranks alike.
    assert result.sample_spearman(0, 1).value > 0.95
    union = result.topk_union[3].spearman[0][1]
    assert union.n == 4


def test_correlations_match_scipy_on_the_same_weights(tmp_path):
    a = make_run(tmp_path, "a", random_scores(1), k=20)
    b = make_run(tmp_path, "b", random_scores(2), k=20)
    runs = load_runs([a, b])
    result = compare_runs(runs, [20], sample=10**9)  # capped at every weight
    sa = torch.cat([s.reshape(-1) for s in random_scores(1).values()]).numpy()
    sb = torch.cat([s.reshape(-1) for s in random_scores(2).values()]).numpy()
    sample = result.random_sample
    assert sample.size == sa.size
    assert sample.spearman[0][1].value == pytest.approx(stats.spearmanr(sa, sb).statistic, abs=1e-9)
    assert sample.kendall[0][1].value == pytest.approx(stats.kendalltau(sa, sb).statistic, abs=1e-9)
    keys = sorted(set(runs[0].topk_keys(20)) | set(runs[1].topk_keys(20)))
    x = [random_scores(1)[n].reshape(-1)[i].item() for n, i in keys]
    y = [random_scores(2)[n].reshape(-1)[i].item() for n, i in keys]
    union = result.topk_union[20].spearman[0][1]
    assert union.n == len(keys)
    assert union.value == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-6)


def test_per_layer_run_gives_exact_global_topk_from_csv(tmp_path):
    scores = random_scores(3)
    run = make_run(tmp_path, "p", scores, mode="per_layer", k=5)
    (run / "scores.safetensors").unlink()
    loaded = Run.load(run)
    assert loaded.max_global_k == 5
    expected = select_topk(scores, 5, "global")
    got = loaded.global_topk(5)
    assert got.param.tolist() == expected.param.tolist() and got.index.tolist() == expected.index.tolist()
    assert loaded.global_topk(6) is None


def test_missing_scores_fall_back_to_csv_with_a_note(tmp_path):
    a = make_run(tmp_path, "a", random_scores(1), k=10)
    b = make_run(tmp_path, "b", random_scores(1), k=10, save_scores=False)
    result = compare_runs(load_runs([a, b]), [10, 50])
    assert result.ks == [10]
    assert any("saved no scores" in n for n in result.notes)
    assert any("K=50 dropped" in n for n in result.notes)
    assert result.random_sample is None
    assert result.jaccard(10, 0, 1) == 1.0
    assert result.topk_union[10].spearman[0][1].value == pytest.approx(1.0)


def test_different_parameter_sets_compare_only_the_common_ones(tmp_path):
    """Run b scores no embedding. The scores are compared on the 7 tensors both score: over all their weights
    they are identical (ρ = 1), while the embedding, where a's scores are the reverse of anything b could
    hold, is never read; the top-K sets, selected over different parameter sets, still compare as they are."""
    scores = random_scores(1)
    embed = "model.embed_tokens.weight"
    scores[embed] = scores[embed] * 0.01  # a's top-5 lies in the common tensors
    a = make_run(tmp_path, "a", scores, k=5)
    b = make_run(tmp_path, "b", {n: s for n, s in scores.items() if n != embed}, k=5)
    result = compare_runs(load_runs([a, b]), [5], sample=10**9)  # capped at every common weight
    common = sum(s.numel() for n, s in scores.items() if n != embed)
    assert result.random_sample.size == common == 680 - 96
    assert result.sample_spearman(0, 1).value == pytest.approx(1.0)
    assert result.jaccard(5, 0, 1) == 1.0 and result.topk_union[5].spearman[0][1].n == 5
    (note,) = [n for n in result.notes if "different parameters" in n]
    assert "a/version_0: 8 tensors" in note and "b/version_0: 7 tensors" in note and "on the 7 tensors" in note

    # An embedding weight in a's top-5 puts that K outside the common tensors: no top-K union correlation there.
    scores[embed].view(-1)[0] = 100.0
    c = make_run(tmp_path, "c", scores, k=5)
    result = compare_runs(load_runs([c, b]), [5], sample=10**9)
    assert result.topk_union == {} and result.random_sample.size == common
    assert result.jaccard(5, 0, 1) == pytest.approx(4 / 6)


def test_stability_groups_runs_that_differ_only_in_seed(tmp_path):
    runs = [make_run(tmp_path, f"s{seed}", random_scores(seed), k=10, seed=seed) for seed in range(3)]
    other = make_run(tmp_path, "m", random_scores(9), k=10, metric="magnitude")
    loaded = load_runs([*runs, other])
    result = compare_runs(loaded, [10])
    (group,) = result.stability
    assert group.seeds == [0, 1, 2]
    jac = np.array(result.overlap[10].jaccard)
    expected = np.mean([jac[0, 1], jac[0, 2], jac[1, 2]])
    assert group.by_k[10].mean == pytest.approx(expected, abs=1e-6)


def test_cli_writes_json_and_figures(tmp_path, capsys):
    a = make_run(tmp_path, "a", random_scores(1), k=10)
    b = make_run(tmp_path, "b", random_scores(2), k=10, metric="magnitude")
    out = tmp_path / "cmp"
    assert main(["compare", str(a), str(b), "--ks", "5,10", "--sample", "300", "--output", str(out)]) == 0
    result = json.loads((out / "compare.json").read_text())
    assert result["ks"] == [5, 10]
    assert all((out / f).exists() for f in result["figures"])
    printed = capsys.readouterr().out
    assert "J@10" in printed and str(out) in printed
    assert main(["compare", str(a)]) == 1
    assert "at least two different complete run directories" in capsys.readouterr().err
    with pytest.raises(CwaError):
        parse_ks("ten")


def test_compare_skips_incomplete_run_directories_with_a_note(tmp_path, capsys):
    a = make_run(tmp_path, "exp", random_scores(1), k=10)
    b = make_run(tmp_path, "exp", random_scores(2), k=10, version=1)
    failed = tmp_path / "exp" / "version_2"
    failed.mkdir()  # a crashed run matched by lightning_logs/*/version_*
    out = compare([str(a), str(b), str(failed)], ks=[5, 10], sample=300, output=tmp_path / "cmp", figures=False)
    result = json.loads((out / "compare.json").read_text())
    assert [r["name"] for r in result["runs"]] == ["exp/version_0", "exp/version_1"]
    assert len(result["skipped"]) == 1 and "version_2" in result["skipped"][0]
    assert "version_2" in capsys.readouterr().err
    assert parse_ks("[10,100]") == parse_ks([100, 10]) == [10, 100]
    with pytest.raises(CwaError, match="at least two"):
        compare([str(a), str(failed)], output=tmp_path / "cmp2")
    with pytest.raises(CwaError, match="none of the given directories"):
        compare([str(failed)])


def test_a_figure_that_fails_costs_neither_compare_nor_report(tmp_path, monkeypatch, capsys):
    import cwa.report.figures
    from cwa.report.recipe import report

    def fail(*args, **kwargs):
        raise ValueError("Data cannot be log-scaled")

    monkeypatch.setattr(cwa.report.figures, "layer_distribution", fail)
    a = make_run(tmp_path, "a", random_scores(1), k=10)
    b = make_run(tmp_path, "b", random_scores(2), k=10, metric="magnitude")
    out = tmp_path / "cmp"
    assert main(["compare", str(a), str(b), "--ks", "5,10", "--sample", "300", "--output", str(out)]) == 0
    result = json.loads((out / "compare.json").read_text())
    assert "figures/topk_by_module.png" in result["figures"] and "figures/topk_by_layer.png" not in result["figures"]
    assert any("topk_by_layer.png was not drawn" in note for note in result["notes"])
    output = report([str(a), str(b)], tmp_path / "r.md", ks="5,10", sample=300)
    assert output.exists() and output.with_suffix(".json").exists()
    assert "topk_by_layer.png was not drawn" in capsys.readouterr().err
    assert "topk_by_layer.png" not in output.read_text()
