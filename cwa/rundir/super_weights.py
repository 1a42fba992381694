"""``super_weights.csv``: a find-super-weights run, written with its figures and summary as one set, and read
back (:func:`read_super_weights`) by the report."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cwa.common.errors import CwaError
from cwa.common.io import read_regular, write_json
from cwa.rundir.files import FIGURES, SCHEMA_VERSION, SUMMARY, SUPER_WEIGHTS, SUPER_WEIGHTS_KIND
from cwa.rundir.outputs import OutputSet
from cwa.rundir.rows import cell
from cwa.rundir.validate import SUMMARY_BYTES


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


@dataclass
class SuperWeightsRun:
    """A complete find-super-weights run directory, as readers see it: its ``summary.json`` (candidates with
    their spikes, verdicts and ablation, the held-out baseline, the row test and super experts when present).
    """

    path: Path
    summary: dict

    @property
    def name(self) -> str:
        return f"{self.path.parent.name}/{self.path.name}"

    @property
    def figures_dir(self) -> Path:
        return self.path / FIGURES


def is_super_weights_run(path: str | Path) -> bool:
    """Whether ``path`` holds a find-super-weights run (its ``summary.json`` says so; cheap, never raises)."""
    summary = Path(path).expanduser() / SUMMARY
    try:
        data = json.loads(read_regular(summary, SUMMARY_BYTES, "summary").decode("utf-8"))
    except (OSError, CwaError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("kind") == SUPER_WEIGHTS_KIND


def read_super_weights(path: str | Path) -> SuperWeightsRun:
    """A find-super-weights run; one CwaError sentence when it is incomplete or its summary is unreadable."""
    path = Path(path).expanduser()
    try:
        data = json.loads(read_regular(path / SUMMARY, SUMMARY_BYTES, "summary").decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CwaError(f"'{path / SUMMARY}' is not readable JSON ({exc}); rerun find-super-weights.") from None
    if not isinstance(data, dict) or data.get("kind") != SUPER_WEIGHTS_KIND or data.get("status") != "complete":
        raise CwaError(f"'{path}' is not a complete find-super-weights run; rerun find-super-weights for it.")
    if not isinstance(data.get("candidates"), list) or not (path / SUPER_WEIGHTS).is_file():
        raise CwaError(f"'{path}' lacks its candidates or super_weights.csv; rerun find-super-weights for it.")
    # Entries of the wrong type are left out, so a reader never trips over one (each field is checked where read).
    data["candidates"] = [c for c in data["candidates"] if isinstance(c, dict)]
    experts = data.get("super_experts")
    data["super_experts"] = [e for e in experts if isinstance(e, dict)] if isinstance(experts, list) else []
    for key in ("settings", "heldout", "row_test"):
        if not isinstance(data.get(key), dict):
            data[key] = None
    return SuperWeightsRun(path, data)
