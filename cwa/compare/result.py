"""What ``cwa compare`` computes, as typed data: :class:`Comparison` and its parts. Matrices are indexed like the
compared runs; ``to_json`` gives ``compare.json`` (K as string keys, missing values as null)."""

from __future__ import annotations

from dataclasses import dataclass, field

from cwa.scoring import agreement

Matrix = list[list[float | None]]
"""A symmetric pairwise matrix; None where a run cannot give the value (NaN in the computation)."""


@dataclass(frozen=True)
class RankCorrelation:
    """One rank correlation between two runs' |scores| on the same weights, with its 95% interval.

    Args:
        value: Spearman's ρ or Kendall's τ (None when undefined, e.g. constant scores).
        low: the lower end of the interval (None without one).
        high: the upper end of the interval.
        n: the number of weights compared.
    """

    value: float | None
    low: float | None
    high: float | None
    n: int

    @classmethod
    def of(cls, correlation: agreement.Correlation) -> RankCorrelation:
        values = correlation.as_dict()  # non-finite values become None here, as in compare.json
        return cls(values["value"], values["low"], values["high"], values["n"])


CorrelationMatrix = list[list[RankCorrelation | None]]


@dataclass
class Correlations:
    """Spearman and Kendall matrices over one set of weights per pair (None on the diagonal and where a pair
    has no weights to compare)."""

    spearman: CorrelationMatrix
    kendall: CorrelationMatrix

    def to_json(self) -> dict:
        return {"spearman": _json_matrix(self.spearman), "kendall": _json_matrix(self.kendall)}


@dataclass
class SampleCorrelations(Correlations):
    """The correlations over one uniform random sample of weights, the same for every run.

    Args:
        size: weights in the sample.
        seed: the sample's seed.
    """

    size: int = 0
    seed: int = 0

    def to_json(self) -> dict:
        return {"size": self.size, "seed": self.seed, **super().to_json()}


@dataclass
class Overlap:
    """Pairwise agreement of the global top-K sets at one K: Jaccard and overlap coefficient."""

    jaccard: Matrix
    overlap_coefficient: Matrix


@dataclass
class Stability:
    """The mean pairwise Jaccard of a seed group at one K, with its run-bootstrap interval.

    Args:
        runs: runs in the group.
        mean: the mean pairwise Jaccard.
        low: lower end of the 95% interval (None with too few runs).
        high: upper end of the interval.
        note: why there is no interval ("" when there is one).
    """

    runs: int
    mean: float | None
    low: float | None
    high: float | None
    note: str


@dataclass
class StabilityGroup:
    """Runs with identical settings but different calibration seeds, and their agreement per K.

    Args:
        runs: the runs' names (the first run of each seed).
        seeds: their calibration seeds.
        label: the shared settings, in words.
        repeats_left_out: runs that repeat a seed already in the group (not counted).
        by_k: K -> the group's stability at that K.
    """

    runs: list[str]
    seeds: list[int | None]
    label: str
    repeats_left_out: list[str] = field(default_factory=list)
    by_k: dict[int, Stability] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "runs": self.runs,
            "seeds": self.seeds,
            "label": self.label,
            "repeats_left_out": self.repeats_left_out,
            "by_k": {str(k): vars(s).copy() for k, s in self.by_k.items()},
        }


@dataclass
class RunEntry:
    """One compared run, as ``compare.json`` lists it."""

    name: str
    path: str
    model: str
    metric: str
    mode: str
    k: int
    samples: int | None
    seed: int | None
    has_scores: bool
    data_fingerprint: str | None
    ties_at_cutoff: dict[int, int] = field(default_factory=dict)
    experiments: list[dict] = field(default_factory=list)  # its perturb, prune and protect sets (label, path)

    def to_json(self) -> dict:
        return {**vars(self), "ties_at_cutoff": {str(k): n for k, n in self.ties_at_cutoff.items()}}


@dataclass
class Comparison:
    """Every statistic of ``cwa compare`` over its runs (positions index ``runs`` in every matrix).

    Args:
        runs: the compared runs.
        ks: the K every overlap is computed at (those at least two runs can give exactly).
        overlap: K -> the top-K overlaps.
        topk_union: K -> the rank correlations over each pair's top-K union.
        random_sample: the rank correlations over a uniform random sample of weights (None when not drawn).
        locations: run name -> where its global top-K live (``k``, ``by_layer``, ``by_module`` counts).
        stability: the seed groups.
        notes: what limits the comparison, one sentence each (no final period).
        skipped: directories left out (not complete runs); None when not recorded.
        figures: the figures drawn, relative to the output directory; None when none were drawn.
    """

    runs: list[RunEntry]
    ks: list[int]
    overlap: dict[int, Overlap] = field(default_factory=dict)
    topk_union: dict[int, Correlations] = field(default_factory=dict)
    random_sample: SampleCorrelations | None = None
    locations: dict[str, dict] = field(default_factory=dict)
    stability: list[StabilityGroup] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: list[str] | None = None
    figures: list[str] | None = None

    @property
    def largest_k(self) -> int | None:
        """The largest compared K (the one the tables and findings use), None when no K is comparable."""
        return self.ks[-1] if self.ks else None

    def jaccard(self, k: int, a: int, b: int) -> float | None:
        """The Jaccard overlap of runs ``a`` and ``b`` at ``k``."""
        return self.overlap[k].jaccard[a][b]

    def sample_spearman(self, a: int, b: int) -> RankCorrelation | None:
        """Spearman's ρ of runs ``a`` and ``b`` over the random sample (None without one)."""
        return self.random_sample.spearman[a][b] if self.random_sample is not None else None

    def to_json(self) -> dict:
        """``compare.json``'s content."""
        out = {
            "runs": [r.to_json() for r in self.runs],
            "ks": self.ks,
            "overlap": {str(k): vars(o).copy() for k, o in self.overlap.items()},
            "correlation": {
                "topk_union": {str(k): c.to_json() for k, c in self.topk_union.items()},
                "random_sample": None if self.random_sample is None else self.random_sample.to_json(),
            },
            "locations": self.locations,
            "stability": [g.to_json() for g in self.stability],
            "notes": self.notes,
        }
        if self.skipped is not None:
            out["skipped"] = self.skipped
        if self.figures is not None:
            out["figures"] = self.figures
        return out


def _json_matrix(matrix: CorrelationMatrix) -> list[list[dict | None]]:
    return [[None if c is None else vars(c).copy() for c in row] for row in matrix]
