"""Bootstrap intervals and the paired sign-flip test of cwa.stats."""

from __future__ import annotations

import math

import pytest
import torch

from cwa.stats import SequenceStats, bootstrap_deltas, bootstrap_weights, paired_sign_flip_test


def _stats(nll_per_token: torch.Tensor, tokens: int = 50, accuracy: float = 0.4) -> SequenceStats:
    n = nll_per_token.numel()
    return SequenceStats(nll_per_token * tokens, torch.full((n,), float(tokens)), torch.full((n,), accuracy * tokens))


def test_sequence_stats_values() -> None:
    stats = SequenceStats(torch.tensor([10.0, 30.0]), torch.tensor([10.0, 10.0]), torch.tensor([5.0, 3.0]))
    assert stats.mean_nll == pytest.approx(2.0)
    assert stats.perplexity == pytest.approx(math.exp(2.0))
    assert stats.accuracy == pytest.approx(0.4)


def test_bootstrap_weights_are_resamples() -> None:
    weights = bootstrap_weights(7, resamples=50, seed=1)
    assert weights.shape == (50, 7)
    assert torch.all(weights.sum(1) == 7)
    assert torch.equal(weights, bootstrap_weights(7, resamples=50, seed=1))


def test_nothing_perturbed_gives_zero_interval_and_p_one() -> None:
    torch.manual_seed(0)
    base = _stats(2.0 + torch.rand(40))
    same = SequenceStats(base.nll.clone(), base.tokens.clone(), base.correct.clone())
    deltas = bootstrap_deltas(base, same, bootstrap_weights(40, 500), 0.95)
    for metric, (delta, low, high) in deltas.items():
        assert delta == 0.0 and low == 0.0 and high == 0.0, metric
    assert paired_sign_flip_test(base, same) == 1.0
    assert paired_sign_flip_test(_stats(2.0 + torch.rand(10)), _stats(2.0 + torch.rand(10))) <= 1.0


def test_tiny_noise_gives_tight_interval_around_zero() -> None:
    torch.manual_seed(0)
    base = _stats(2.0 + torch.rand(64))
    noisy = _stats(base.nll / 50 + 1e-4 * torch.randn(64))
    delta, low, high = bootstrap_deltas(base, noisy, bootstrap_weights(64, 1000), 0.95)["nll"]
    assert low <= delta <= high
    assert low < 0 < high
    assert high - low < 1e-4
    assert paired_sign_flip_test(noisy, base) > 0.05


def test_consistent_shift_is_detected() -> None:
    torch.manual_seed(0)
    base = _stats(2.0 + torch.rand(32))
    worse = _stats(base.nll / 50 + 0.05 + 0.01 * torch.randn(32))
    delta, low, high = bootstrap_deltas(base, worse, bootstrap_weights(32, 1000), 0.95)["nll"]
    assert 0 < low < delta < high
    assert delta == pytest.approx(0.05, abs=0.01)
    ppl_delta, ppl_low, ppl_high = bootstrap_deltas(base, worse, bootstrap_weights(32, 1000), 0.95)["perplexity"]
    assert ppl_delta == pytest.approx(worse.perplexity - base.perplexity)
    assert 0 < ppl_low < ppl_high
    assert paired_sign_flip_test(worse, base, permutations=2000) < 0.001


def test_exact_and_random_sign_flip_tests_agree() -> None:
    torch.manual_seed(1)
    a = _stats(2.0 + torch.rand(12))
    b = _stats(a.nll / 50 + 0.01 * torch.randn(12) + 0.004)
    exact = paired_sign_flip_test(a, b, exact_up_to=16)
    sampled = paired_sign_flip_test(a, b, permutations=20000, exact_up_to=0)
    assert 0 < exact <= 1
    assert sampled == pytest.approx(exact, abs=0.02)


def test_non_finite_differences_give_nan() -> None:
    a = _stats(torch.tensor([1.0, 2.0, 3.0]))
    b = _stats(torch.tensor([1.0, float("inf"), 3.0]))
    assert math.isnan(paired_sign_flip_test(a, b))
