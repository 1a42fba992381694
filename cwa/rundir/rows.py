"""Typed CSV rows: one dataclass per table of a run directory, written and read by the same few lines.

A table's row class derives from :class:`CsvRow` (a dataclass whose fields are its columns, in order);
:func:`write_rows` and :func:`read_rows` move a list of them to and from a CSV file.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Iterable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

from cwa.common.errors import CwaError
from cwa.common.io import atomic_open, check_regular

R = TypeVar("R", bound="CsvRow")


def cell(value: object) -> str:
    """A CSV cell: empty for None, nine significant digits for a float."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.9g}"
    return str(value)


class CsvRow:
    """Base of a dataclass row: its fields are the CSV columns. A field with a default may be missing from
    an older file (it reads as the default); an empty cell reads as None ("" for a string)."""

    @classmethod
    def columns(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def cells(self) -> list[str]:
        return [cell(getattr(self, name)) for name in self.columns()]

    @classmethod
    def parse(cls: type[R], row: Mapping[str, str]) -> R:
        """A row from its CSV cells, each converted to its field's type."""
        hints = get_type_hints(cls)
        defaults = {f.name: f.default for f in fields(cls) if f.default is not dataclasses.MISSING}
        values: dict[str, Any] = {}
        for name in cls.columns():
            text, kind = row.get(name), hints[name]
            if text is None and name in defaults:  # a column added after this file was written
                values[name] = defaults[name]
            elif text is None or text == "":
                values[name] = "" if kind is str else None
            elif kind is str:
                values[name] = text
            elif int in getattr(kind, "__args__", (kind,)):
                values[name] = int(text)
            else:
                values[name] = float(text)
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def write_rows(path: Path, kind: type[CsvRow], rows: Iterable[CsvRow]) -> None:
    """``rows`` (of class ``kind``) as a CSV file with a header, written atomically."""
    with atomic_open(path, newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(kind.columns())
        for row in rows:
            writer.writerow(row.cells())


def read_rows(path: Path, kind: type[R]) -> list[R]:
    """The rows of a CSV file written by :func:`write_rows`; an unreadable file is one sentence."""
    try:
        check_regular(Path(path), os.stat(path), None, "table")  # a FIFO or a device would never end
        with open(path, newline="", encoding="utf-8") as handle:
            return [kind.parse(row) for row in csv.DictReader(handle)]
    except (OSError, UnicodeDecodeError, csv.Error, ValueError, TypeError) as exc:
        raise CwaError(f"cannot read '{path}' ({exc}); rerun cwa perturb for this run.") from None
