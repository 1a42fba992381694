"""Pruning masks: which weights of a tensor (or of the whole model) a score removes.

A *comparison group* is where weights compete for survival: one output row (Wanda's choice), one tensor,
the whole model, or ``m`` consecutive inputs of one output row (``n:m`` semi-structured sparsity, e.g. 2:4).
In every group the weights of lowest |score| are removed first; among equal scores the lower flat storage
index goes first, so a mask is a function of the scores alone. Protected weights are never removed: they
compete with a key of +inf, and a group never removes more weights than it has unprotected ones.

Layout: rows and ``n:m`` runs are along the *input* dimension of the output unit, so a GPT-2 ``Conv1D``
weight (stored (in, out)) is read through its transpose.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

from cwa.common.errors import CwaError

Group = Literal["row", "tensor", "global"]
GROUPS: tuple[str, ...] = ("row", "tensor", "global")
_NM = re.compile(r"^(\d+):(\d+)$")


def parse_structure(structure: str) -> tuple[int, int] | None:
    """``unstructured`` -> None; ``"2:4"`` -> (2, 4) (remove 2 of every 4 consecutive inputs)."""
    if structure == "unstructured":
        return None
    match = _NM.match(structure)
    if match is None:
        raise CwaError(f"unknown pruning structure '{structure}': use unstructured or N:M (e.g. 2:4).")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise CwaError(f"an N:M structure needs 0 < N < M, got {structure}.")
    return n, m


def check_sparsity(sparsity: float) -> float:
    if not 0.0 <= sparsity < 1.0:
        raise CwaError(f"sparsity must be at least 0 and below 1, got {sparsity}.")
    return float(sparsity)


def removed_count(size: int, sparsity: float) -> int:
    """How many of ``size`` weights a group at ``sparsity`` removes (rounded down, as Wanda does)."""
    return int(size * sparsity)


def prune_key(scores: Tensor, protected: Tensor | None = None) -> Tensor:
    """float32 |score| in storage layout, +inf at the protected flat indices (never removed first)."""
    key = scores.detach().float().abs().reshape(scores.shape).clone()
    if torch.isnan(key).any():
        raise CwaError("the scores hold NaN values; rerun fit-sensitivity (a pruning order needs finite scores).")
    if protected is not None and protected.numel():
        key.view(-1)[protected.to(key.device)] = math.inf
    return key


def _as_rows(key: Tensor, transposed: bool) -> Tensor:
    if key.dim() == 1:
        return key.unsqueeze(0)
    if key.dim() != 2:
        raise CwaError(f"pruning by rows needs a 1-D or 2-D tensor, not one of shape {tuple(key.shape)}.")
    return key.t() if transposed else key


def _lowest_in_last_dim(key: Tensor, count: int) -> Tensor:
    """Boolean mask: the ``count`` lowest finite keys along the last dimension (ties: lower position first).

    The count-th smallest key t of each line (``kthvalue``, no full sort) splits it: every key below t goes,
    and of the keys equal to t the first ``count − #(key < t)`` by position (a running count of them).
    """
    if count <= 0:
        return torch.zeros(key.shape, dtype=torch.bool, device=key.device)
    cut = torch.kthvalue(key, count, dim=-1, keepdim=True).values
    below = key < cut
    equal = key == cut
    room = count - below.sum(-1, keepdim=True)
    return (below | (equal & (equal.cumsum(-1) <= room))) & torch.isfinite(key)


def tensor_mask(
    key: Tensor,
    sparsity: float = 0.5,
    group: Literal["row", "tensor"] = "row",
    structure: str = "unstructured",
    transposed: bool = False,
) -> Tensor:
    """The boolean mask (True: removed) of one tensor, in its storage layout.

    Args:
        key: the pruning key from :func:`prune_key` (|score|, +inf where protected).
        sparsity: the share of each group removed (unstructured only; N:M sets its own).
        group: ``row`` (each output unit) or ``tensor`` (the whole tensor); N:M groups are always in rows.
        structure: ``unstructured`` or ``N:M`` (N removed of every M consecutive inputs of a row).
        transposed: the tensor is stored (in, out) (GPT-2 ``Conv1D``).
    """
    nm = parse_structure(structure)
    if nm is not None:
        n, m = nm
        rows = _as_rows(key, transposed)
        if rows.shape[-1] % m:
            raise CwaError(f"{structure} sparsity needs an input dimension divisible by {m}, got {rows.shape[-1]}.")
        mask = _lowest_in_last_dim(rows.reshape(rows.shape[0], -1, m), n).reshape(rows.shape)
    elif group == "row":
        rows = _as_rows(key, transposed)
        mask = _lowest_in_last_dim(rows, removed_count(rows.shape[-1], sparsity))
    elif group == "tensor":
        return _lowest_in_last_dim(key.reshape(-1), removed_count(key.numel(), sparsity)).reshape(key.shape)
    else:
        raise CwaError(f"unknown comparison group '{group}' for one tensor: use row or tensor.")
    if key.dim() == 1:
        return mask.reshape(key.shape)
    return mask.t() if transposed and key.dim() == 2 else mask


def global_threshold(keys: Mapping[str, Tensor], sparsity: float) -> tuple[float, int]:
    """The model-wide cut of ``global`` pruning without concatenating the keys (memory: one tensor's).

    Returns ``(t, ties)``: every key below ``t`` is removed, and of the keys equal to ``t`` the first ``ties``
    in (tensor order, flat index) order. Found by bisection over the bit patterns of non-negative float32
    values, which order as the values do (about 31 counting passes).
    """
    total = sum(k.numel() for k in keys.values())
    finite = sum(int(torch.isfinite(k).sum()) for k in keys.values())
    count = min(removed_count(total, sparsity), finite)
    if count == 0:
        return 0.0, 0

    def at_most(bits: int) -> int:
        value = torch.tensor(bits, dtype=torch.int32).view(torch.float32)
        return sum(int((k <= value.to(k.device)).sum()) for k in keys.values())

    low, high = 0, 0x7F7FFFFF  # the largest finite float32
    while low < high:  # the smallest bit pattern with at least `count` keys at or below it
        middle = (low + high) // 2
        if at_most(middle) >= count:
            high = middle
        else:
            low = middle + 1
    threshold = float(torch.tensor(low, dtype=torch.int32).view(torch.float32))
    below = sum(int((k < threshold).sum()) for k in keys.values())
    return threshold, count - below


def global_masks(keys: Mapping[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """Boolean masks (True: removed) of ``global`` pruning over every tensor of ``keys`` (model order)."""
    threshold, ties = global_threshold(keys, sparsity)
    masks = {}
    for name, key in keys.items():
        mask = key < threshold
        if ties > 0:
            equal = torch.nonzero((key == threshold).reshape(-1)).squeeze(1)[:ties]
            mask.view(-1)[equal] = True
            ties -= equal.numel()
        masks[name] = mask
    return masks
