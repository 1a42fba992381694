"""Model-wide interventions (pruning, RTN quantization, bit errors, noise) applied in place to every chosen
tensor except a protected set, and undone bit for bit.

A :class:`Stress` is a small class with a ``name``, typed ``__init__`` options and one per-tensor
:meth:`~Stress.edit`; :func:`intervened` applies it to each tensor in turn for the duration of a block and
restores the saved bits afterwards (also on error), verified by checksum. What is saved is the bound on
memory: the changed entries of a sparse edit (pruning: the removed weights; bit errors: the hit weights)
or a copy of each tensor a dense edit rewrites (RTN, noise) — at most one copy of the transformed tensors,
kept in host memory when the model is on a GPU — plus, while a tensor is edited, its new values.

Protection means the protected weights keep their exact values *and take no part in the stress's
statistics*: RTN ranges, the noise's rms and the pruning competition are over the unprotected weights.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor

from cwa.ablation.faults import BIT_FIELDS, BitField, apply_bit_errors, draw_bit_errors, noisy
from cwa.ablation.perturbations import ChecksumCache, Selection, storage_format
from cwa.ablation.pruning import GROUPS, Group, check_sparsity, global_masks, parse_structure, prune_key, tensor_mask
from cwa.ablation.quantize import check_rtn, rtn
from cwa.common.errors import CwaError

Edit = tuple[Tensor | None, Tensor]
"""(flat indices, their new values), or (None, the whole tensor's new values)."""


@dataclass
class StressContext:
    """What a stress sees.

    Args:
        params: name -> the model's own tensor (edited in place), in model order.
        protected: name -> sorted flat indices that keep their values (missing: none).
        transposed: name -> True for a (in, out) layout (GPT-2 ``Conv1D``).
        scores: name -> the pruning score of each weight (None: |w|, magnitude pruning).
        generator: random numbers of a random stress (CPU).
    """

    params: Mapping[str, Tensor]
    protected: Selection = field(default_factory=dict)
    transposed: Mapping[str, bool] = field(default_factory=dict)
    scores: Callable[[str], Tensor] | None = None
    generator: torch.Generator | None = None

    def protected_of(self, name: str) -> Tensor | None:
        index = self.protected.get(name)
        return None if index is None or index.numel() == 0 else index


class Stress(ABC):
    """A model-wide change of every unprotected weight of the chosen tensors; ``level`` is its strength
    (bits, sparsity, bit-error rate, noise sigma), the x axis of cwa's figures."""

    name: ClassVar[str] = ""
    random: ClassVar[bool] = False
    level_name: ClassVar[str] = ""

    @property
    @abstractmethod
    def level(self) -> float:
        """The stress's strength, in its own unit."""

    def prepare(self, context: StressContext) -> None:
        """Work across tensors before any is edited (global pruning's cut)."""
        return

    @abstractmethod
    def edit(self, name: str, tensor: Tensor, context: StressContext) -> Edit | None:
        """The change of one tensor (None: unchanged); ``tensor`` is not modified here."""

    def validate(self, dtype: torch.dtype) -> None:
        """Fail before any work on a setting the weights' format cannot take."""
        return

    def options(self) -> dict[str, object]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def describe(self) -> str:
        return " ".join([self.name, *(f"{k}={v}" for k, v in self.options().items())])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.options().items())})"


class Prune(Stress):
    """Remove (zero) the weights of lowest |score| in each comparison group; protected weights never.

    Args:
        sparsity: the share of each group removed (unstructured).
        group: ``row`` (each output unit, as Wanda), ``tensor`` or ``global`` (the whole model).
        structure: ``unstructured`` or ``N:M`` (N of every M consecutive inputs of a row, e.g. ``2:4``).
    """

    name = "prune"
    level_name = "sparsity"

    def __init__(self, sparsity: float = 0.5, group: Group = "row", structure: str = "unstructured") -> None:
        if group not in GROUPS:
            raise CwaError(f"unknown comparison group '{group}': use {', '.join(GROUPS)}.")
        nm = parse_structure(structure)
        if nm is not None and group == "global":
            raise CwaError(f"{structure} sparsity is per row: use it with group row, not global.")
        self.sparsity = check_sparsity(sparsity) if nm is None else nm[0] / nm[1]
        self.group, self.structure = group, structure
        self._masks: dict[str, Tensor] | None = None

    @property
    def level(self) -> float:
        return self.sparsity

    def _key(self, name: str, context: StressContext) -> Tensor:
        tensor = context.params[name]
        score = context.scores(name) if context.scores is not None else tensor
        if tuple(score.shape) != tuple(tensor.shape):
            raise CwaError(f"the scores of '{name}' have shape {tuple(score.shape)}, the weight {tuple(tensor.shape)}.")
        return prune_key(score.to(tensor.device), context.protected_of(name))

    def prepare(self, context: StressContext) -> None:
        self._masks = None
        if self.group == "global":
            keys = {name: self._key(name, context) for name in context.params}
            self._masks = global_masks(keys, self.sparsity)

    def edit(self, name: str, tensor: Tensor, context: StressContext) -> Edit | None:
        if self._masks is not None:
            mask = self._masks.pop(name)
        else:
            key = self._key(name, context)
            group = "row" if self.structure != "unstructured" else self.group
            mask = tensor_mask(key, self.sparsity, group, self.structure, bool(context.transposed.get(name, False)))
        index = torch.nonzero(mask.reshape(-1)).squeeze(1)
        return index, torch.zeros(index.numel(), dtype=tensor.dtype, device=tensor.device)

    def options(self) -> dict[str, object]:
        return {"sparsity": self.sparsity, "group": self.group, "structure": self.structure}


