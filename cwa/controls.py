"""Controls of ``cwa perturb``: weights chosen to match the top-K set, perturbed in the same way, so that
the top-K set's damage can be told from the damage of perturbing any K weights.

A control is a small class with a short ``name``, typed ``__init__`` options and two steps:
:meth:`Control.prepare` (once, before any evaluation: load or index what it needs) and
:meth:`Control.select` (the weights for one K and, for a random control, one seed). ``CONTROLS`` maps
the names to the classes; adding a control is one class in this file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

from torch import Tensor

from cwa.errors import CwaError
from cwa.perturbations import MagnitudeBins, Selection, bottomk, random_matched, seeded, topk_prefix
from cwa.topk import TopK


@dataclass
class ControlContext:
    """What a control may draw from.

    Args:
        params: the scored parameters (name -> the model's own tensor), in model order.
        topk: the run's ranked top-K list.
        max_k: the largest K of the dose-response curve.
        scores: loads the run's score tensors (name -> tensor, model order), or None without scores.
    """

    params: Mapping[str, Tensor]
    topk: TopK
    max_k: int
    scores: Callable[[], Mapping[str, Tensor]] | None


class Control(ABC):
    """A set of K weights to perturb instead of the top-K set. ``seeded`` controls are drawn once per seed."""

    name: ClassVar[str] = ""
    seeded: ClassVar[bool] = True

    def prepare(self, context: ControlContext) -> str | None:
        """Get ready to select; return a note when this control cannot be drawn for this run (it is then left out)."""
        self.context = context
        return None

    @abstractmethod
    def select(self, k: int, seed: int | None) -> Selection:
        """The control's weights for the top-``k`` set (``seed``: None for an unseeded control).

        Raises:
            ControlUnavailable: too few eligible weights for this K (the condition is skipped with a note).
        """

    def options(self) -> dict[str, object]:
        """The control's settings, as recorded in perturb.json."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and k != "context"}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.options().items())})"


class RandomMatched(Control):
    """K random weights with exactly the top-K set's count in each tensor, none of them in the top-K set."""

    name = "random_matched"
    stream: ClassVar[int] = 1  # keeps its draws independent of the other random controls' for the same seed

    def select(self, k: int, seed: int | None) -> Selection:
        target = topk_prefix(self.context.topk, k)
        return random_matched(self.context.params, target, seeded(seed or 0, k, self.stream))


class MagnitudeMatched(Control):
    """K random weights with exactly the top-K set's count in each |w| quantile bin (bins over all scored
    weights), none of them in the top-K set.

    Args:
        bins: number of |w| quantile bins.
    """

    name = "magnitude_matched"
    stream: ClassVar[int] = 2

    def __init__(self, bins: int = 100) -> None:
        if bins < 1:
            raise CwaError(f"magnitude_matched bins must be at least 1, got {bins}.")
        self.bins = bins

    def prepare(self, context: ControlContext) -> str | None:
        super().prepare(context)
        self._bins = MagnitudeBins(context.params, self.bins)
        return None

    def select(self, k: int, seed: int | None) -> Selection:
        return self._bins.matched(topk_prefix(self.context.topk, k), seeded(seed or 0, k, self.stream))


class BottomK(Control):
    """The K weights of lowest |score| over all scored tensors (needs the run's scores.safetensors)."""

    name = "bottomk"
    seeded = False

    def prepare(self, context: ControlContext) -> str | None:
        super().prepare(context)
        if context.scores is None:
            return "bottom-K skipped: the run has no scores.safetensors."
        self._bottom = bottomk(context.scores(), context.max_k)
        return None

    def select(self, k: int, seed: int | None) -> Selection:
        return topk_prefix(self._bottom, k)


CONTROLS: dict[str, type[Control]] = {cls.name: cls for cls in (RandomMatched, MagnitudeMatched, BottomK)}
ControlName = Literal["random_matched", "magnitude_matched", "bottomk"]


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
