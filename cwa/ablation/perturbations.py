"""Perturbing chosen weights in place and restoring them bit for bit.

Pure tensor code, no model or Trainer: a *selection* maps a parameter name to the sorted flat indices
of the weights to perturb in that tensor. Every write is one indexed write per tensor (no Python loop
over weights); the original values are saved through an integer view of the storage, so restoring
them reproduces the exact bits (signed zeros and NaN payloads included).
"""

from __future__ import annotations

import contextlib
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor

from cwa.common.errors import CwaError
from cwa.scoring.topk import TopK

Selection = dict[str, Tensor]
"""Parameter name -> sorted, unique int64 flat indices into that tensor's storage."""

# Storage formats: (integer view, total bits, mantissa bits). Bit 0 is the least-significant mantissa bit.
_FORMATS: dict[torch.dtype, tuple[torch.dtype, int, int]] = {
    torch.float32: (torch.int32, 32, 23),
    torch.bfloat16: (torch.int16, 16, 7),
    torch.float16: (torch.int16, 16, 10),
    torch.float64: (torch.int64, 64, 52),
}
_FORMAT_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


# -- bit flips -------------------------------------------------------------------------------------
def storage_format(dtype: torch.dtype) -> tuple[torch.dtype, int, int]:
    """(integer view dtype, total bits, mantissa bits) of a floating storage format."""
    try:
        return _FORMATS[dtype]
    except KeyError:
        raise CwaError(f"bit flips need a float32, bfloat16 or float16 tensor, not {dtype}.") from None


def resolve_bit(bit: int | str, dtype: torch.dtype) -> int:
    """Bit index (0 = least-significant mantissa bit) of ``bit`` in ``dtype``'s storage format.

    Args:
        bit: an index, or ``sign`` (the top bit) or ``exponent_msb`` (the highest exponent bit).
        dtype: the storage dtype of the weights.
    """
    _, total, _ = storage_format(dtype)
    if bit == "sign":
        return total - 1
    if bit == "exponent_msb":
        return total - 2
    if isinstance(bit, str):
        try:
            bit = int(bit)
        except ValueError:
            raise CwaError(f"unknown bit '{bit}': use sign, exponent_msb or an index from 0 to {total - 1}.") from None
    if not 0 <= bit < total:
        raise CwaError(
            f"bit index {bit} is outside the {_FORMAT_NAMES[dtype]} format (bits 0 to {total - 1}, "
            "0 = least-significant mantissa bit)."
        )
    return bit


def _bit_mask(bit: int, int_dtype: torch.dtype, total: int) -> Tensor:
    value = 1 << bit
    if value >= 1 << (total - 1):  # the sign bit of a signed integer view is negative
        value -= 1 << total
    return torch.tensor(value, dtype=int_dtype)


def flip_bit(values: Tensor, bit: int | str) -> Tensor:
    """A copy of ``values`` with one bit of every element's storage flipped (XOR on the integer view)."""
    int_dtype, total, _ = storage_format(values.dtype)
    index = resolve_bit(bit, values.dtype)
    ints = values.contiguous().view(int_dtype) ^ _bit_mask(index, int_dtype, total).to(values.device)
    return ints.view(values.dtype)


# -- perturbations: a registry of small classes ----------------------------------------------------
class Perturbation(ABC):
    """How the chosen weights change. A subclass sets ``name`` (its short name on the command line),
    takes its options as typed ``__init__`` arguments and implements :meth:`write`; adding one is one
    class here (``PERTURBATIONS`` finds it by its name)."""

    name: ClassVar[str] = ""
    random: ClassVar[bool] = False  # draws random numbers (from the generator given to write)
    needs_layout: ClassVar[bool] = False  # write takes ``transposed`` (the weight's output row depends on it)

    @abstractmethod
    def write(self, tensor: Tensor, index: Tensor, generator: torch.Generator | None = None) -> None:
        """Perturb ``tensor.view(-1)[index]`` in place (one indexed write).

        A perturbation with ``needs_layout = True`` also takes ``transposed: bool`` (the tensor stores
        (in, out), GPT-2 ``Conv1D``), to find a weight's output row.

        Args:
            tensor: the parameter, modified in place.
            index: sorted flat storage indices of the chosen weights.
            generator: random numbers (CPU generator) for a ``random`` perturbation.
        """

    def describe(self) -> str:
        return self.name

    def options(self) -> dict[str, object]:
        """The perturbation's settings, as recorded in perturb.json."""
        return dict(vars(self))

    def validate(self, dtype: torch.dtype) -> None:
        """Fail early (before any evaluation) on a setting the weights' format cannot take."""
        return  # most perturbations take every float format

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self), self.describe()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