class RTN(Stress):
    """Round-to-nearest integer quantization (see :mod:`cwa.ablation.quantize`).

    Args:
        bits: integer width.
        group_size: consecutive inputs of one output row sharing a scale (None: whole rows).
        symmetric: absmax symmetric grid, or min-max asymmetric.
        clip_ratio: each group's range is this share of its unprotected range (1: no clipping).
    """

    name = "rtn"
    level_name = "bits"

    def __init__(
        self, bits: int = 4, group_size: int | None = None, symmetric: bool = True, clip_ratio: float = 1.0
    ) -> None:
        check_rtn(bits, group_size, clip_ratio)
        self.bits, self.group_size, self.symmetric, self.clip_ratio = int(bits), group_size, symmetric, clip_ratio

    @property
    def level(self) -> float:
        return float(self.bits)

    def edit(self, name: str, tensor: Tensor, context: StressContext) -> Edit | None:
        protected, transposed = context.protected_of(name), bool(context.transposed.get(name, False))
        return None, rtn(tensor, self.bits, self.group_size, self.symmetric, protected, transposed, self.clip_ratio)


class BitErrors(Stress):
    """Every stored bit of every unprotected weight flips independently with probability ``p``.

    Args:
        p: the bit-error rate.
        field: which bits may flip: ``all``, ``sign`` or ``exponent``.
    """

    name = "bit_errors"
    random = True
    level_name = "p"

    def __init__(self, p: float = 1e-6, field: BitField = "all") -> None:
        if field not in BIT_FIELDS:
            raise CwaError(f"unknown bit field '{field}': use {', '.join(BIT_FIELDS)}.")
        if not 0.0 <= p <= 1.0:
            raise CwaError(f"a bit-error rate is a probability, got {p}.")
        self.p, self.field = float(p), field

    @property
    def level(self) -> float:
        return self.p

    def validate(self, dtype: torch.dtype) -> None:
        storage_format(dtype)

    def edit(self, name: str, tensor: Tensor, context: StressContext) -> Edit | None:
        index, masks = draw_bit_errors(
            tensor.numel(), tensor.dtype, self.p, self.field, context.protected_of(name), context.generator
        )
        if index.numel() == 0:
            return None
        values = tensor.view(-1)[index.to(tensor.device)].clone()
        apply_bit_errors(values, torch.arange(values.numel(), device=values.device), masks)
        return index, values


class Noise(Stress):
    """Gaussian noise: w ← w + sigma · rms · z, rms over each tensor's unprotected weights.

    Args:
        sigma: the noise level relative to the tensor's rms.
    """

    name = "noise"
    random = True
    level_name = "sigma"

    def __init__(self, sigma: float = 0.1) -> None:
        if not sigma >= 0:
            raise CwaError(f"the noise sigma must be 0 or more, got {sigma}.")
        self.sigma = float(sigma)

    @property
    def level(self) -> float:
        return self.sigma

    def edit(self, name: str, tensor: Tensor, context: StressContext) -> Edit | None:
        return None, noisy(tensor, self.sigma, context.protected_of(name), context.generator)


STRESSES: dict[str, type[Stress]] = {cls.name: cls for cls in (Prune, RTN, BitErrors, Noise)}
StressName = Literal["prune", "rtn", "bit_errors", "noise"]


@dataclass
class Applied:
    """What an intervention saw and changed."""

    weights: int = 0
    edited: int = 0  # weights written (a pruned weight that was already zero counts)
    changed: int = 0  # weights whose bits differ afterwards
    tensors: int = 0


def _int_view(tensor: Tensor) -> Tensor:
    return tensor.view(storage_format(tensor.dtype)[0])


@contextlib.contextmanager
def intervened(
    stress: Stress, context: StressContext, checksums: ChecksumCache | None = None, backup: str = "cpu"
) -> Iterator[Applied]:
    """Apply ``stress`` to every tensor of ``context.params`` for the duration of the block, then restore the
    original bits (also when the block or the stress raises); with ``checksums`` every edited tensor is
    verified against its original afterwards.

    Args:
        stress: the intervention.
        context: the tensors (edited in place), the protected set, layouts, scores, random numbers.
        checksums: verify the edited tensors after restoring them.
        backup: the device that holds the saved values (host memory by default).
    """
    saved: dict[str, tuple[Tensor | None, Tensor]] = {}
    applied = Applied()
    try:
        with torch.no_grad():
            stress.prepare(context)
            for name, tensor in context.params.items():
                if not tensor.is_contiguous():
                    raise CwaError(f"parameter '{name}' is not contiguous; flat indices cannot address it.")
                if checksums is not None:
                    checksums.original(name)
                applied.weights += tensor.numel()
                edit = stress.edit(name, tensor, context)
                if edit is None:
                    continue
                index, values = edit
                bits = _int_view(tensor).view(-1)
                if index is None:
                    saved[name] = (None, bits.to(backup, copy=True))
                    tensor.copy_(values)
                    applied.edited += tensor.numel()
                    applied.changed += int((bits != saved[name][1].to(bits.device)).sum())
                else:
                    index = index.to(tensor.device)
                    saved[name] = (index, bits[index].to(backup, copy=True))
                    tensor.view(-1)[index] = values.to(tensor.dtype)
                    applied.edited += index.numel()
                    applied.changed += int((bits[index] != saved[name][1].to(bits.device)).sum())
                applied.tensors += 1
        yield applied
    finally:
        with torch.no_grad():
            for name, (index, original) in saved.items():
                bits = _int_view(context.params[name]).view(-1)
                if index is None:
                    bits.copy_(original.to(bits.device))
                else:
                    bits[index] = original.to(bits.device)
        if checksums is not None:
            checksums.verify(list(saved))
