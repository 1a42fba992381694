"""``downstream.csv``: accuracy of lm-evaluation-harness tasks per perturbation condition, one set with
``perturb.csv`` and ``perturb.json`` (written and read by :mod:`cwa.rundir.perturbation`)."""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, get_type_hints

from cwa.errors import CwaError
from cwa.io import atomic_open


@dataclass
class DownstreamRow:
    """One row of ``downstream.csv``: one task's accuracy under one condition (``baseline`` first).

    ``delta_accuracy`` is condition minus baseline over the same items, with a paired studentized bootstrap
    interval over items (``_low``, ``_high``); ``p_value`` is McNemar's exact test against the baseline
    (empty for the baseline). ``seconds`` is the lm-eval wall time of this task under this condition.
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

    @classmethod
    def columns(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def cells(self) -> list[str]:
        from cwa.rundir.perturbation import cell

        return [cell(getattr(self, name)) for name in self.columns()]

    @classmethod
    def parse(cls, row: Mapping[str, str]) -> DownstreamRow:
        """A row from its CSV cells, each converted to its field's type (empty cell: None)."""
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        for name in cls.columns():
            text, kind = row.get(name), hints[name]
            if kind is str:
                values[name] = text or ""
            elif text is None or text == "":
                values[name] = None
            else:
                values[name] = int(text) if kind is int else float(text)
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def write_downstream_csv(path: Path, rows: Iterable[DownstreamRow]) -> None:
    with atomic_open(path, newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(DownstreamRow.columns())
        for row in rows:
            writer.writerow(row.cells())


def read_downstream_csv(path: Path) -> list[DownstreamRow]:
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            return [DownstreamRow.parse(row) for row in csv.DictReader(handle)]
    except (OSError, UnicodeDecodeError, csv.Error, ValueError, TypeError) as exc:
        raise CwaError(f"cannot read '{path}' ({exc}); rerun cwa perturb for this run.") from None
