"""Studentized bootstrap intervals and the paired bootstrap-t test of cwa.ablation.stats."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cwa.ablation.stats import (
    METRICS,
    SequenceStats,
    bootstrap_deltas,
    bootstrap_t_p_value,
    bootstrap_weights,
    paired_bootstrap_test,
    studentized_interval,
    studentized_replicates,
)


def _stats(nll_per_token: torch.Tensor, tokens: int = 50, accuracy: float = 0.4) -> SequenceStats:
    n = nll_per_token.numel()
    return SequenceStats(nll_per_token * tokens, torch.full((n,), float(tokens)), torch.full((n,), accuracy * tokens))


def test_sequence_stats_values() -> None:
    stats = SequenceStats(torch.tensor([10.0, 30.0]), torch.tensor([10.0, 10.0]), torch.tensor([5.0, 3.0]))
    assert stats.mean_nll == pytest.approx(2.0)
    assert stats.perplexity == pytest.approx(math.exp(2.0))
    assert stats.accuracy == pytest.approx(0.4)
    assert stats.broken_fraction == 0.0
    broken = SequenceStats(torch.tensor([1.0, math.inf, math.nan, 2.0]), torch.ones(4), torch.ones(4))
    assert broken.broken.tolist() == [False, True, True, False]
    assert broken.broken_fraction == 0.5


def test_bootstrap_weights_are_resamples() -> None:
    weights = bootstrap_weights(7, resamples=50, seed=1)
    assert weights.shape == (50, 7)
    assert torch.all(weights.sum(1) == 7)
    assert torch.equal(weights, bootstrap_weights(7, resamples=50, seed=1))


def test_interval_and_p_value_match_a_loop_over_resamples() -> None:
    """Equal tokens: Δ NLL is the mean per-token difference, its standard error the plug-in sd / √n."""
    torch.manual_seed(3)
    n, resamples = 15, 400
    base = _stats(2.0 + torch.rand(n))
    other = _stats(base.nll / 50 + 0.02 + 0.05 * torch.rand(n) ** 3)
    weights = bootstrap_weights(n, resamples, seed=4)
    delta, low, high = bootstrap_deltas(base, other, weights, 0.9)["nll"]

    d = ((other.nll - base.nll) / 50).numpy()
    estimate, se = d.mean(), d.std() / math.sqrt(n)
    roots = []
    for row in weights.numpy():
        sample = np.repeat(d, row.astype(int))
        roots.append((sample.mean() - estimate) / (sample.std() / math.sqrt(n)))
    q_low, q_high = np.quantile(roots, [0.05, 0.95])
    assert delta == pytest.approx(estimate, rel=1e-10)
    assert low == pytest.approx(estimate - q_high * se, rel=1e-9)
    assert high == pytest.approx(estimate - q_low * se, rel=1e-9)
    observed = estimate / se
    expected_p = min(1.0, 2 * (1 + min(sum(r <= observed for r in roots), sum(r >= observed for r in roots))) / 401)
    assert paired_bootstrap_test(base, other, weights) == pytest.approx(expected_p)


def test_standard_error_is_the_gradient_of_the_statistic() -> None:
    """Unequal tokens, perplexity: the closed-form influence equals autograd's ∂θ/∂w_i at each resample."""
    torch.manual_seed(5)
    n = 9
    ta = torch.randint(20, 60, (n,)).double()
    xa = ta * (2.0 + torch.rand(n, dtype=torch.float64))
    xb = xa + ta * 0.3 * torch.rand(n, dtype=torch.float64)
    weights = bootstrap_weights(n, 6, seed=2)
    theta, se = studentized_replicates(xa, ta, xb, ta, weights, "exp")
    for row, (value, error) in enumerate(zip(theta, se, strict=True)):
        w = (torch.ones(n, dtype=torch.float64) if row == 0 else weights[row - 1]).clone().requires_grad_(True)
        statistic = torch.exp((w * xb).sum() / (w * ta).sum()) - torch.exp((w * xa).sum() / (w * ta).sum())
        (gradient,) = torch.autograd.grad(statistic, w)
        assert float(value) == pytest.approx(float(statistic), rel=1e-12)
        assert float(error) == pytest.approx(float((w * gradient**2).sum().sqrt()), rel=1e-9)


def test_nothing_perturbed_gives_zero_interval_and_p_one() -> None:
    torch.manual_seed(0)
    base = _stats(2.0 + torch.rand(40))
    same = SequenceStats(base.nll.clone(), base.tokens.clone(), base.correct.clone())
    weights = bootstrap_weights(40, 500)
    deltas = bootstrap_deltas(base, same, weights, 0.95)
    for metric, (delta, low, high) in deltas.items():
        assert delta == 0.0 and low == 0.0 and high == 0.0, metric
    assert paired_bootstrap_test(base, same, weights) == 1.0
    assert 0 < paired_bootstrap_test(_stats(2.0 + torch.rand(40)), _stats(2.0 + torch.rand(40)), weights) <= 1.0


