"""Per-sequence evaluation statistics, studentized bootstrap intervals and a paired bootstrap-t test.

The unit of resampling is the held-out *sequence* (a block of ``seq_len`` tokens): tokens inside a
block are not independent, blocks are treated as exchangeable. Every condition is evaluated on the
same blocks, so a condition and its reference are compared pairwise, block by block: one resample
picks the same blocks in both passes.

Why studentized (bootstrap-t) rather than percentile or BCa: cwa's runs hold a few dozen sequences
(24 in the README's run) and per-sequence changes are skewed (a perturbation hurts a few sequences a
lot). Simulated at n = 24 with exponential (skewness 2) paired differences, 95% intervals for the mean
covered the truth 90.7% of the time (percentile), 91.5% (BCa with jackknife acceleration) and 94.6%
(studentized, equal-tailed), 2000 replications each; ``tests/test_stats.py`` keeps that check. The
standard error of every statistic (a ratio of token-weighted sums, or the exponential of one) is its
delta-method (linearization) standard error, in closed form for the full sample and for each resample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

METRICS = ("perplexity", "nll", "accuracy")
Transform = Literal["identity", "exp"]


def exp_or_inf(x: float) -> float:
    """exp(x), inf past float range (a broken model's mean NLL) instead of an OverflowError; NaN stays NaN."""
    return math.inf if x >= 700 else math.exp(x)


@dataclass
class SequenceStats:
    """Per-sequence sums of one evaluation pass (float64, one entry per held-out sequence)."""

    nll: Tensor  # summed next-token NLL of the sequence
    tokens: Tensor  # predicted tokens in the sequence
    correct: Tensor  # tokens whose argmax prediction was right

    def __post_init__(self) -> None:
        self.nll, self.tokens, self.correct = (t.detach().double().cpu() for t in (self.nll, self.tokens, self.correct))

    def __len__(self) -> int:
        return int(self.nll.numel())

    @property
    def mean_nll(self) -> float:
        return float(self.nll.sum() / self.tokens.sum())

    @property
    def perplexity(self) -> float:
        return exp_or_inf(self.mean_nll)

    @property
    def accuracy(self) -> float:
        return float(self.correct.sum() / self.tokens.sum())

    @property
    def broken(self) -> Tensor:
        """Sequences whose summed NLL is inf or NaN (the model produced non-finite logits on them)."""
        return ~torch.isfinite(self.nll)

    @property
    def broken_fraction(self) -> float:
        return float(self.broken.double().mean()) if len(self) else 0.0

    def values(self) -> dict[str, float]:
        return {"perplexity": self.perplexity, "nll": self.mean_nll, "accuracy": self.accuracy}


def minimum_sequences(confidence: float) -> int:
    """The fewest held-out sequences whose paired test can reach p < 1 - ``confidence``: n paired sequences
    give a p-value of at least 2^(1-n) (:func:`paired_bootstrap_test`), so n must exceed 1 + log2(1 / (1 -
    confidence)); 6 at 95%. Fewer cannot tell an effect from noise at that confidence, and their intervals
    are degenerate (1 sequence) or unbounded in practice (2)."""
    return math.floor(1 + math.log2(1 / (1 - confidence))) + 1


def bootstrap_weights(n_sequences: int, resamples: int = 2000, seed: int = 0) -> Tensor:
    """(resamples, n_sequences) multiplicities of sequences in each bootstrap resample.

    One matrix shared by every condition keeps the intervals of all conditions on the same resamples.
    """
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, n_sequences, (resamples, n_sequences), generator=generator)
    weights = torch.zeros(resamples, n_sequences, dtype=torch.float64)
    return weights.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))


def studentized_replicates(
    xa: Tensor, ta: Tensor, xb: Tensor, tb: Tensor, weights: Tensor, transform: Transform = "identity"
) -> tuple[Tensor, Tensor]:
    """Paired change g(Σxb/Σtb) - g(Σxa/Σta) and its delta-method standard error, on the full sample
    and on each resample.

    With resample multiplicities w, the ratio is r = Σ w_i x_i / Σ w_i t_i; its influence on sequence i
    is (x_i - r t_i) / Σ w t, so the change has influence u_i = g'(r_b)(xb_i - r_b tb_i)/Σw tb -
    g'(r_a)(xa_i - r_a ta_i)/Σw ta (summing to zero under w) and standard error sqrt(Σ w_i u_i²).

    Args:
        xa: (..., n) per-sequence sums of the reference pass (NLL or correct predictions).
        ta: (..., n) per-sequence token counts of the reference pass.
        xb: (..., n) per-sequence sums of the other pass, same sequences.
        tb: (..., n) its token counts.
        weights: (resamples, n) multiplicities from :func:`bootstrap_weights`.
        transform: g, ``identity`` (mean NLL, accuracy) or ``exp`` (perplexity).

    Returns:
        (theta, se), each (..., 1 + resamples): index 0 is the full sample, then one per resample.
    """
    w = torch.cat([torch.ones_like(weights[:1]), weights])
    influences = []
    values = []
    for x, t in ((xb, tb), (xa, ta)):
        total = t @ w.T
        ratio = (x @ w.T) / total
        g = torch.exp(ratio) if transform == "exp" else ratio
        values.append(g)
        # in place: these are (..., 1 + resamples, n), the bulk of the work
        deviation = torch.addcmul(x.unsqueeze(-2), ratio.unsqueeze(-1), t.unsqueeze(-2), value=-1)
        influences.append(deviation.mul_(((g if transform == "exp" else 1.0) / total).unsqueeze(-1)))
    u = influences[0].sub_(influences[1]).square_().mul_(w)
    return values[0] - values[1], u.sum(-1).sqrt_()


