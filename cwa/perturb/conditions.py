"""The conditions of ``cwa perturb`` and the weights each one perturbs.

:func:`plan_conditions` lists them (per perturbation and unit: per K the top-K set and its controls, the single
weights, the leave-one-out sets, the pairs; then each top-K set and single weight's activation-restore twins);
:func:`selection_of` turns one into the weights it writes, and :func:`place_of` names a ranked weight for the
console and the figures.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch

from cwa.ablation.controls import Control
from cwa.ablation.perturbations import Perturbation, Selection, selection_from, topk_prefix
from cwa.ablation.units import expand
from cwa.model.params import ParamInfo
from cwa.perturb.evaluate import Condition
from cwa.rundir import ConditionKind
from cwa.scoring.topk import TopK

RESTORED_KINDS = (ConditionKind.TOPK, ConditionKind.SINGLE)
"""The kinds that get activation-restore twins (a control or a set of other weights has no twin)."""


def unit_conditions(
    perturbation: Perturbation,
    unit: str,
    ks: Sequence[int],
    controls: Sequence[Control],
    seeds: Sequence[int],
    single: int = 0,
    leave_one_out: int = 0,
    pairs: int = 0,
) -> list[Condition]:
    """One perturbation's conditions at one unit: per K the top-K set and its controls (each seed of a seeded
    one), the top ``single`` weights alone, the ``leave_one_out`` sets of the top N and every pair of the top
    ``pairs`` weights. A control without a definition at ``unit`` is left out."""
    out = []
    for k in ks:
        out.append(Condition(perturbation, ConditionKind.TOPK, k, unit=unit))
        for control in (c for c in controls if unit in c.units):
            for seed in seeds if control.seeded else (None,):
                out.append(Condition(perturbation, ConditionKind.CONTROL, k, seed=seed, control=control, unit=unit))
    out += [Condition(perturbation, ConditionKind.SINGLE, rank=r, unit=unit) for r in range(1, single + 1)]
    n = leave_one_out
    out += [Condition(perturbation, ConditionKind.LEAVE_ONE_OUT, n, rank=r, unit=unit) for r in range(1, n + 1)]
    ranks = itertools.combinations(range(1, pairs + 1), 2)
    out += [Condition(perturbation, ConditionKind.PAIR, ranks=pair, unit=unit) for pair in ranks]
    return out


def with_restored_twins(conditions: list[Condition], modes: Sequence[str]) -> list[Condition]:
    """Each top-K set and single weight (at every unit) followed by its restored twins, one per mode."""
    out = []
    for condition in conditions:
        out.append(condition)
        if condition.kind in RESTORED_KINDS:
            out += [replace(condition, restore=mode) for mode in modes]
    return out


def selection_of(
    condition: Condition, topk: TopK, shapes: Mapping[str, tuple[int, ...]], transposed: Mapping[str, bool]
) -> Selection:
    """The condition's weights: the chosen ranks of the list expanded to their units, or a control's draw.

    Args:
        condition: the condition.
        topk: the run's ranked list.
        shapes: shape of each ranked tensor.
        transposed: ranked tensor -> True for a (in, out) layout.

    Raises:
        ControlUnavailable: a control cannot draw this condition's weights.
    """
    if condition.control is not None:
        if condition.unit == "weight":
            return condition.control.select(condition.k, condition.seed)
        return condition.control.select(condition.k, condition.seed, condition.unit)
    if condition.kind is ConditionKind.TOPK:
        chosen = topk_prefix(topk, condition.k)
    else:
        if condition.kind is ConditionKind.SINGLE:
            ranks = [condition.rank]
        elif condition.kind is ConditionKind.LEAVE_ONE_OUT:
            ranks = [r for r in range(1, condition.k + 1) if r != condition.rank]
        else:
            ranks = list(condition.ranks)
        at = torch.tensor([r - 1 for r in ranks], dtype=torch.long)
        chosen = selection_from(topk.names, topk.param[at], topk.index[at])
    return expand(chosen, shapes, transposed, condition.unit)


def place_of(topk: TopK, infos: Mapping[str, ParamInfo], rank: int, unit: str = "weight") -> str:
    """Where the weight of ``rank`` is: ``name[row,col]``, its row ``name[row,:]`` or column ``name[:,col]``
    for those units, ``name[index]`` for a tensor without rows and columns."""
    name = topk.names[int(topk.param[rank - 1])]
    index = int(topk.index[rank - 1])
    info = infos.get(name)
    place = info.row_col(torch.tensor(index)) if info is not None else None
    if place is None:
        return f"{name}[{index}]"
    row, col = int(place[0]), int(place[1])
    return {"row": f"{name}[{row},:]", "column": f"{name}[:,{col}]"}.get(unit, f"{name}[{row},{col}]")


def condition_place(condition: Condition, topk: TopK, infos: Mapping[str, ParamInfo]) -> str:
    """Where a single weight, leave-one-out member or pair is (``a + b`` for a pair; "" for other kinds)."""
    ranks = condition.ranks or ((condition.rank,) if condition.rank else ())
    return " + ".join(place_of(topk, infos, r, condition.unit) for r in ranks)