def test_tiny_noise_gives_tight_interval_around_zero() -> None:
    torch.manual_seed(0)
    base = _stats(2.0 + torch.rand(64))
    noisy = _stats(base.nll / 50 + 1e-4 * torch.randn(64))
    weights = bootstrap_weights(64, 1000)
    delta, low, high = bootstrap_deltas(base, noisy, weights, 0.95)["nll"]
    assert low <= delta <= high
    assert low < 0 < high
    assert high - low < 1e-4
    assert paired_bootstrap_test(noisy, base, weights) > 0.05


def test_consistent_shift_is_detected() -> None:
    torch.manual_seed(0)
    base = _stats(2.0 + torch.rand(32))
    worse = _stats(base.nll / 50 + 0.05 + 0.01 * torch.randn(32))
    weights = bootstrap_weights(32, 1000)
    deltas = bootstrap_deltas(base, worse, weights, 0.95)
    delta, low, high = deltas["nll"]
    assert 0 < low < delta < high
    assert delta == pytest.approx(0.05, abs=0.01)
    ppl_delta, ppl_low, ppl_high = deltas["perplexity"]
    assert ppl_delta == pytest.approx(worse.perplexity - base.perplexity)
    assert 0 < ppl_low < ppl_delta < ppl_high
    assert paired_bootstrap_test(worse, base, bootstrap_weights(32, 2000, seed=1)) == pytest.approx(2 / 2001)


def test_few_sequences_cannot_give_a_small_p_value() -> None:
    """Sequences that all changed by the same amount have no spread: the p-value falls back to 2^(1-n)."""
    one = paired_bootstrap_test(_stats(torch.tensor([2.0])), _stats(torch.tensor([2.5])), bootstrap_weights(1, 100))
    two = _stats(torch.tensor([2.0, 3.0])), _stats(torch.tensor([2.5, 3.5]))
    assert one == 1.0
    assert paired_bootstrap_test(*two, bootstrap_weights(2, 100)) == 0.5


def test_non_finite_differences_give_nan() -> None:
    a = _stats(torch.tensor([1.0, 2.0, 3.0]))
    b = _stats(torch.tensor([1.0, float("inf"), 3.0]))
    assert math.isnan(paired_bootstrap_test(a, b, bootstrap_weights(3, 10)))


def test_coverage_and_false_positive_rate_hold_for_skewed_differences_at_24_sequences() -> None:
    """Monte Carlo at the README's sample size, n = 24, with exponential (skewness 2) per-sequence changes.

    With R = 2000 replications the Monte Carlo standard error of a coverage near 0.95 is
    sqrt(0.95 · 0.05 / 2000) = 0.0049 and of a rejection rate near 0.05 the same, so the bounds are
    coverage ≥ 0.93 (4 standard errors under nominal) and false-positive rate ≤ 0.05 + 3 · 0.0049 = 0.065.
    Measured on these data (499 resamples): coverage 0.945 (Δ NLL), 0.941 (Δ perplexity), false-positive rate
    0.047. The methods this replaced fail both bounds on the same data: percentile bootstrap 0.911 / 0.912, paired
    sign-flip test 0.074 (10,000 sign patterns).
    """
    replications, n, tokens, chunk = 2000, 24, 50.0, 250
    generator = torch.Generator().manual_seed(11)
    weights = bootstrap_weights(n, 499, seed=0)
    t = torch.full((replications, n), tokens, dtype=torch.float64)
    base = 3.0 + 0.3 * torch.randn(replications, n, dtype=torch.float64, generator=generator)
    skewed = 0.2 * (torch.empty(replications, n, dtype=torch.float64).exponential_(generator=generator) - 1.0)
    shift = 0.05
    truth = {"identity": shift, "exp": math.exp(3.0 + shift) - math.exp(3.0)}
    covered = {"identity": 0, "exp": 0}
    rejected = 0
    for first in range(0, replications, chunk):
        rows = slice(first, first + chunk)
        xa = base[rows] * tokens
        for transform in covered:
            theta, se = studentized_replicates(
                xa, t[rows], xa + (skewed[rows] + shift) * tokens, t[rows], weights, transform
            )
            low, high = studentized_interval(theta, se, 0.95)
            covered[transform] += int(((low <= truth[transform]) & (truth[transform] <= high)).sum())
        theta, se = studentized_replicates(xa, t[rows], xa + skewed[rows] * tokens, t[rows], weights)
        rejected += int((bootstrap_t_p_value(theta, se) <= 0.05).sum())
    coverage = {transform: count / replications for transform, count in covered.items()}
    false_positive_rate = rejected / replications
    assert min(coverage.values()) >= 0.93, coverage
    assert false_positive_rate <= 0.065, false_positive_rate