def _roots(theta: Tensor, se: Tensor, null: Tensor) -> Tensor:
    """(..., resamples) bootstrap-t roots (θ* - θ̂) / se*; a resample with no spread and no change is 0."""
    roots = (theta[..., 1:] - null.unsqueeze(-1)) / se[..., 1:]
    return torch.nan_to_num(roots, nan=0.0, posinf=math.inf, neginf=-math.inf)


def studentized_interval(theta: Tensor, se: Tensor, confidence: float = 0.95) -> tuple[Tensor, Tensor]:
    """Equal-tailed studentized bootstrap interval [θ̂ - q(1-α/2) ŝe, θ̂ - q(α/2) ŝe], q the quantiles of
    the roots (θ* - θ̂) / se*.

    Args:
        theta: (..., 1 + resamples) from :func:`studentized_replicates`.
        se: their standard errors.
        confidence: coverage of the interval.
    """
    estimate, scale = theta[..., 0], se[..., 0]
    alpha = (1 - confidence) / 2
    probabilities = torch.tensor([alpha, 1 - alpha], dtype=theta.dtype)
    q = torch.quantile(_roots(theta, se, estimate), probabilities, dim=-1)
    degenerate = scale == 0  # every sequence changed by the same per-token amount: no spread to scale
    low = torch.where(degenerate, estimate, estimate - q[1] * scale)
    high = torch.where(degenerate, estimate, estimate - q[0] * scale)
    # A change confined to one or two sequences leaves many resamples without it (no spread: an infinite
    # root), and then a studentized bound is undefined; the percentile bound of those resamples stands in.
    percentile = torch.quantile(theta[..., 1:], probabilities, dim=-1)
    low = torch.where(torch.isfinite(low), low, torch.minimum(percentile[0], estimate))
    high = torch.where(torch.isfinite(high), high, torch.maximum(percentile[1], estimate))
    return low, high


def bootstrap_t_p_value(theta: Tensor, se: Tensor) -> Tensor:
    """Two-sided bootstrap-t p-value of "the change is zero", the inverse of :func:`studentized_interval`.

    Resampling the roots (θ* - θ̂) / se* centres the bootstrap distribution on the null without assuming
    that paired differences are symmetric (the sign-flip test does, and rejected a true null 7.8% of the
    time at α = 0.05 with exponential differences at n = 24; this test 5.0%). p = 2 min(1 + #{T* ≤ T},
    1 + #{T* ≥ T}) / (1 + resamples) with T = θ̂ / ŝe, capped at 1; no spread and no change gives 1.

    Args:
        theta: (..., 1 + resamples) from :func:`studentized_replicates`.
        se: their standard errors.
    """
    estimate, scale = theta[..., 0], se[..., 0]
    observed = (estimate / scale).nan_to_num(nan=0.0, posinf=math.inf, neginf=-math.inf).unsqueeze(-1)
    roots = _roots(theta, se, estimate)
    below = (roots <= observed).sum(-1)
    above = (roots >= observed).sum(-1)
    p = 2 * (1 + torch.minimum(below, above)).double() / (1 + roots.shape[-1])
    return torch.where((estimate == 0) & (scale == 0), torch.ones_like(p), p.clamp(max=1.0))


def _paired(base: SequenceStats, other: SequenceStats, metric: str, weights: Tensor) -> tuple[Tensor, Tensor]:
    if len(base) != len(other):
        raise ValueError("paired statistics need the same sequences in both passes.")
    field = "correct" if metric == "accuracy" else "nll"
    transform: Transform = "exp" if metric == "perplexity" else "identity"
    return studentized_replicates(
        getattr(base, field), base.tokens, getattr(other, field), other.tokens, weights, transform
    )


