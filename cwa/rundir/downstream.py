"""``downstream.csv``: accuracy of lm-evaluation-harness tasks per condition, one set with ``perturb.csv`` and
``perturb.json`` (written and read by :mod:`cwa.rundir.perturbation`); ``prune_downstream.csv`` and
``protect_downstream.csv`` hold the same rows in the sets of ``cwa prune`` and ``cwa protect``
(:mod:`cwa.rundir.interventions`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cwa.rundir.rows import CsvRow, read_rows, write_rows


@dataclass
class DownstreamRow(CsvRow):
    """One row of ``downstream.csv``: one task's accuracy under one condition (``baseline`` first).

    ``delta_accuracy`` is condition minus baseline over the same items, with a paired studentized bootstrap
    interval over items (``_low``, ``_high``); ``p_value`` is McNemar's exact test against the baseline
    (empty for the baseline). ``seconds`` is the lm-eval wall time of this task under this condition. A row
    with ``over`` = ``seeds`` stands for ``seeds`` conditions that differ only in their random seed: the mean
    accuracy and change, a Student-t interval over the seeds, no p-value (``cwa protect``'s random stresses
    and sets).
    """

    condition: str
    task: str
    items: int
    accuracy: float
    delta_accuracy: float
    delta_accuracy_low: float
    delta_accuracy_high: float
    p_value: float | None
    seconds: float
    seeds: int = 1
    over: str = "items"


def write_downstream_csv(path: Path, rows: Iterable[DownstreamRow]) -> None:
    write_rows(path, DownstreamRow, rows)


def read_downstream_csv(path: Path) -> list[DownstreamRow]:
    return read_rows(path, DownstreamRow)
