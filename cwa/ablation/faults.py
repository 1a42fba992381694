"""Random faults in stored weights: independent bit errors and Gaussian noise, protected weights excluded.

Bit errors: every stored bit of every unprotected weight flips independently with probability ``p``, in the
tensor's real storage format (bf16 and fp16: 16 bits, fp32: 32), optionally only its sign bit or only its
exponent bits. Rather than drawing a random number per bit (32 per fp32 weight), the number of flips is
drawn first (Binomial(bits · weights, p), expected p · bits · weights) and then that many distinct
(weight, bit) positions uniformly: the same distribution, with work and memory in the number of flips.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from cwa.ablation.perturbations import storage_format
from cwa.common.errors import CwaError

BitField = Literal["all", "sign", "exponent"]
BIT_FIELDS: tuple[str, ...] = ("all", "sign", "exponent")


def field_bits(dtype: torch.dtype, field: str) -> list[int]:
    """Bit positions (0 = least-significant mantissa bit) of ``field`` in ``dtype``'s storage format."""
    _, total, mantissa = storage_format(dtype)
    if field == "all":
        return list(range(total))
    if field == "sign":
        return [total - 1]
    if field == "exponent":
        return list(range(mantissa, total - 1))
    raise CwaError(f"unknown bit field '{field}': use {', '.join(BIT_FIELDS)}.")


def unprotected_positions(draw: Tensor, protected: Tensor | None) -> Tensor:
    """Map the j-th unprotected weight (``draw``, int64) to its flat index, skipping the sorted ``protected``.

    With protected indices P sorted, the j-th unprotected index is j + #{i : P_i − i ≤ j}.
    """
    if protected is None or protected.numel() == 0:
        return draw
    shifted = protected.to(draw.device) - torch.arange(protected.numel(), device=draw.device)
    return draw + torch.searchsorted(shifted, draw, right=True)


def _distinct(total: int, count: int, generator: torch.Generator) -> Tensor:
    """``count`` distinct uniform integers below ``total`` (a uniformly random subset), sorted."""
    if count > total // 2:
        return torch.randperm(total, generator=generator)[:count].sort().values
    chosen = torch.empty(0, dtype=torch.long)
    while chosen.numel() < count:
        more = torch.randint(0, total, (count - chosen.numel(),), generator=generator)
        chosen = torch.unique(torch.cat([chosen, more]))  # a repeat is redrawn: still a uniform subset
    return chosen


def draw_bit_errors(
    numel: int,
    dtype: torch.dtype,
    p: float,
    field: str = "all",
    protected: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """The flips of one tensor: (flat weight index, XOR mask as the storage's signed integer), one per
    weight that has at least one flipped bit, weights sorted.

    Args:
        numel: weights in the tensor.
        dtype: its storage dtype (bf16, fp16 or fp32).
        p: the probability that any one eligible bit flips.
        field: which bits may flip: ``all``, ``sign`` or ``exponent``.
        protected: sorted flat indices that never flip.
        generator: CPU random numbers.
    """
    if not 0.0 <= p <= 1.0:
        raise CwaError(f"a bit-error rate is a probability, got {p}.")
    int_dtype, total_bits, _ = storage_format(dtype)
    bits = torch.tensor(field_bits(dtype, field), dtype=torch.long)
    eligible = numel - (0 if protected is None else int(protected.numel()))
    positions = eligible * bits.numel()
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    trials = torch.tensor(float(positions), dtype=torch.float64)
    count = int(torch.binomial(trials, torch.tensor(float(p), dtype=torch.float64), generator=generator))
    chosen = _distinct(positions, count, generator)
    weight = unprotected_positions(chosen // bits.numel(), protected)
    value = torch.ones_like(chosen) << bits[chosen % bits.numel()]  # distinct bits of one weight: sum == OR
    weights, inverse = torch.unique(weight, return_inverse=True)
    masks = torch.zeros(weights.numel(), dtype=torch.long).index_add_(0, inverse, value)
    half = 1 << (total_bits - 1)
    masks = (masks + half) % (2 * half) - half  # the same bits as a signed integer of the storage width
    return weights, masks.to(int_dtype)


def apply_bit_errors(tensor: Tensor, index: Tensor, masks: Tensor) -> None:
    """XOR ``masks`` into the storage bits of ``tensor.view(-1)[index]``, in place."""
    int_dtype, _, _ = storage_format(tensor.dtype)
    ints = tensor.view(-1).view(int_dtype)
    index = index.to(tensor.device)
    ints[index] = ints[index] ^ masks.to(tensor.device)


def noisy(
    tensor: Tensor, sigma: float, protected: Tensor | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """``w + sigma · rms · z`` (z ~ N(0, 1)) for the unprotected weights, rms over the unprotected weights of the
    tensor; protected weights unchanged. Computed in float32, returned in the tensor's dtype."""
    flat = tensor.reshape(-1).float()
    keep = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    if protected is not None and protected.numel():
        keep[protected.to(flat.device)] = True
    free = flat[~keep]
    rms = free.square().mean().sqrt() if free.numel() else flat.new_zeros(())
    z = torch.randn(flat.shape, generator=generator, dtype=torch.float32).to(flat.device)
    new = torch.where(keep, flat, flat + sigma * rms * z)
    return new.reshape(tensor.shape).to(tensor.dtype)