def bootstrap_deltas(
    base: SequenceStats, other: SequenceStats, weights: Tensor, confidence: float = 0.95
) -> dict[str, tuple[float, float, float]]:
    """Change of each metric from ``base`` to ``other`` with a paired studentized bootstrap interval.

    Δ perplexity is exp(mean NLL of ``other``) - exp(mean NLL of ``base``), means weighted by tokens.
    Intervals never leave the quantity's range. Δ perplexity's is computed on the log scale: the interval of
    Δ mean NLL (the log of the ratio of perplexities) mapped back through base perplexity · (exp(·) - 1), so
    its lower bound stays above -base perplexity (a perplexity above zero). Δ accuracy's is clipped to
    [-base accuracy, 1 - base accuracy].

    Args:
        base: the reference pass (the unperturbed model), all sequences finite.
        other: the perturbed pass, on the same sequences, all finite.
        weights: resample multiplicities from :func:`bootstrap_weights`.
        confidence: coverage of the interval.

    Returns:
        metric name -> (delta on the full sample, interval low, interval high).
    """
    out = {}
    for metric in ("nll", "accuracy"):
        theta, se = _paired(base, other, metric, weights)
        low, high = studentized_interval(theta, se, confidence)
        out[metric] = (float(theta[0]), float(low), float(high))
    delta, low, high = out["accuracy"]
    out["accuracy"] = (delta, max(low, -base.accuracy), min(high, 1.0 - base.accuracy))
    out["perplexity"] = (
        other.perplexity - base.perplexity,
        *(_perplexity_change(base.perplexity, bound) for bound in out["nll"][1:]),
    )
    return {metric: out[metric] for metric in METRICS}


def _perplexity_change(base_perplexity: float, nll_change: float) -> float:
    """The change of perplexity from ``base_perplexity`` when the mean NLL changes by ``nll_change``."""
    if nll_change > 700:
        return math.inf
    return base_perplexity * math.expm1(nll_change)


def paired_bootstrap_test(a: SequenceStats, b: SequenceStats, weights: Tensor) -> float:
    """Two-sided p-value that passes ``a`` and ``b`` have the same token-weighted mean NLL, pairing
    sequences (the bootstrap-t test of :func:`bootstrap_t_p_value`; non-finite NLLs give NaN).

    The p-value is at least 2^(1-n), the smallest that n paired sequences can support (that of an exact
    sign-flip test): a handful of sequences that all changed by the same amount has no spread for the
    bootstrap to measure and would otherwise look infinitely significant.

    Args:
        a: first pass.
        b: second pass, on the same sequences.
        weights: resample multiplicities from :func:`bootstrap_weights` (their number bounds the
            smallest p-value, 2 / (1 + resamples)).
    """
    if bool(a.broken.any() or b.broken.any()):
        return float("nan")
    theta, se = _paired(a, b, "nll", weights)
    return max(float(bootstrap_t_p_value(theta, se)), 2.0 ** (1 - len(a)))


def mcnemar_exact(a: Tensor, b: Tensor) -> float:
    """Two-sided exact McNemar p-value that two paired 0/1 outcome vectors have the same success rate.

    Only discordant items carry information: with n01 items right under ``a`` only and n10 right under
    ``b`` only, under the null each discordant item is equally likely to fall either way, so
    p = min(1, 2 · P(Binomial(n01 + n10, ½) ≤ min(n01, n10))). The test conditions on the discordant
    count and is exact at any number of items, with no assumption on the shape of the differences
    (a bootstrap test is coarse and anti-conservative when only a handful of items change).

    Args:
        a: (n,) 0/1 outcomes of the reference pass.
        b: (n,) 0/1 outcomes of the other pass, on the same items.
    """
    if a.shape != b.shape:
        raise ValueError("McNemar's test needs the same items in both passes.")
    a, b = a.bool(), b.bool()
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def paired_mean_interval(a: Tensor, b: Tensor, weights: Tensor, confidence: float = 0.95) -> tuple[float, float, float]:
    """Change of the mean from ``a`` to ``b`` (paired per item) with a studentized bootstrap interval.

    The per-item case of :func:`studentized_replicates` (every item weighs one token), so downstream
    accuracies get the same interval as perplexity.

    Args:
        a: (n,) per-item values of the reference pass (0/1 correctness for accuracy).
        b: (n,) per-item values of the other pass, same items.
        weights: (resamples, n) multiplicities from :func:`bootstrap_weights`.
        confidence: coverage of the interval.

    Returns:
        (mean(b) - mean(a), interval low, interval high).
    """
    a, b = a.double(), b.double()
    ones = torch.ones_like(a)
    theta, se = studentized_replicates(a, ones, b, ones, weights)
    low, high = studentized_interval(theta, se, confidence)
    return float(theta[0]), float(low), float(high)


def mean_over_seeds(values: Tensor, confidence: float = 0.95) -> tuple[float, float, float]:
    """The mean of one statistic over seeds (one value per seed) with a Student-t interval over the seeds.

    Args:
        values: (n_seeds,) the statistic under each seed.
        confidence: coverage of the interval.

    Returns:
        (mean, low, high); the interval is NaN with a single seed.
    """
    from scipy import stats as scipy_stats

    values = values.double()
    n = values.numel()
    mean = float(values.mean())
    if n < 2:
        return mean, math.nan, math.nan
    half = float(scipy_stats.t.ppf(0.5 + confidence / 2, n - 1)) * float(values.std()) / math.sqrt(n)
    return mean, mean - half, mean + half
