"""Per-sequence evaluation statistics, bootstrap confidence intervals and a paired sign-flip test.

The unit of resampling is the held-out *sequence* (a block of ``seq_len`` tokens): tokens inside a
block are not independent, blocks are treated as exchangeable. Every condition is evaluated on the
same blocks, so a condition and its reference are compared pairwise, block by block.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

METRICS = ("perplexity", "nll", "accuracy")


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
        return math.exp(self.mean_nll) if self.mean_nll < 700 else math.inf

    @property
    def accuracy(self) -> float:
        return float(self.correct.sum() / self.tokens.sum())

    def values(self) -> dict[str, float]:
        return {"perplexity": self.perplexity, "nll": self.mean_nll, "accuracy": self.accuracy}


def bootstrap_weights(n_sequences: int, resamples: int = 2000, seed: int = 0) -> Tensor:
    """(resamples, n_sequences) multiplicities of sequences in each bootstrap resample.

    One matrix shared by every condition keeps the intervals of all conditions on the same resamples.
    """
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, n_sequences, (resamples, n_sequences), generator=generator)
    weights = torch.zeros(resamples, n_sequences, dtype=torch.float64)
    return weights.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))


def _resampled(stats: SequenceStats, weights: Tensor) -> dict[str, Tensor]:
    tokens = weights @ stats.tokens
    nll = (weights @ stats.nll) / tokens
    return {"nll": nll, "perplexity": torch.exp(nll), "accuracy": (weights @ stats.correct) / tokens}


def _quantiles(values: Tensor, confidence: float) -> tuple[float, float]:
    if not bool(torch.isfinite(values).all()):
        finite = values[torch.isfinite(values)]
        if finite.numel() < values.numel():
            return (float("nan"), float("nan"))
        values = finite
    alpha = (1 - confidence) / 2
    q = torch.quantile(values, torch.tensor([alpha, 1 - alpha], dtype=values.dtype))
    return float(q[0]), float(q[1])


def bootstrap_deltas(
    base: SequenceStats, other: SequenceStats, weights: Tensor, confidence: float = 0.95
) -> dict[str, tuple[float, float, float]]:
    """Change of each metric from ``base`` to ``other`` with a paired percentile bootstrap interval.

    Args:
        base: the reference pass (the unperturbed model).
        other: the perturbed pass, on the same sequences.
        weights: resample multiplicities from :func:`bootstrap_weights`.
        confidence: coverage of the interval.

    Returns:
        metric name -> (delta on the full sample, interval low, interval high).
    """
    if len(base) != len(other):
        raise ValueError("paired statistics need the same sequences in both passes.")
    a, b = _resampled(base, weights), _resampled(other, weights)
    full_a, full_b = base.values(), other.values()
    out = {}
    for metric in METRICS:
        low, high = _quantiles(b[metric] - a[metric], confidence)
        out[metric] = (full_b[metric] - full_a[metric], low, high)
    return out


def paired_sign_flip_test(
    a: SequenceStats, b: SequenceStats, permutations: int = 10000, seed: int = 0, exact_up_to: int = 16
) -> float:
    """Two-sided p-value that passes ``a`` and ``b`` have the same mean NLL, pairing sequences.

    The statistic is the token-weighted mean NLL difference Σ(a_i - b_i) / Σ t_i. Under the null the
    two passes are exchangeable within each sequence, so every difference keeps or flips its sign with
    probability 1/2; all 2^n sign patterns are enumerated up to ``exact_up_to`` sequences, beyond that
    ``permutations`` random patterns give p = (1 + #{|T*| ≥ |T|}) / (1 + permutations).

    Args:
        a: first pass.
        b: second pass, on the same sequences.
        permutations: random sign patterns when the exact test is too large.
        seed: seed of the random patterns.
        exact_up_to: largest number of sequences tested exactly.
    """
    if len(a) != len(b):
        raise ValueError("paired statistics need the same sequences in both passes.")
    diff = (a.nll - b.nll) / a.tokens.sum()
    if not bool(torch.isfinite(diff).all()):
        return float("nan")
    observed = float(diff.sum().abs())
    n = diff.numel()
    if n <= exact_up_to:
        signs = torch.tensor(list(itertools.product((1.0, -1.0), repeat=n)), dtype=torch.float64)
        exact = True
    else:
        generator = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (permutations, n), generator=generator).double() * 2 - 1
        exact = False
    null = (signs @ diff).abs()
    # A relative tolerance keeps patterns equal to the observed value (up to rounding) counted as extreme.
    tol = 1e-12 * max(observed, float(diff.abs().sum()), 1e-300)
    extreme = int((null >= observed - tol).sum())
    return extreme / signs.shape[0] if exact else (1 + extreme) / (1 + signs.shape[0])
