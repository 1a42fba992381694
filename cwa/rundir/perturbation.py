"""``perturb.csv`` and ``perturb.json``: typed perturbation rows, written as one set with the figures (and
``downstream.csv`` when lm-eval tasks ran), and read back only when the set is whole."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from cwa.common.errors import CwaError
from cwa.common.io import check_regular, read_regular, write_json
from cwa.rundir.downstream import DownstreamRow, read_downstream_csv, write_downstream_csv
from cwa.rundir.files import DOWNSTREAM_CSV, FIGURES, PERTURB_CSV, PERTURB_JSON
from cwa.rundir.outputs import OutputSet, sha256
from cwa.rundir.rows import CsvRow, read_rows, write_rows


class ConditionKind(StrEnum):
    """What a condition perturbs. A ``str`` enum: its value is what ``perturb.csv`` writes in ``target`` (a control
    writes its own name there instead of ``control``), so files written before it existed read the same."""

    BASELINE = "baseline"  # nothing perturbed
    TOPK = "topk"  # the first k of the ranked list, the joint set
    SINGLE = "single"  # the weight of one rank alone
    LEAVE_ONE_OUT = "leave_one_out"  # the top k without one member
    PAIR = "pair"  # two top weights together
    CONTROL = "control"  # weights drawn by a control to match the top-k set

    @classmethod
    def of(cls, target: str) -> ConditionKind:
        """The kind of a ``target`` cell: one of the set kinds, ``baseline``, or else a control's name."""
        try:
            return cls(target)
        except ValueError:
            return cls.CONTROL


SET_TARGETS = (ConditionKind.TOPK, ConditionKind.SINGLE, ConditionKind.LEAVE_ONE_OUT, ConditionKind.PAIR)
"""Targets drawn from the ranked list itself; any other target (but ``baseline``) is a control."""


@dataclass
class PerturbRow(CsvRow):
    """One row of ``perturb.csv``: a condition's held-out result against the unperturbed baseline.

    ``target`` is ``topk`` (the first ``k`` of the ranked list, the joint set), ``single`` (the weight of
    rank ``rank`` alone), ``leave_one_out`` (the top ``k`` without its member of rank ``rank``), ``pair``
    (the weights of ranks ``ranks``, e.g. ``1+2``, together) or a control's name (``random_matched``...,
    drawn to match the top-``k`` set). ``unit`` says what was perturbed around each chosen weight: the
    weight itself, every weight of its output ``row`` or of its input ``column`` (controls draw whole
    units of the same kind). ``delta_*`` are condition minus baseline with their confidence interval
    (``_low``, ``_high``); ``p_value`` tests the condition against ``p_value_vs`` (``baseline``, or
    ``topk`` — the top-K set of the same perturbation, K and unit — for a control and a leave-one-out set).
    ``broken_fraction`` is the share of held-out sequences with a non-finite NLL (the model broke on
    them; ``delta_*`` are then NaN and ``p_value`` empty). A perturb.csv written before a column existed
    reads with its default (``broken_fraction`` None, ``unit`` ``weight``, ``ranks`` and ``restore`` empty).
    A restored twin (``restore`` = ``all`` or ``spikes``: the same weights perturbed while their layer's
    output channels are written back from the baseline) tests against its perturbed condition
    (``p_value_vs`` names it) and carries ``recovered_fraction`` = (NLL perturbed − NLL restored) /
    (NLL perturbed − NLL baseline) with its interval (empty when the damage's interval includes 0) and
    ``restored_tokens``, the (token, channel) activations written back; other rows leave them empty.
    """

    condition: str
    perturbation: str
    target: str
    k: int | None
    rank: int | None
    seed: int | None
    n_weights: int
    perplexity: float
    nll: float
    accuracy: float
    delta_perplexity: float
    delta_perplexity_low: float
    delta_perplexity_high: float
    delta_nll: float
    delta_nll_low: float
    delta_nll_high: float
    delta_accuracy: float
    delta_accuracy_low: float
    delta_accuracy_high: float
    p_value: float | None
    p_value_vs: str
    broken_fraction: float | None = None
    unit: str = "weight"
    ranks: str = ""
    restore: str = ""
    recovered_fraction: float | None = None
    recovered_fraction_low: float | None = None
    recovered_fraction_high: float | None = None
    restored_tokens: int | None = None

    @property
    def kind(self) -> ConditionKind:
        """What the row's condition perturbed (``target`` with every control's name read as ``control``)."""
        return ConditionKind.of(self.target)

    @property
    def is_control(self) -> bool:
        """A control row (drawn to match a top-K set), not a baseline or a set from the ranked list."""
        return self.kind is ConditionKind.CONTROL


