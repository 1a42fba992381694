"""The metric registry: each short name of ``model.metric`` and the scorer class it stands for.

It sits above the modules of the metrics (:mod:`cwa.scoring.scorers`, :mod:`cwa.scoring.hutchinson`,
:mod:`cwa.scoring.saliency`, :mod:`cwa.scoring.obd`), so that none has to import another to be found.
A metric outside the registry is given by ``class_path``.
"""

from __future__ import annotations

from cwa.common.errors import CwaError
from cwa.scoring.base import Scorer
from cwa.scoring.hutchinson import HutchinsonDiag
from cwa.scoring.obd import OBD
from cwa.scoring.saliency import OBS, Wanda
from cwa.scoring.scorers import GradSquared, GradXWeight, Magnitude
from cwa.scoring.shared_pass import SharedPass

METRICS: dict[str, type[Scorer]] = {
    cls.name: cls for cls in (Magnitude, GradXWeight, GradSquared, HutchinsonDiag, Wanda, OBS, OBD)
}


def make_scorer(metric: Scorer | str | list[Scorer | str]) -> Scorer:
    """A scorer instance from an instance, a short name (``grad_x_weight``, ``wanda``, ...) or a list of them
    (a :class:`cwa.scoring.shared_pass.SharedPass` over them; a list of one is that one metric)."""
    if isinstance(metric, (list, tuple)):
        members = [make_scorer(m) for m in metric]
        if not members:
            raise CwaError("the metric list is empty; name at least one metric.")
        return members[0] if len(members) == 1 else SharedPass(members)
    if isinstance(metric, Scorer):
        return metric
    try:
        return METRICS[metric]()
    except KeyError:
        raise CwaError(f"unknown metric '{metric}': choose one of {', '.join(METRICS)}.") from None