def test_a_bit_flip_to_inf_is_reported_as_broken_sequences(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Flipping the top exponent bit of an embedding entry equal to 1.0 makes it inf: exactly the sequences
    holding that token get a non-finite NLL, and the row says so instead of carrying statistics."""
    from conftest import tiny_llama

    from cwa.ablation.perturbations import BitFlip
    from cwa.perturb.console import print_table
    from cwa.perturb.evaluate import Condition, Result, StatisticsOptions, evaluate, perturb_rows
    from cwa.rundir import ConditionKind, read_perturb_csv, write_perturb_csv

    model = tiny_llama()
    generator = torch.Generator().manual_seed(0)
    blocks = torch.randint(2, 252, (12, 16), generator=generator)
    token = 1  # <eos>: placed in exactly 3 of the 12 sequences
    blocks[[0, 4, 9], 5] = token
    embedding = model.get_input_embeddings().weight
    baseline = Result(None, evaluate(model, blocks, 4, torch.device("cpu")), 0)
    with torch.no_grad():
        embedding[token, 0] = 1.0
        BitFlip("exponent_msb").write(embedding.data, torch.tensor([token * embedding.shape[1]]))
    assert math.isinf(float(embedding[token, 0]))
    flipped = Result(
        Condition(BitFlip("exponent_msb"), ConditionKind.TOPK, k=1), evaluate(model, blocks, 4, torch.device("cpu")), 1
    )
    assert flipped.evaluation.stats.broken.tolist() == [i in (0, 4, 9) for i in range(12)]

    base_row, row = perturb_rows(baseline, [flipped], StatisticsOptions(bootstrap=200, permutations=200))
    assert base_row.broken_fraction == 0.0 and row.broken_fraction == 0.25
    assert row.p_value is None and row.p_value_vs == "baseline"
    assert all(math.isnan(getattr(row, f"delta_{m}{s}")) for m in METRICS for s in ("", "_low", "_high"))
    assert math.isfinite(base_row.delta_nll)

    write_perturb_csv(tmp_path / "perturb.csv", [base_row, row])
    assert read_perturb_csv(tmp_path / "perturb.csv")[1].broken_fraction == 0.25
    with open(tmp_path / "perturb.csv", newline="") as handle:  # a CSV from before the column
        table = list(csv.DictReader(handle))
    with open(tmp_path / "old.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, [c for c in table[0] if c != "broken_fraction"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(table)
    assert [r.broken_fraction for r in read_perturb_csv(tmp_path / "old.csv")] == [None, None]

    print_table([base_row, row], "tiny", baseline.evaluation.stats, {}, [], tmp_path)
    assert "broken on 25% of sequences" in capsys.readouterr().out


def test_a_change_in_one_sequence_has_a_finite_interval_around_it():
    from cwa.ablation.stats import SequenceStats, bootstrap_deltas, bootstrap_weights

    n = 24
    nll = torch.full((n,), 40.0, dtype=torch.float64)
    tokens = torch.full((n,), 31.0, dtype=torch.float64)
    correct = torch.zeros(n, dtype=torch.float64)
    base = SequenceStats(nll, tokens, correct)
    changed = correct.clone()
    changed[3] = 1.0  # one more correct prediction, in one sequence only
    other = SequenceStats(nll + 0.01 * torch.arange(n), tokens, changed)
    deltas = bootstrap_deltas(base, other, bootstrap_weights(n, 999, seed=0), 0.95)
    for metric in ("accuracy", "nll", "perplexity"):
        delta, low, high = deltas[metric]
        assert all(map(math.isfinite, (delta, low, high))), (metric, deltas[metric])
        assert low <= delta <= high, (metric, deltas[metric])


def test_intervals_never_leave_the_range_of_their_quantity() -> None:
    """Δ perplexity cannot go below -baseline (a perplexity below zero), nor Δ accuracy outside [-acc, 1 - acc]:
    a few sequences with one large improvement used to give a studentized Δ perplexity bound far below
    -baseline; on the log scale the bound maps back inside the range and the interval still holds the estimate."""
    tokens = torch.full((4,), 10.0)
    base = SequenceStats(torch.tensor([40.0, 42.0, 90.0, 41.0]), tokens, torch.tensor([1.0, 9, 9, 2]))
    other = SequenceStats(torch.tensor([39.0, 44.0, 10.0, 40.0]), tokens, torch.tensor([10.0, 0, 0, 10]))
    deltas = bootstrap_deltas(base, other, bootstrap_weights(4, 2000), 0.95)
    delta, low, high = deltas["perplexity"]
    assert -base.perplexity <= low <= delta <= high
    assert delta == pytest.approx(other.perplexity - base.perplexity)
    nll_delta, nll_low, nll_high = deltas["nll"]
    assert low == pytest.approx(base.perplexity * math.expm1(nll_low))
    delta, low, high = deltas["accuracy"]
    assert -base.accuracy <= low <= delta <= high <= 1 - base.accuracy


@pytest.mark.parametrize("confidence", [0.5, 0.9, 0.95, 0.99])
def test_minimum_sequences_is_the_fewest_whose_test_can_reach_the_confidence(confidence: float) -> None:
    """n paired sequences give p ≥ 2^(1-n); the minimum is the first n whose floor is below 1 - confidence."""
    from cwa.ablation.stats import minimum_sequences

    n = minimum_sequences(confidence)
    assert 2.0 ** (1 - n) < 1 - confidence <= 2.0 ** (2 - n)
    assert minimum_sequences(0.95) == 6