def _rewrite(tensor: Tensor, index: Tensor, new: Callable[[Tensor], Tensor]) -> None:
    """``tensor.view(-1)[index] = new(its float32 values)``, cast back to the tensor's dtype."""
    flat = tensor.view(-1)
    flat[index] = new(flat[index].float()).to(tensor.dtype)


class Zero(Perturbation):
    """w ← 0."""

    name = "zero"

    def write(self, tensor: Tensor, index: Tensor, generator: torch.Generator | None = None) -> None:
        tensor.view(-1)[index] = 0


class SignFlip(Perturbation):
    """w ← -w."""

    name = "sign_flip"

    def write(self, tensor: Tensor, index: Tensor, generator: torch.Generator | None = None) -> None:
        _rewrite(tensor, index, torch.neg)


class Scale(Perturbation):
    """w ← factor · w.

    Args:
        factor: the multiplier.
    """

    name = "scale"

    def __init__(self, factor: float = 0.0) -> None:
        self.factor = float(factor)

    def describe(self) -> str:
        return f"scale x{self.factor:g}"

    def write(self, tensor: Tensor, index: Tensor, generator: torch.Generator | None = None) -> None:
        _rewrite(tensor, index, lambda values: values * self.factor)


class GaussianNoise(Perturbation):
    """w ← w + sigma · s · z with z ~ N(0, 1) from the condition's seeded generator.

    Args:
        sigma: the noise level.
        relative_to: ``weight`` (s = |w|, each weight's own magnitude) or ``tensor_std`` (s = the
            standard deviation of the whole tensor).
    """

    name = "gaussian_noise"
    random = True

    def __init__(self, sigma: float = 1.0, relative_to: Literal["weight", "tensor_std"] = "weight") -> None:
        if relative_to not in ("weight", "tensor_std"):
            raise CwaError(f"unknown noise reference '{relative_to}': use weight or tensor_std.")
        self.sigma, self.relative_to = float(sigma), relative_to

    def describe(self) -> str:
        return f"gaussian_noise sigma={self.sigma:g}*{'|w|' if self.relative_to == 'weight' else 'std'}"

    def write(self, tensor: Tensor, index: Tensor, generator: torch.Generator | None = None) -> None:
        def noisy(values: Tensor) -> Tensor:
            noise = torch.randn(values.shape, generator=generator, dtype=torch.float32).to(values.device)
            scale = values.abs() if self.relative_to == "weight" else tensor.view(-1).float().std()
            return values + self.sigma * scale * noise

        _rewrite(tensor, index, noisy)


class BitFlip(Perturbation):
    """XOR of one bit of the weight's storage format (fp32 via int32, bf16/fp16 via int16).

    Args:
        bit: ``sign`` (the top bit), ``exponent_msb`` (the highest exponent bit) or an index, 0 = the
            least-significant mantissa bit.
    """

    name = "bit_flip"

    def __init__(self, bit: int | Literal["sign", "exponent_msb"] = "exponent_msb") -> None:
        self.bit = bit

    def describe(self) -> str:
        return f"bit_flip bit={self.bit}"

    def validate(self, dtype: torch.dtype) -> None:
        resolve_bit(self.bit, dtype)

    def write(self, tensor: Tensor, index: Tensor, generator: torch.Generator | None = None) -> None:
        int_dtype, total, _ = storage_format(tensor.dtype)
        ints = tensor.view(-1).view(int_dtype)
        mask = _bit_mask(resolve_bit(self.bit, tensor.dtype), int_dtype, total).to(tensor.device)
        ints[index] = ints[index] ^ mask


class Mean(Perturbation):
    """w ← the mean of its output row (all weights of the same output unit, read before any is changed).

    Layout-aware: the output row of a ``Linear`` weight (out, in) is a storage row, of a GPT-2 ``Conv1D``
    weight (in, out) a storage column. A 1-D tensor (a norm's gain, a bias) has no rows: its weights take
    the mean of the whole tensor. The mean is computed in float64 and cast to the tensor's dtype.
    """

    name = "mean"
    needs_layout = True

    def write(
        self, tensor: Tensor, index: Tensor, generator: torch.Generator | None = None, transposed: bool = False
    ) -> None:
        flat = tensor.view(-1)
        if tensor.dim() == 1:
            flat[index] = tensor.double().mean().to(tensor.dtype)
            return
        if tensor.dim() != 2:
            raise CwaError(f"mean ablation needs a 1-D or 2-D tensor, not one of shape {tuple(tensor.shape)}.")
        cols = tensor.shape[1]
        if transposed:  # (in, out): output unit = storage column
            means, unit = tensor.double().mean(dim=0), index % cols
        else:  # (out, in): output unit = storage row
            means, unit = tensor.double().mean(dim=1), index // cols
        flat[index] = means[unit].to(tensor.dtype)


