"""Ablation units: a chosen weight, its output row (a neuron), its input column (a channel) or, in packed
mixture-of-experts tensors ((experts, out, in), e.g. Mixtral's ``experts.down_proj``), its whole expert.

Pure index arithmetic on flat storage indices, no model: a unit is identified by its *unit id* (the
output row or the input column, in cwa's (output, input) convention) and expands to the flat indices of
all its weights. The storage layout matters: ``nn.Linear`` stores (out, in), so an output row is a
storage row; GPT-2's ``Conv1D`` stores (in, out) (``ParamInfo.transposed``), so an output row is a
storage column. A 1-D tensor (a norm's gain, a bias) has no rows or columns: its unit is the weight itself.
An ``expert`` unit is every weight of one expert's matrix in a packed tensor (zeroing a down-projection's
expert silences that expert's output while the router still sends it tokens).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

from cwa.ablation.perturbations import Selection
from cwa.common.errors import CwaError

Unit = Literal["weight", "row", "column", "expert"]
UNITS: tuple[str, ...] = ("weight", "row", "column", "expert")


def check_units(units: tuple[str, ...]) -> tuple[str, ...]:
    """``units`` without repeats, in the given order; an unknown one is one sentence.

    Args:
        units: names of :data:`UNITS`.
    """
    out = tuple(dict.fromkeys(units))
    if not out:
        raise CwaError("give at least one unit (weight, row, column or expert).")
    for unit in out:
        if unit not in UNITS:
            raise CwaError(f"unknown unit '{unit}': use weight, row, column or expert.")
    return out


def _expert_size(shape: tuple[int, ...]) -> int:
    """Weights per expert of a packed (experts, out, in) tensor; one sentence for any other tensor."""
    if len(shape) != 3:
        raise CwaError(f"a {len(shape)}-D tensor holds no packed experts; unit expert needs (experts, out, in).")
    return int(shape[1] * shape[2])


def storage_axis(shape: tuple[int, ...], transposed: bool, unit: str) -> int | None:
    """The storage axis that a unit spans the *other* axis of: 0 when the unit is a storage row, 1 when it
    is a storage column, None when the unit is the weight itself (unit ``weight``, or a 1-D tensor).

    Args:
        shape: the tensor's shape.
        transposed: True for a (in, out) layout (GPT-2 ``Conv1D``).
        unit: ``weight``, ``row`` (output unit) or ``column`` (input channel).
    """
    if unit == "expert":
        raise CwaError("an expert is a block of a packed tensor, not a storage row or column.")
    if unit == "weight" or len(shape) == 1:
        return None
    if len(shape) != 2:
        raise CwaError(f"a {len(shape)}-D tensor has no {unit}s; use unit weight for it.")
    output_axis = 1 if transposed else 0
    return output_axis if unit == "row" else 1 - output_axis


def unit_count(shape: tuple[int, ...], transposed: bool, unit: str) -> int:
    """How many units of this kind the tensor has."""
    if unit == "expert":
        return int(shape[0]) if _expert_size(shape) else 0
    axis = storage_axis(shape, transposed, unit)
    return int(torch.Size(shape).numel()) if axis is None else int(shape[axis])


def unit_ids(index: Tensor, shape: tuple[int, ...], transposed: bool, unit: str) -> Tensor:
    """The unit id of each flat storage index (sorted, unique).

    Args:
        index: flat indices into the tensor's storage.
        shape: the tensor's shape.
        transposed: True for a (in, out) layout.
        unit: ``weight``, ``row``, ``column`` or ``expert``.
    """
    if unit == "expert":
        return torch.unique(index.long() // _expert_size(shape))
    axis = storage_axis(shape, transposed, unit)
    index = index.long()
    if axis is None:
        return torch.unique(index)
    return torch.unique(index // shape[1] if axis == 0 else index % shape[1])


def unit_members(ids: Tensor, shape: tuple[int, ...], transposed: bool, unit: str) -> Tensor:
    """The sorted flat storage indices of every weight of the units ``ids``.

    Args:
        ids: unit ids (output rows for ``row``, input columns for ``column``).
        shape: the tensor's shape.
        transposed: True for a (in, out) layout.
        unit: ``weight``, ``row``, ``column`` or ``expert``.
    """
    if unit == "expert":
        size = _expert_size(shape)
        ids = torch.unique(ids.long())
        return (ids[:, None] * size + torch.arange(size)[None, :]).reshape(-1)
    axis = storage_axis(shape, transposed, unit)
    ids = torch.unique(ids.long())
    if axis is None:
        return ids
    rows, cols = shape
    if axis == 0:  # a storage row: ids * cols + every column
        flat = ids[:, None] * cols + torch.arange(cols)[None, :]
    else:  # a storage column: every row * cols + id
        flat = torch.arange(rows)[None, :] * cols + ids[:, None]
    return flat.reshape(-1).sort().values


def expand(
    selection: Selection, shapes: Mapping[str, tuple[int, ...]], transposed: Mapping[str, bool], unit: str
) -> Selection:
    """Every weight of the units of the selected weights (a weight's row, or its column).

    Args:
        selection: parameter name -> sorted flat indices of the chosen weights.
        shapes: parameter name -> shape.
        transposed: parameter name -> True for a (in, out) layout (missing: False).
        unit: ``weight`` (the selection itself), ``row`` or ``column``.
    """
    if unit == "weight":
        return dict(selection)
    out: Selection = {}
    for name, index in selection.items():
        shape, flip = tuple(shapes[name]), bool(transposed.get(name, False))
        out[name] = unit_members(unit_ids(index.cpu(), shape, flip, unit), shape, flip, unit)
    return out


def unit_mean_abs(tensor: Tensor, transposed: bool, unit: str) -> Tensor:
    """Mean |w| of each unit of the tensor (1-D, indexed by unit id); |w| itself for unit ``weight``."""
    shape = tuple(tensor.shape)
    if unit == "expert":
        return tensor.detach().abs().float().reshape(shape[0], _expert_size(shape)).mean(dim=1)
    axis = storage_axis(shape, transposed, unit)
    values = tensor.detach().abs().float()
    if axis is None:
        return values.reshape(-1)
    return values.mean(dim=1 - axis)
