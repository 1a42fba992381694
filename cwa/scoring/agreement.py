"""Statistics over score vectors and top-K sets: overlap, rank correlation, concentration, intervals.

Pure functions over Python sets, NumPy arrays and torch tensors; no run directories, no figures. Every
function here is checked in ``tests/test_compare.py`` against hand-computed values.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def jaccard(a: set[Hashable], b: set[Hashable]) -> float:
    """|A ∩ B| / |A ∪ B|; 1.0 for two empty sets (they agree perfectly on nothing)."""
    union = len(a | b)
    return 1.0 if union == 0 else len(a & b) / union


def overlap_coefficient(a: set[Hashable], b: set[Hashable]) -> float:
    """|A ∩ B| / min(|A|, |B|) (Szymkiewicz–Simpson): 1.0 when one set contains the other."""
    smaller = min(len(a), len(b))
    return 1.0 if smaller == 0 else len(a & b) / smaller


@dataclass(frozen=True)
class Correlation:
    """A rank correlation with its 95% interval (NaN when undefined, e.g. a constant vector)."""

    value: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict:
        return {"value": _f(self.value), "low": _f(self.low), "high": _f(self.high), "n": self.n}


def _f(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _fisher_interval(r: float, n: int, se: float) -> tuple[float, float]:
    if not math.isfinite(r) or n < 5:
        return math.nan, math.nan
    r = max(min(r, 1 - 1e-12), -1 + 1e-12)
    z = math.atanh(r)
    return math.tanh(z - Z95 * se), math.tanh(z + Z95 * se)


def _constant(x: np.ndarray) -> bool:
    return x.size == 0 or bool(np.all(x == x.flat[0]))


def _rank_correlation(x, y, statistic: str, standard_error) -> Correlation:
    """A scipy.stats rank correlation with a Fisher-z 95% interval; NaN when undefined."""
    from scipy import stats

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = int(x.size)
    if n < 3 or _constant(x) or _constant(y):
        return Correlation(math.nan, math.nan, math.nan, n)
    value = float(getattr(stats, statistic)(x, y).statistic)
    low, high = _fisher_interval(value, n, standard_error(n))
    return Correlation(value, low, high, n)


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> Correlation:
    """Spearman's rho (scipy.stats) with a Fisher-z 95% interval, standard error 1.06/sqrt(n-3)
    (Fieller, Hartley & Pearson 1957)."""
    return _rank_correlation(x, y, "spearmanr", lambda n: 1.06 / math.sqrt(n - 3))


def kendall(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> Correlation:
    """Kendall's tau-b (scipy.stats) with a Fisher-z 95% interval, standard error sqrt(0.437/(n-4))
    (Fieller, Hartley & Pearson 1957)."""
    return _rank_correlation(x, y, "kendalltau", lambda n: math.sqrt(0.437 / (n - 4)) if n > 4 else math.inf)


def gini_sorted(ascending: np.ndarray, chunk: int = 1 << 22) -> float:
    """Gini coefficient of non-negative values already sorted ascending.

    G = 2·Σ i·x_(i) / (n·Σ x) − (n+1)/n with i = 1..n: 0 when all values are equal, (n−1)/n when one value
    holds everything. Summed in float64 chunks so a 134.5M-value vector needs no float64 copy.
    """
    n = int(ascending.size)
    if n == 0:
        return math.nan
    total, weighted = 0.0, 0.0
    for start in range(0, n, chunk):
        part = ascending[start : start + chunk].astype(np.float64)
        total += float(part.sum())
        weighted += float(np.dot(np.arange(start + 1, start + 1 + part.size, dtype=np.float64), part))
    if total <= 0:
        return math.nan
    return 2.0 * weighted / (n * total) - (n + 1) / n


def gini(values: Sequence[float] | np.ndarray) -> float:
    """Gini coefficient of |values| (scores are ranked by magnitude)."""
    return gini_sorted(np.sort(np.abs(np.asarray(values, dtype=np.float64)).ravel()))


def top_share_sorted(ascending: np.ndarray, fraction: float) -> tuple[float, int]:
    """(share of the total held by the top ``fraction`` of values, how many values that is: at least one)."""
    n = int(ascending.size)
    count = max(1, math.ceil(fraction * n))
    total = float(ascending.sum(dtype=np.float64))
    if total <= 0:
        return math.nan, count
    return float(ascending[n - count :].sum(dtype=np.float64)) / total, count


def concentration(values: np.ndarray, fractions: Sequence[float] = (1e-4, 1e-3, 1e-2)) -> dict:
    """Gini and top-fraction shares of |values|. Sorts ``values`` in place after taking |.|: pass a copy
    you no longer need (this keeps a 134.5M-weight run at one float32 copy)."""
    np.abs(values, out=values)
    values.sort()
    shares = {}
    for q in fractions:
        share, count = top_share_sorted(values, q)
        shares[f"{q:g}"] = {"fraction": q, "count": count, "share": _f(share)}
    return {"n": int(values.size), "gini": _f(gini_sorted(values)), "top_shares": shares}


def bootstrap_interval(
    statistic: Callable[[np.ndarray], float], n: int, resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(indices)`` over ``resamples`` draws of n indices with
    replacement; draws where the statistic is undefined (NaN) are dropped."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        v = statistic(rng.integers(0, n, size=n))
        if math.isfinite(v):
            values.append(v)
    if len(values) < resamples // 2:
        return math.nan, math.nan
    alpha = (1 - level) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))


def mean_pairwise(matrix: np.ndarray, members: np.ndarray | None = None) -> float:
    """Mean of ``matrix[i, j]`` over pairs i < j of ``members`` that are distinct runs (NaN with none)."""
    members = np.arange(matrix.shape[0]) if members is None else members
    values = [matrix[a, b] for a, b in itertools.combinations(members.tolist(), 2) if a != b]
    return float(np.mean(values)) if values else math.nan


def stability(matrix: np.ndarray, resamples: int = 2000, seed: int = 0) -> dict:
    """Mean pairwise agreement of runs that differ only in their calibration seed, with a run-bootstrap
    95% interval: runs are resampled with replacement and pairs of a run with itself are skipped, so the
    interval reflects that pairs sharing a run are not independent. Needs three runs for an interval."""
    n = matrix.shape[0]
    mean = mean_pairwise(matrix)
    if n < 3:
        return {"runs": n, "mean": _f(mean), "low": None, "high": None, "note": "too few runs for an interval"}
    low, high = bootstrap_interval(lambda idx: mean_pairwise(matrix, idx), n, resamples, seed)
    return {"runs": n, "mean": _f(mean), "low": _f(low), "high": _f(high), "note": ""}


def binomial_tail(count: int, trials: int, p: float) -> float:
    """P(X ≥ count) for X ~ Binomial(trials, p)."""
    from scipy import stats

    return float(stats.binom.sf(count - 1, trials, p))
