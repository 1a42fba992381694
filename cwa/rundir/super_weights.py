"""``super_weights.csv``: a find-super-weights run, written with its figures and summary as one set."""

from __future__ import annotations

import csv
from collections.abc import Callable, Mapping
from pathlib import Path

from cwa.common.io import write_json
from cwa.rundir.files import FIGURES, SCHEMA_VERSION, SUMMARY, SUPER_WEIGHTS, SUPER_WEIGHTS_KIND
from cwa.rundir.outputs import OutputSet
from cwa.rundir.rows import cell


def write_super_weights(
    run_dir: Path,
    rows: list[dict],
    summary: dict,
    figures: Mapping[str, Callable[[Path], None]] | None = None,
    tables: Mapping[str, list[dict]] | None = None,
) -> list[str]:
    """A find-super-weights run: ``super_weights.csv`` (one row per MLP output projection), further tables
    (file name -> rows, e.g. ``row_test.csv``), the figures and ``summary.json`` (``kind: find-super-weights``,
    written last) as one set; returns a note per figure that could not be drawn (left out, the results still
    written)."""
    outputs = OutputSet(Path(run_dir))
    try:
        for name, table in {SUPER_WEIGHTS: rows, **(tables or {})}.items():
            with open(outputs.stage(name), "w", newline="", encoding="utf-8") as handle:
                columns = list(dict.fromkeys(key for row in table for key in row))
                writer = csv.DictWriter(handle, fieldnames=columns)
                writer.writeheader()
                writer.writerows({k: cell(v) for k, v in row.items()} for row in table)
        notes = outputs.draw(figures, FIGURES)
        full = {"status": "complete", "schema": SCHEMA_VERSION, "kind": SUPER_WEIGHTS_KIND, **summary}
        full["figure_notes"] = notes
        write_json(outputs.stage(SUMMARY), full)
        outputs.commit()
    finally:
        outputs.discard()
    return notes
