"""Activation restore in ``cwa perturb``: record the baseline output channels that a restored twin will replay,
and replay them while its weights stay perturbed (the mechanics are :mod:`cwa.ablation.restore`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch

from cwa.ablation.perturbations import Selection
from cwa.ablation.restore import RestoreMode
from cwa.ablation.units import expand
from cwa.common.errors import CwaError
from cwa.model.params import ParamInfo
from cwa.perturb.evaluate import Condition


class ActivationRestore:
    """The restore modes of one perturb run and, after the baseline pass, what it recorded.

    Args:
        modes: restore modes (``all``, ``spikes``); repeats are dropped, none turns restoring off.
        threshold: the spike threshold of ``spikes`` (times the channel's median |activation|).
    """

    def __init__(self, modes: Sequence[RestoreMode] = (), threshold: float = 10.0) -> None:
        from cwa.ablation.restore import RESTORE_MODES

        unknown = [m for m in modes if m not in RESTORE_MODES]
        if unknown:
            raise CwaError(f"unknown restore mode '{unknown[0]}': use {' or '.join(RESTORE_MODES)}.")
        if not (threshold > 0 and math.isfinite(threshold)):
            raise CwaError(f"restore_threshold must be a positive number, got {threshold}.")
        self.modes: tuple[str, ...] = tuple(dict.fromkeys(modes))
        self.threshold = float(threshold)
        self.recorder = None

    @contextmanager
    def recording(
        self,
        model: torch.nn.Module,
        longest: Selection,
        units: Sequence[str],
        shapes: Mapping[str, tuple[int, ...]],
        transposed: Mapping[str, bool],
        infos: Mapping[str, ParamInfo],
    ) -> Iterator[Callable[[int], None] | None]:
        """During the baseline pass, record the output channels of every weight a restored twin perturbs: those
        of ``longest`` (the longest top-K prefix any top-K set or single weight uses) at each of ``units``."""
        if not self.modes:
            yield None
            return
        from cwa.ablation.restore import output_channels, recording

        selection: Selection = {}
        for unit in units:  # a row or column reaches further than its weight
            for name, index in expand(longest, shapes, transposed, unit).items():
                selection[name] = torch.unique(torch.cat([selection.get(name, index[:0]), index]))
        channels = output_channels(model, selection, infos)
        with recording(model, channels) as recorder:
            yield recorder.at_batch
        self.recorder = recorder

    def replaying(
        self, model: torch.nn.Module, condition: Condition, selection: Selection, infos: Mapping[str, ParamInfo]
    ) -> AbstractContextManager:
        """For a restored twin, the baseline output channels of its weights' layers written back during its
        pass (the context yields the replayer); for any other condition a context yielding None."""
        if not condition.restore:
            return nullcontext(None)
        from cwa.ablation.restore import output_channels, replaying

        channels = output_channels(model, selection, infos)
        return replaying(model, self.recorder, channels, condition.restore, self.threshold)
