"""Controls of ``cwa perturb``: weights chosen to match the top-K set, perturbed in the same way, so that
the top-K set's damage can be told from the damage of perturbing any K weights.

A control is a small class with a short ``name``, typed ``__init__`` options, a :class:`FigureStyle` for the
dose-response figure (a default one when it declares none) and two steps: :meth:`Control.prepare` (once, before
any evaluation: load or index what it needs) and :meth:`Control.select` (the weights for one K and, for a random
control, one seed). ``CONTROLS`` maps the names to the classes; adding a control is one class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor

from cwa.ablation.perturbations import Selection, seeded, selection_from, topk_prefix
from cwa.ablation.units import UNITS, unit_count, unit_ids, unit_mean_abs, unit_members
from cwa.common.errors import CwaError
from cwa.scoring.topk import TopK


class ControlUnavailable(CwaError):
    """A control of the requested size cannot be drawn (too few eligible weights)."""


# -- drawing control weights (pure tensor code) ----------------------------------------------------
def _first_occurrences(values: Tensor) -> Tensor:
    """``values`` without repeats, each kept at its first position."""
    if values.numel() == 0:
        return values
    uniq, inverse = torch.unique(values, return_inverse=True)
    positions = torch.arange(values.numel())
    first = torch.full((uniq.numel(),), values.numel(), dtype=torch.long).scatter_reduce(
        0, inverse, positions, reduce="amin"
    )
    return values[first.sort().values]


def sample_excluding(numel: int, exclude: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """``n`` distinct indices drawn uniformly from ``range(numel)`` minus ``exclude`` (sorted), sorted.

    Small populations use a permutation; large ones draw with replacement and drop repeats and
    excluded indices in order, which is the same uniform sample without replacement.
    """
    available = numel - int(exclude.numel())
    if n > available:
        raise ControlUnavailable(f"cannot draw {n} weights from {available} eligible ones.")
    if n == 0:
        return torch.empty(0, dtype=torch.long)
    if numel <= 1 << 22 or available < 4 * n:
        perm = torch.randperm(numel, generator=generator)
        return perm[~torch.isin(perm, exclude)][:n].sort().values
    chosen = torch.empty(0, dtype=torch.long)
    while chosen.numel() < n:
        draw = torch.randint(0, numel, (2 * (n - chosen.numel()) + 16,), generator=generator)
        draw = draw[~torch.isin(draw, exclude)]
        chosen = _first_occurrences(torch.cat([chosen, draw]))[:n]
    return chosen.sort().values


def random_matched(params: Mapping[str, Tensor], target: Selection, generator: torch.Generator) -> Selection:
    """Random weights with exactly the per-tensor counts of ``target``, never one of ``target``'s weights.

    Args:
        params: parameter name -> tensor (only shapes are read).
        target: the top-K selection to match.
        generator: the control's seed.
    """
    out: Selection = {}
    for name, index in target.items():
        try:
            out[name] = sample_excluding(params[name].numel(), index, int(index.numel()), generator)
        except ControlUnavailable:
            raise ControlUnavailable(
                f"'{name}' holds {index.numel()} of the top-K weights and only "
                f"{params[name].numel() - index.numel()} others, too few for a matched random control."
            ) from None
    return out


def random_matched_units(
    params: Mapping[str, Tensor],
    target: Selection,
    transposed: Mapping[str, bool],
    unit: str,
    generator: torch.Generator,
) -> Selection:
    """Every weight of random units (rows, columns or experts) with exactly the per-tensor count of distinct
    units of ``target``, never one of ``target``'s units.

    Args:
        params: parameter name -> tensor (only shapes are read).
        target: the top-K selection (single weights) whose units are matched.
        transposed: parameter name -> True for a (in, out) layout.
        unit: ``weight``, ``row``, ``column`` or ``expert``.
        generator: the control's seed.
    """
    if unit == "weight":
        return random_matched(params, target, generator)
    out: Selection = {}
    for name, index in target.items():
        shape, flip = tuple(params[name].shape), bool(transposed.get(name, False))
        ids, total = unit_ids(index.cpu(), shape, flip, unit), unit_count(shape, flip, unit)
        try:
            drawn = sample_excluding(total, ids, int(ids.numel()), generator)
        except ControlUnavailable:
            raise ControlUnavailable(
                f"'{name}' holds {ids.numel()} of the top-K {unit}s and only {total - ids.numel()} others, too "
                f"few for a matched random {unit} control."
            ) from None
        out[name] = unit_members(drawn, shape, flip, unit)
    return out


class MagnitudeBins:
    """Quantile bins of |w| over a set of tensors, with per-tensor bin counts.

    The edges are quantiles of |w| over all weights (of a fixed random subsample of 2^22 when there
    are more); a weight's bin is ``torch.bucketize(|w|, edges, right=True)``, so bins are half-open
    ``[edge_{b-1}, edge_b)``. Repeated edges (e.g. many exact zeros) leave some bins empty.

    Args:
        params: parameter name -> tensor, in model order.
        bins: number of quantile bins.
        seed: seed of the subsample on very large models.
        what: what one value is, in messages (``weights``; ``rows`` when the values are rows' mean |w|).
    """

    def __init__(self, params: Mapping[str, Tensor], bins: int = 100, seed: int = 0, what: str = "weights") -> None:
        if bins < 1:
            raise CwaError(f"magnitude_bins must be at least 1, got {bins}.")
        self.params, self.names, self.bins, self.what = params, list(params), bins, what
        self.edges = self._edges(seed)
        self.counts = torch.stack(
            [torch.bincount(self.bin_of(params[n].detach().reshape(-1)), minlength=bins) for n in self.names]
        )  # (tensors, bins)
        self._order: dict[str, Tensor] = {}

    def _edges(self, seed: int, limit: int = 1 << 22) -> Tensor:
        total = sum(self.params[n].numel() for n in self.names)
        generator = torch.Generator().manual_seed(seed)
        parts = []
        for name in self.names:
            flat = self.params[name].detach().reshape(-1)
            if total > limit:
                take = max(1, round(limit * flat.numel() / total))
                flat = flat[torch.randint(0, flat.numel(), (take,), generator=generator).to(flat.device)]
            parts.append(flat.abs().float().cpu())
        values = torch.cat(parts).sort().values
        q = torch.arange(1, self.bins, dtype=torch.float64) / self.bins
        # Edge b is the first value of quantile b, so with ``right=True`` each bin holds ~1/bins of the weights.
        positions = (q * values.numel()).floor().long().clamp(max=values.numel() - 1)
        return values[positions]

    def bin_of(self, values: Tensor) -> Tensor:
        """Bin index of each weight value (by |value|)."""
        return torch.bucketize(values.detach().abs().float().cpu(), self.edges, right=True)

    def _members(self, row: int) -> Tensor:
        """Flat indices of a tensor grouped by bin (bin 0 first, ascending index within a bin)."""
        name = self.names[row]
        if name not in self._order:
            order = torch.argsort(self.bin_of(self.params[name].reshape(-1)), stable=True)
            self._order[name] = order.to(torch.int32) if order.numel() < 1 << 31 else order
        return self._order[name]

    def matched(self, target: Selection, generator: torch.Generator) -> Selection:
        """Random weights with exactly the bin counts of ``target`` (over all tensors), never one of
        ``target``'s weights: for each bin, a uniform sample of the other weights in that bin."""
        row_of = {n: i for i, n in enumerate(self.names)}
        need = torch.zeros(self.bins, dtype=torch.long)
        target_bins: dict[int, Tensor] = {}
        for name, index in target.items():
            values = self.params[name].detach().reshape(-1)[index.to(self.params[name].device)]
            target_bins[row_of[name]] = self.bin_of(values)
            need += torch.bincount(target_bins[row_of[name]], minlength=self.bins)
        starts = torch.cumsum(self.counts, 0) - self.counts  # (tensors, bins): first position of a tensor in a bin
        requests: dict[int, list[tuple[int, Tensor, Tensor]]] = {}  # row -> [(bin, local rank, order)]
        candidates: dict[int, tuple[Tensor, Tensor]] = {}
        for b in torch.nonzero(need).squeeze(1).tolist():
            n, population = int(need[b]), int(self.counts[:, b].sum())
            if population - n < n:
                raise ControlUnavailable(
                    f"magnitude bin {b} holds {n} of the top-K {self.what} and only {population - n} others, too "
                    "few for a magnitude-matched control; use fewer bins (MagnitudeMatched's option bins)."
                )
            # Among the first 2n of a random order of the bin at most n are top-K weights, so at least n remain.
            positions = torch.randperm(population, generator=generator)[: 2 * n]
            rows = torch.searchsorted(starts[:, b].contiguous(), positions, right=True) - 1
            for row in torch.unique(rows).tolist():
                mask = rows == row
                order = torch.nonzero(mask).squeeze(1)
                requests.setdefault(row, []).append((b, positions[mask] - starts[row, b], order))
            candidates[b] = (
                torch.empty(positions.numel(), dtype=torch.long),
                torch.empty(positions.numel(), dtype=torch.long),
            )
        for row, items in requests.items():
            members = self._members(row)
            first_in_bin = torch.cumsum(self.counts[row], 0) - self.counts[row]
            for b, local, order in items:
                flat = members[(first_in_bin[b] + local).long()].long()
                candidates[b][0][order] = row
                candidates[b][1][order] = flat
        chosen_rows, chosen_index = [], []
        for b, (rows, flat) in candidates.items():
            keep = torch.ones(rows.numel(), dtype=torch.bool)
            for row in torch.unique(rows).tolist():
                name = self.names[row]
                if name in target:
                    mask = rows == row
                    keep[mask] = ~torch.isin(flat[mask], target[name])
            picked = torch.nonzero(keep).squeeze(1)[: int(need[b])]
            chosen_rows.append(rows[picked])
            chosen_index.append(flat[picked])
        if not chosen_rows:
            return {}
        return selection_from(self.names, torch.cat(chosen_rows), torch.cat(chosen_index))


def bottomk(scores: Mapping[str, Tensor], k: int) -> TopK:
    """The k lowest |scores| over all tensors; ties: earlier parameter, then lower flat index.

    Args:
        scores: one score tensor per parameter, in model order.
        k: how many weights.
    """
    names = list(scores)
    total = sum(s.numel() for s in scores.values())
    if k > total:
        raise CwaError(f"bottom-K with k={k} is larger than the {total} scored weights.")
    best_key = torch.empty(0)
    best_param = torch.empty(0, dtype=torch.long)
    best_index = torch.empty(0, dtype=torch.long)
    for i, name in enumerate(names):
        key = scores[name].detach().reshape(-1).float().abs().cpu()
        key = torch.nan_to_num(key, nan=float("inf"))
        # Once k are held, only weights strictly below the k-th can enter: an equal one loses to the earlier tensor.
        full = best_key.numel() == k
        index = torch.nonzero(key < best_key[-1]).squeeze(1) if full else torch.arange(key.numel())
        if index.numel() > k:
            values = torch.topk(key[index], k, largest=False, sorted=False).values
            threshold = values.max()
            sub = key[index]
            below = index[sub < threshold]
            at = index[sub == threshold][: k - below.numel()]
            index = torch.cat([below, at]).sort().values
        if index.numel() == 0:
            continue
        order = torch.sort(key[index], stable=True).indices
        index = index[order]
        cat_key = torch.cat([best_key, key[index]])
        cat_param = torch.cat([best_param, torch.full_like(index, i)])
        cat_index = torch.cat([best_index, index])
        order = torch.sort(cat_key, stable=True).indices[:k]
        best_key, best_param, best_index = cat_key[order], cat_param[order], cat_index[order]
    score = torch.empty(best_param.numel(), dtype=torch.float32)
    for i, name in enumerate(names):
        mask = best_param == i
        if mask.any():
            score[mask] = scores[name].detach().reshape(-1)[best_index[mask]].float().cpu()
    return TopK(names=names, param=best_param, index=best_index, score=score)


# -- the controls: a registry of small classes -----------------------------------------------------
@dataclass
class ControlContext:
    """What a control may draw from.

    Args:
        params: the scored parameters (name -> the model's own tensor), in model order.
        topk: the run's ranked top-K list.
        max_k: the largest K of the dose-response curve.
        scores: loads the run's score tensors (name -> tensor, model order), or None without scores.
        transposed: parameter name -> True for a (in, out) layout (GPT-2 ``Conv1D``), for row and column units.
    """

    params: Mapping[str, Tensor]
    topk: TopK
    max_k: int
    scores: Callable[[], Mapping[str, Tensor]] | None
    transposed: Mapping[str, bool] = field(default_factory=dict)


@dataclass(frozen=True)
class FigureStyle:
    """How a control is shown: its line in the dose-response figure and its column in perturb's console table.

    Args:
        label: the legend entry.
        color: a matplotlib colour; None takes the next colour no other line of the figure uses.
        marker: a matplotlib marker.
        short: the console column's header (None: the label).
    """

    label: str
    color: str | None = None
    marker: str = "D"
    short: str | None = None


class Control(ABC):
    """A set of K weights to perturb instead of the top-K set. ``seeded`` controls are drawn once per seed;
    ``style`` is its look in the dose-response figure (None: its name as the label, a free colour)."""

    name: ClassVar[str] = ""
    seeded: ClassVar[bool] = True
    units: ClassVar[tuple[str, ...]] = ("weight",)  # the ablation units it can match (others: select takes unit)
    style: ClassVar[FigureStyle | None] = None

    def figure_style(self) -> FigureStyle:
        """The declared style, or the default one every control gets (so a new control is always drawn)."""
        return self.style if self.style is not None else FigureStyle(label=self.name)

    def prepare(self, context: ControlContext) -> str | None:
        """Get ready to select; return a note when this control cannot be drawn for this run (it is then left out)."""
        self.context = context
        return None

    @abstractmethod
    def select(self, k: int, seed: int | None) -> Selection:
        """The control's weights for the top-``k`` set (``seed``: None for an unseeded control). A control
        whose ``units`` name ``row`` or ``column`` also takes ``unit`` and then gives every weight of units
        matched to the top-``k`` set's units.

        Raises:
            ControlUnavailable: too few eligible weights for this K (the condition is skipped with a note).
        """

    def options(self) -> dict[str, object]:
        """The control's settings, as recorded in perturb.json."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and k != "context"}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.options().items())})"


class RandomMatched(Control):
    """K random weights with exactly the top-K set's count in each tensor, none of them in the top-K set.
    For unit ``row`` or ``column``: every weight of random units, as many distinct units in each tensor as
    the top-K set's units there, none of them one of the top-K set's units."""

    name = "random_matched"
    units = UNITS
    style = FigureStyle("random, matched per tensor", "tab:blue", "s", short="random")
    stream: ClassVar[int] = 1  # keeps its draws independent of the other random controls' for the same seed

    def select(self, k: int, seed: int | None, unit: str = "weight") -> Selection:
        target, generator = topk_prefix(self.context.topk, k), _generator(seed, k, self.stream, unit)
        return random_matched_units(self.context.params, target, self.context.transposed, unit, generator)


class MagnitudeMatched(Control):
    """K random weights with exactly the top-K set's count in each |w| quantile bin (bins over all scored
    weights), none of them in the top-K set. For unit ``row`` or ``column``: whole units, as many in each
    quantile bin of the units' mean |w| as the top-K set's units, bins over the units of one length (so
    the control perturbs as many weights as the top-K units), none of the top-K set's units.

    Args:
        bins: number of |w| quantile bins.
    """

    name = "magnitude_matched"
    units = UNITS
    style = FigureStyle("random, matched |w| bins", "tab:green", "^", short="magnitude")
    stream: ClassVar[int] = 2

    def __init__(self, bins: int = 100) -> None:
        if bins < 1:
            raise CwaError(f"magnitude_matched bins must be at least 1, got {bins}.")
        self.bins = bins

    def prepare(self, context: ControlContext) -> str | None:
        super().prepare(context)
        self._bins = MagnitudeBins(context.params, self.bins)
        self._unit_bins: dict[str, list[MagnitudeBins]] = {}
        return None

    def select(self, k: int, seed: int | None, unit: str = "weight") -> Selection:
        target, generator = topk_prefix(self.context.topk, k), _generator(seed, k, self.stream, unit)
        if unit == "weight":
            return self._bins.matched(target, generator)
        params, transposed = self.context.params, self.context.transposed
        shapes = {n: tuple(t.shape) for n, t in params.items()}
        flip = {n: bool(transposed.get(n, False)) for n in params}
        out: Selection = {}
        for bins in self._units(unit, shapes, flip):
            ids = {n: unit_ids(i.cpu(), shapes[n], flip[n], unit) for n, i in target.items() if n in bins.params}
            if ids:
                drawn = bins.matched(ids, generator)
                out.update({n: unit_members(u, shapes[n], flip[n], unit) for n, u in drawn.items()})
        return {n: out[n] for n in params if n in out}

    def _units(self, unit: str, shapes: dict, flip: dict) -> list[MagnitudeBins]:
        """Quantile bins of the units' mean |w|, one set per unit length (units of equal length are matched,
        so a control perturbs as many weights as its target)."""
        if unit not in self._unit_bins:
            groups: dict[int, dict[str, Tensor]] = {}
            for name, tensor in self.context.params.items():
                if unit == "expert" and tensor.dim() != 3:
                    continue  # only packed expert tensors hold experts to match
                length = tensor.numel() // unit_count(shapes[name], flip[name], unit)
                groups.setdefault(length, {})[name] = unit_mean_abs(tensor, flip[name], unit)
            what = f"{unit}s"
            self._unit_bins[unit] = [MagnitudeBins(means, self.bins, what=what) for means in groups.values()]
        return self._unit_bins[unit]


class BottomK(Control):
    """The K weights of lowest |score| over all scored tensors (needs the run's scores.safetensors)."""

    name = "bottomk"
    seeded = False
    style = FigureStyle("bottom-K", "tab:gray", "v", short="bottom-K")
    # units: weight only; the lowest-score weights define no lowest-score rows or columns

    def prepare(self, context: ControlContext) -> str | None:
        super().prepare(context)
        if context.scores is None:
            return "bottom-K skipped: the run has no scores.safetensors."
        self._bottom = bottomk(context.scores(), context.max_k)
        return None

    def select(self, k: int, seed: int | None) -> Selection:
        return topk_prefix(self._bottom, k)


def _generator(seed: int | None, k: int, stream: int, unit: str) -> torch.Generator:
    """The draw of one control, seed and K; a unit other than ``weight`` draws from its own stream."""
    parts = (seed or 0, k, stream)
    return seeded(*parts) if unit == "weight" else seeded(*parts, UNITS.index(unit))


CONTROLS: dict[str, type[Control]] = {cls.name: cls for cls in (RandomMatched, MagnitudeMatched, BottomK)}
ControlName = Literal["random_matched", "magnitude_matched", "bottomk"]


def check_seeds(seeds: object) -> tuple[int, ...]:
    """The seeds of the random controls as a tuple, refused in one sentence when empty (the controls would
    silently not run) or repeated (one draw would be averaged as two independent ones).

    Args:
        seeds: the seeds as given (a sequence of integers).
    """
    values = tuple(seeds) if isinstance(seeds, (list, tuple)) else None
    if values is None or not all(isinstance(s, int) and not isinstance(s, bool) for s in values):
        raise CwaError(f"seeds must be a list of integers such as [0,1,2], got {seeds!r}.")
    if not values:
        raise CwaError("seeds is empty, so no random control would be drawn; give at least one, e.g. --seeds [0,1,2].")
    repeated = sorted({s for s in values if values.count(s) > 1})
    if repeated:
        raise CwaError(
            f"seeds {list(values)} repeat {repeated[0]}, which would count one draw as several independent ones; "
            "give distinct seeds."
        )
    return values


def make_control(spec: str | Control) -> Control:
    """A control from its short name (default options) or as given.

    Args:
        spec: a name of ``CONTROLS`` or a :class:`Control`.
    """
    if isinstance(spec, Control):
        return spec
    if spec not in CONTROLS:
        raise CwaError(f"unknown control '{spec}': use {', '.join(CONTROLS)} or a class_path.")
    return CONTROLS[spec]()
