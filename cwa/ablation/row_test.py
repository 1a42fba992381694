"""The census-comparable row test: a candidate's whole down-projection row against random rows of its tensor.

The published super-weight census ("Structure is not mechanism", Georgakopoulos-Soares lab; 22 models, e.g.
SmolLM2-135M base, layer 11, row 507, R ≈ 3.13) ablates a whole output row of an MLP down-projection and
reports the relative NLL increase R = (NLL_ablated − NLL_base) / NLL_base. cwa reports R of the candidate's
row, of ``controls`` random rows of the same tensor (drawn with a seeded generator, never the candidate's),
and G = R_candidate − median(R_controls).

NLL is the token-weighted mean next-token NLL over the held-out sequences. Every pass sees the same sequences
with the same token counts, so R = Σ nll_ablated / Σ nll_base − 1 over sequences. Intervals are percentile
intervals over one shared matrix of sequence resamples (:func:`cwa.ablation.stats.bootstrap_weights`): each
resample recomputes R of every row and G from them, so G's interval carries the controls' spread as well.
Percentile, not studentized as cwa's Δ perplexity: G involves a median, which has no closed-form standard error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from cwa.ablation.stats import SequenceStats


@dataclass
class RowEffect:
    """R of one ablated row, with its interval (``role``: ``candidate`` or ``control``)."""

    role: str
    row: int
    nll: float
    r: float
    r_low: float
    r_high: float


@dataclass
class RowTest:
    """The candidate's row, its controls and G = R_candidate − median(R_controls) with its interval."""

    parameter: str
    layer: int
    expert: int | None
    base_nll: float
    candidate: RowEffect
    controls: list[RowEffect]
    g: float
    g_low: float
    g_high: float
    seed: int
    confidence: float
    resamples: int

    def rows(self) -> list[dict]:
        """One flat row per ablated row for ``row_test.csv`` (G on the candidate's row only)."""
        out = []
        for effect in [self.candidate, *self.controls]:
            row = {"layer": self.layer, "expert": "" if self.expert is None else self.expert}
            row.update(parameter=self.parameter, **vars(effect), base_nll=self.base_nll)
            is_candidate = effect is self.candidate
            row.update(
                g=self.g if is_candidate else "",
                g_low=self.g_low if is_candidate else "",
                g_high=self.g_high if is_candidate else "",
            )
            out.append(row)
        return out


def row_indices(shape: tuple[int, ...], storage_index: tuple[int, ...], row_dim: int, col_dim: int, row: int) -> Tensor:
    """Flat indices of the whole output row ``row`` of the matrix that holds ``storage_index``.

    Args:
        shape: the weight's shape ((out, in) ``Linear``, (in, out) ``Conv1D``, (experts, out, in) packed).
        storage_index: a weight of that matrix (fixes the expert of a packed tensor).
        row_dim: the dimension of output channels; col_dim: that of input channels (the row runs along it).
        row: the output channel.
    """
    where: list[int | slice] = list(storage_index)
    where[row_dim], where[col_dim] = row, slice(None)
    return torch.arange(math.prod(shape)).view(shape)[tuple(where)].reshape(-1)


def control_rows(rows: int, exclude: int, count: int, seed: int) -> list[int]:
    """``count`` distinct output rows out of ``rows``, never ``exclude``, drawn with a seeded generator."""
    if not 0 < count < rows:
        raise ValueError(f"need between 1 and {rows - 1} control rows, got {count}.")
    generator = torch.Generator().manual_seed(seed)
    order = [r for r in torch.randperm(rows, generator=generator).tolist() if r != exclude]
    return sorted(order[:count])


def relative_increase(base: SequenceStats, ablated: SequenceStats, weights: Tensor) -> tuple[float, Tensor]:
    """R on the full sample and on each resample (rows of ``weights``)."""
    r = float(ablated.nll.sum() / base.nll.sum()) - 1.0
    return r, (weights @ ablated.nll) / (weights @ base.nll) - 1.0


def _interval(replicates: Tensor, confidence: float) -> tuple[float, float]:
    if not bool(torch.isfinite(replicates).all()):
        return math.nan, math.nan
    tail = (1 - confidence) / 2
    low, high = torch.quantile(replicates, torch.tensor([tail, 1 - tail], dtype=replicates.dtype))
    return float(low), float(high)


def row_effect(role: str, row: int, base: SequenceStats, ablated: SequenceStats, weights: Tensor, confidence: float):
    """A :class:`RowEffect` and its resample replicates."""
    r, replicates = relative_increase(base, ablated, weights)
    return RowEffect(role, row, ablated.mean_nll, r, *_interval(replicates, confidence)), replicates


def gap(candidate: Tensor, controls: list[Tensor], confidence: float) -> tuple[float, float, float]:
    """G = R_candidate − median(R_controls) on the full sample (entry 0 of each input: pass the full-sample R
    first, then the replicates) and its percentile interval over the replicates."""
    stacked = torch.stack(controls)  # (controls, 1 + resamples)
    g = candidate - stacked.quantile(0.5, dim=0)
    return float(g[0]), *_interval(g[1:], confidence)