def write_perturb_csv(path: Path, rows: Iterable[PerturbRow]) -> None:
    write_rows(path, PerturbRow, rows)


def read_perturb_csv(path: Path) -> list[PerturbRow]:
    return read_rows(path, PerturbRow)


def write_perturbation(
    run_dir: Path,
    rows: list[PerturbRow],
    meta: dict,
    figures: Mapping[str, Callable[[Path], None]] | None = None,
    downstream: list[DownstreamRow] | None = None,
) -> list[str]:
    """Write ``perturb.csv``, the figures and ``perturb.json`` as one set: either all of them are the new
    ones or, after any failure or interrupt, all are the previous ones. ``perturb.json`` records the
    checksum of ``perturb.csv``, so a reader can tell a set that was split by a hard kill.

    Args:
        run_dir: the run directory.
        rows: the table, baseline first.
        meta: the contents of ``perturb.json`` (``status`` and the csv checksum are added).
        figures: ``{file name under figures/: function drawing into a given path}``; one that fails to draw
            is left out, and its note is returned and recorded under ``figure_notes`` in the json.
        downstream: the lm-eval task rows (``downstream.csv``, its checksum in ``perturb.json``); None
            removes a previous run's ``downstream.csv`` with the commit.
    """
    outputs = OutputSet(Path(run_dir))
    try:
        csv_tmp = outputs.stage(PERTURB_CSV)
        write_perturb_csv(csv_tmp, rows)
        checksums = {"perturb_csv_sha256": sha256(csv_tmp)}
        if downstream is None:
            outputs.remove(DOWNSTREAM_CSV)
        else:
            downstream_tmp = outputs.stage(DOWNSTREAM_CSV)
            write_downstream_csv(downstream_tmp, downstream)
            checksums["downstream_csv_sha256"] = sha256(downstream_tmp)
        notes = outputs.draw(figures, FIGURES)
        json_tmp = outputs.stage(PERTURB_JSON)
        write_json(json_tmp, {"status": "complete", **meta, **checksums, "figure_notes": notes})
        outputs.commit()
    finally:
        outputs.discard()
    return notes


@dataclass
class Perturbation:
    """A run's perturbation results (``perturb.csv`` and ``perturb.json``), or absent."""

    rows: list[PerturbRow]
    meta: dict
    downstream: list[DownstreamRow] | None = None  # downstream.csv, when lm-eval tasks ran

    @property
    def baseline(self) -> PerturbRow | None:
        return next((r for r in self.rows if r.kind is ConditionKind.BASELINE), None)


def read_perturbation(run_dir: Path) -> Perturbation | None:
    """A run's perturbation results, None when it has none; one CwaError sentence when the set is
    inconsistent (perturb.csv replaced without its perturb.json, as a hard kill could leave it)."""
    run_dir = Path(run_dir)
    csv_path, json_path = run_dir / PERTURB_CSV, run_dir / PERTURB_JSON
    if not csv_path.exists() and not json_path.exists():
        return None
    if not (csv_path.exists() and json_path.exists()):
        raise CwaError(f"'{run_dir}' has only one of perturb.csv and perturb.json; rerun cwa perturb for it.")
    check_regular(csv_path, csv_path.stat(), None, "perturbation table")  # a FIFO would hang the checksum
    try:
        meta = json.loads(read_regular(json_path, 64 << 20, "perturbation summary").decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CwaError(f"'{json_path}' is not readable JSON ({exc}); rerun cwa perturb for this run.") from None
    expected = meta.get("perturb_csv_sha256") if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or meta.get("status") != "complete":
        raise CwaError(f"'{json_path}' does not describe a complete perturbation; rerun cwa perturb for it.")
    if expected is not None and expected != sha256(csv_path):
        raise CwaError(
            f"'{csv_path}' does not match its perturb.json (an interrupted cwa perturb); rerun cwa perturb for it."
        )
    return Perturbation(read_perturb_csv(csv_path), meta, _read_downstream(run_dir, meta))


def _read_downstream(run_dir: Path, meta: dict) -> list[DownstreamRow] | None:
    """``downstream.csv`` when ``perturb.json`` records one (a file it does not record is not of this set)."""
    expected = meta.get("downstream_csv_sha256")
    if expected is None:
        return None
    path = run_dir / DOWNSTREAM_CSV
    if not path.exists() or sha256(path) != expected:
        raise CwaError(f"'{path}' is missing or does not match its perturb.json; rerun cwa perturb for it.")
    return read_downstream_csv(path)
