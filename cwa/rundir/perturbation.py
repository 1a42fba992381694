"""``perturb/<n>/perturb.csv`` and ``perturb.json``: typed perturbation rows, one numbered set per experiment
with its figures (and ``downstream.csv`` when lm-eval tasks ran), read back only when the set is whole. A run
directory written by an earlier cwa holds one set at its root (``perturb.csv``), read as experiment 0."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from cwa.common.errors import CwaError
from cwa.common.io import check_regular, read_regular, write_json
from cwa.rundir.downstream import DownstreamRow, read_downstream_csv, write_downstream_csv
from cwa.rundir.files import DOWNSTREAM_CSV, FIGURES, PERTURB, PERTURB_CSV, PERTURB_JSON
from cwa.rundir.outputs import SetDir, new_set, set_dirs, sha256
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
) -> tuple[Path, list[str]]:
    """Write one experiment's set into a new directory ``<run_dir>/perturb/<n>/`` (claimed atomically, so a
    concurrent perturb gets another number and no earlier set is replaced): ``perturb.csv``, ``downstream.csv``
    (lm-eval tasks), the figures under ``figures/`` and ``perturb.json``, last. Either the whole set is there or,
    after any failure or interrupt, none of it. ``perturb.json`` records the checksums of the csv files, so a
    reader can tell a set that was split by a hard kill.

    Args:
        run_dir: the run directory.
        rows: the table, baseline first.
        meta: the contents of ``perturb.json`` (``status`` and the csv checksums are added).
        figures: ``{file name under figures/: function drawing into a given path}``; one that fails to draw
            is left out, and its note is returned and recorded under ``figure_notes`` in the json.
        downstream: the lm-eval task rows (``downstream.csv``, its checksum in ``perturb.json``), or None.

    Returns:
        The set's directory and the notes on figures left out.
    """
    with new_set(Path(run_dir), PERTURB) as outputs:
        csv_tmp = outputs.stage(PERTURB_CSV)
        write_perturb_csv(csv_tmp, rows)
        checksums = {"perturb_csv_sha256": sha256(csv_tmp)}
        if downstream is not None:
            downstream_tmp = outputs.stage(DOWNSTREAM_CSV)
            write_downstream_csv(downstream_tmp, downstream)
            checksums["downstream_csv_sha256"] = sha256(downstream_tmp)
        notes = outputs.draw(figures, FIGURES)
        json_tmp = outputs.stage(PERTURB_JSON)
        write_json(json_tmp, {"status": "complete", **meta, **checksums, "figure_notes": notes})
        outputs.commit()
    return outputs.directory, notes


@dataclass
class Perturbation:
    """One experiment of ``cwa perturb`` on a run (``perturb.csv``, ``perturb.json`` and, with tasks,
    ``downstream.csv``): ``number`` counts the run's experiments from 1 in the order they were started (0: the
    root-level set of an earlier cwa), ``path`` is the set's directory."""

    rows: list[PerturbRow]
    meta: dict
    downstream: list[DownstreamRow] | None = None  # downstream.csv, when lm-eval tasks ran
    path: Path | None = None
    number: int = 0

    @property
    def baseline(self) -> PerturbRow | None:
        return next((r for r in self.rows if r.kind is ConditionKind.BASELINE), None)

    @property
    def name(self) -> str | None:
        """The ``--name`` it was given, if any."""
        name = self.meta.get("name")
        return name if isinstance(name, str) and name else None

    @property
    def label(self) -> str:
        """``perturb/2``, ``perturb/2 (name)``, or ``perturb.csv`` for the root-level set of an earlier cwa."""
        label = SetDir(PERTURB, self.number, self.path or Path()).label
        return f"{label} ({self.name})" if self.name else label

    @property
    def figures_dir(self) -> Path | None:
        return None if self.path is None else self.path / FIGURES


def read_perturbations(run_dir: Path) -> list[Perturbation]:
    """Every complete experiment of ``cwa perturb`` on a run, oldest first (none: []); one CwaError sentence
    when a set is inconsistent (a csv replaced without its json, as a hard kill could leave it)."""
    return [_read_set(s.path, s.number) for s in set_dirs(Path(run_dir), PERTURB)]


def read_perturbation(run_dir: Path) -> Perturbation | None:
    """The latest experiment of ``cwa perturb`` on a run (:func:`read_perturbations`), None when it has none."""
    found = read_perturbations(run_dir)
    return found[-1] if found else None


def _read_set(directory: Path, number: int) -> Perturbation:
    csv_path, json_path = directory / PERTURB_CSV, directory / PERTURB_JSON
    if not (csv_path.exists() and json_path.exists()):
        raise CwaError(f"'{directory}' has only one of perturb.csv and perturb.json; rerun cwa perturb for it.")
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
    return Perturbation(read_perturb_csv(csv_path), meta, _read_downstream(directory, meta), directory, number)


def _read_downstream(directory: Path, meta: dict) -> list[DownstreamRow] | None:
    """``downstream.csv`` when ``perturb.json`` records one (a file it does not record is not of this set)."""
    expected = meta.get("downstream_csv_sha256")
    if expected is None:
        return None
    path = directory / DOWNSTREAM_CSV
    if not path.exists() or sha256(path) != expected:
        raise CwaError(f"'{path}' is missing or does not match its perturb.json; rerun cwa perturb for it.")
    return read_downstream_csv(path)
