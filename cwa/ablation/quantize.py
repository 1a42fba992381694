"""Round-to-nearest (RTN) integer quantization of a weight tensor, with protected weights left out.

``q = clamp(round(w / s) + z, 0, 2^b − 1)`` and the weight becomes ``(q − z) · s``, per group of
``group_size`` consecutive inputs of one output row (or whole rows):

- symmetric: ``s = max|w| / (2^(b−1) − 1)``, ``z = 2^(b−1)`` (zero is exact, the grid is symmetric);
- asymmetric (min-max): ``s = (max − min) / (2^b − 1)``, ``z = round(−min / s)``.

Protected weights keep their exact values and **take no part in their group's range**: the min, max and
max|w| are over the unprotected weights only. A protected outlier that would have set the range therefore
changes how every other weight of its group is rounded (finer steps); without that, protecting the largest
weight of a group under absmax RTN would change nothing at all.

``clip_ratio`` < 1 shrinks each group's range before the scale is set (values beyond it saturate), the way
the Super Weight paper clips the other outliers so that the remaining weights get a finer grid.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cwa.common.errors import CwaError


def check_rtn(bits: int, group_size: int | None, clip_ratio: float) -> None:
    if not 2 <= bits <= 16:
        raise CwaError(f"RTN bits must be between 2 and 16, got {bits}.")
    if group_size is not None and group_size < 1:
        raise CwaError(f"group_size must be at least 1 (or None for whole rows), got {group_size}.")
    if not 0 < clip_ratio <= 1:
        raise CwaError(f"clip_ratio must be in (0, 1], got {clip_ratio}.")


def _grouped(values: Tensor, group_size: int | None, transposed: bool) -> Tensor:
    """A (rows, groups, group_size) float32 copy of a 1-D or 2-D tensor, groups along the input dimension."""
    rows = values.unsqueeze(0) if values.dim() == 1 else (values.t() if transposed else values)
    if rows.dim() != 2:
        raise CwaError(f"RTN needs a 1-D or 2-D tensor, not one of shape {tuple(values.shape)}.")
    size = rows.shape[1] if group_size is None else group_size
    if rows.shape[1] % size:
        raise CwaError(f"group_size {size} does not divide the input dimension {rows.shape[1]}; choose a divisor.")
    return rows.float().reshape(rows.shape[0], -1, size)


def _ungrouped(grouped: Tensor, like: Tensor, transposed: bool) -> Tensor:
    if like.dim() == 1:
        return grouped.reshape(like.shape)
    rows = grouped.reshape(like.shape[1], like.shape[0]) if transposed else grouped.reshape(like.shape)
    return rows.t() if transposed else rows


def rtn(
    tensor: Tensor,
    bits: int = 4,
    group_size: int | None = 128,
    symmetric: bool = True,
    protected: Tensor | None = None,
    transposed: bool = False,
    clip_ratio: float = 1.0,
) -> Tensor:
    """The RTN-quantized (and dequantized) copy of ``tensor``, in its dtype; protected weights unchanged.

    Args:
        tensor: a 1-D or 2-D weight.
        bits: integer width b.
        group_size: consecutive inputs of one output row sharing a scale (None: the whole row).
        symmetric: absmax symmetric grid (True) or min-max asymmetric grid (False).
        protected: flat storage indices kept exactly and left out of their group's range.
        transposed: the tensor is stored (in, out) (GPT-2 ``Conv1D``).
        clip_ratio: the range used is this share of the unprotected range.
    """
    check_rtn(bits, group_size, clip_ratio)
    w = _grouped(tensor, group_size, transposed)
    keep = torch.zeros(tensor.shape, dtype=torch.bool, device=tensor.device)
    if protected is not None and protected.numel():
        keep.view(-1)[protected.to(tensor.device)] = True
    kept = _grouped(keep, group_size, transposed).bool()
    levels = 2**bits - 1
    if symmetric:
        amax = w.abs().masked_fill(kept, 0.0).amax(-1, keepdim=True) * clip_ratio
        scale = amax / (2 ** (bits - 1) - 1)
        zero = torch.full_like(scale, 2.0 ** (bits - 1))
    else:
        high = w.masked_fill(kept, -math.inf).amax(-1, keepdim=True).clamp(min=0.0) * clip_ratio
        low = w.masked_fill(kept, math.inf).amin(-1, keepdim=True).clamp(max=0.0) * clip_ratio
        # The range always holds 0 (as min-max RTN implementations do), so a zero weight stays exactly zero.
        scale = (high - low) / levels
        zero = torch.round(-low / scale.where(scale > 0, torch.ones_like(scale)))
    safe = scale.where(scale > 0, torch.ones_like(scale))
    q = torch.clamp(torch.round(w / safe) + zero, 0, levels)
    new = torch.where(kept | (scale == 0), w, (q - zero) * scale)
    return _ungrouped(new, tensor, transposed).to(tensor.dtype)