PERTURBATIONS: dict[str, type[Perturbation]] = {
    cls.name: cls for cls in (Zero, Mean, SignFlip, Scale, GaussianNoise, BitFlip)
}
PerturbationName = Literal["zero", "mean", "sign_flip", "scale", "gaussian_noise", "bit_flip"]


def make_perturbation(spec: str | Perturbation) -> Perturbation:
    """A perturbation from its short name (default options) or as given.

    Args:
        spec: a name of ``PERTURBATIONS`` or a :class:`Perturbation`.
    """
    if isinstance(spec, Perturbation):
        return spec
    if spec not in PERTURBATIONS:
        raise CwaError(f"unknown perturbation '{spec}': use {', '.join(PERTURBATIONS)} or a class_path.")
    return PERTURBATIONS[spec]()


def seeded(*parts: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of integers (a condition's seed, K, rank, stream)."""
    value = 0
    for part in parts:
        value = (value * 1_000_003 + int(part)) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


def tensor_checksum(tensor: Tensor) -> str:
    """sha256 of a tensor's storage bytes (the exact bits)."""
    data = tensor.detach()
    if data.device.type != "cpu":
        data = data.cpu()
    data = data.contiguous()
    int_dtype = _FORMATS[data.dtype][0] if data.dtype in _FORMATS else None
    array = (data.view(int_dtype) if int_dtype is not None else data).numpy()
    return hashlib.sha256(memoryview(array).cast("B")).hexdigest()


@dataclass
class ChecksumCache:
    """Checksums of the untouched tensors, computed once each and compared after every restoration."""

    params: Mapping[str, Tensor]
    sums: dict[str, str] = field(default_factory=dict)

    def original(self, name: str) -> str:
        if name not in self.sums:
            self.sums[name] = tensor_checksum(self.params[name])
        return self.sums[name]

    def verify(self, names: list[str]) -> None:
        for name in names:
            if tensor_checksum(self.params[name]) != self.original(name):
                raise RuntimeError(f"restoring '{name}' did not reproduce its original bits; results are invalid.")


@contextlib.contextmanager
def perturbed(
    params: Mapping[str, Tensor],
    selection: Selection,
    perturbation: Perturbation,
    generator: torch.Generator | None = None,
    checksums: ChecksumCache | None = None,
    transposed: Mapping[str, bool] | None = None,
) -> Iterator[None]:
    """Apply ``perturbation`` to the selected weights for the duration of the block, then restore them.

    Restoration happens also when the block (or the perturbation itself) raises; with ``checksums``
    the touched tensors are verified bit for bit against their originals afterwards.

    Args:
        params: parameter name -> tensor (the model's own parameters, modified in place).
        selection: which weights to perturb.
        perturbation: how to perturb them.
        generator: random numbers for ``gaussian_noise`` (CPU generator).
        checksums: verify the touched tensors after restoring them.
        transposed: parameter name -> True for a (in, out) layout (GPT-2 ``Conv1D``; missing: False), for a
            perturbation that needs the weight's output row (``mean``).
    """
    saved: dict[str, tuple[Tensor, Tensor]] = {}
    names = [n for n, idx in selection.items() if idx.numel()]
    if checksums is not None:
        for name in names:
            checksums.original(name)
    try:
        with torch.no_grad():
            for name in names:
                tensor = params[name]
                if not tensor.is_contiguous():
                    raise CwaError(f"parameter '{name}' is not contiguous; flat indices cannot address it.")
                index = selection[name].to(tensor.device)
                int_dtype = _FORMATS[tensor.dtype][0]
                saved[name] = (index, tensor.view(-1).view(int_dtype)[index].clone())
                if perturbation.needs_layout:
                    perturbation.write(tensor, index, generator, transposed=bool((transposed or {}).get(name, False)))
                else:
                    perturbation.write(tensor, index, generator)
        yield
    finally:
        with torch.no_grad():
            for name, (index, bits) in saved.items():
                tensor = params[name]
                tensor.view(-1).view(bits.dtype)[index] = bits
        if checksums is not None:
            checksums.verify(list(saved))


# -- selections ------------------------------------------------------------------------------------
def selection_from(names: list[str], param: Tensor, index: Tensor) -> Selection:
    """Group (parameter position, flat index) pairs into a selection, tensors in ``names`` order."""
    out: Selection = {}
    for i, name in enumerate(names):
        mask = param == i
        if mask.any():
            out[name] = torch.unique(index[mask])  # sorted
    return out


def topk_prefix(topk: TopK, k: int) -> Selection:
    return selection_from(topk.names, topk.param[:k], topk.index[:k])


def selection_size(selection: Selection) -> int:
    return sum(int(idx.numel()) for idx in selection.values())
