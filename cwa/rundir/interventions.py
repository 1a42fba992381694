"""``prune/<n>/prune.csv`` + ``prune.json`` and ``protect/<n>/protect.csv`` + ``protect.json``: the typed rows
of ``cwa prune`` and ``cwa protect``, one numbered set per experiment with its figures and, with ``--tasks``, its
lm-eval rows (``prune_downstream.csv`` / ``protect_downstream.csv``): all of it or none, read back only whole. A
directory written by an earlier cwa holds one set at its root, read as set 0."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cwa.common.errors import CwaError
from cwa.common.io import write_json
from cwa.rundir.downstream import DownstreamRow, read_downstream_csv, write_downstream_csv
from cwa.rundir.files import (
    FIGURES,
    PROTECT_CSV,
    PROTECT_DOWNSTREAM_CSV,
    PROTECT_JSON,
    PRUNE_CSV,
    PRUNE_DOWNSTREAM_CSV,
    PRUNE_JSON,
)
from cwa.rundir.outputs import SetDir, new_set, set_dirs, sha256
from cwa.rundir.rows import CsvRow, read_rows, write_rows

Kind = Literal["prune", "protect"]
BASELINE = "baseline"
"""The condition name of the unchanged model (dense, unstressed) in the downstream rows."""


@dataclass
class PruneRow(CsvRow):
    """One row of ``prune.csv``: the model pruned by one run's metric (``dense``: the unpruned baseline) in
    ``structure`` (``unstructured`` or ``N:M``) within comparison ``group`` (row, tensor, global) at
    ``sparsity``; ``removed`` weights out of ``weights`` in the pruned tensors.

    ``delta_*`` are the change from the dense model with their interval (``_low``, ``_high``, paired over
    held-out sequences), ``p_value`` tests the pruned model against it; ``broken_fraction`` is the share of
    sequences with a non-finite NLL (``delta_*`` are then NaN)."""

    metric: str
    run: str
    structure: str
    group: str
    sparsity: float
    weights: int
    removed: int
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
    broken_fraction: float | None
    over: str = "sequences"

    @property
    def condition(self) -> str:
        """The row's name in ``prune_downstream.csv`` (``baseline`` for the dense model)."""
        if self.metric == "dense":
            return BASELINE
        return "/".join((self.metric, self.run, self.structure, self.group, f"sparsity={self.sparsity:g}"))


@dataclass
class ProtectRow(CsvRow):
    """One row of ``protect.csv``: a stress (``none``: the baseline) at ``level`` (its ``level_name``: bits,
    sparsity, p, sigma) applied to every chosen weight except a protected set: ``protected`` is ``none``
    (K = 0), ``topk`` (the run's top-K), ``super_weights`` or a control of the same size (``random_matched``,
    ``magnitude_matched``, drawn with ``set_seed``), at ``unit`` (the weights, or their rows or columns);
    ``n_protected`` weights kept exactly. ``seed`` is the random stress's seed (empty for a deterministic
    stress, and on the mean-over-seeds rows, ``over`` = ``seeds``, ``seeds`` passes); ``changed`` counts the
    weights whose bits the stress changed."""

    stress: str
    level_name: str
    level: float | None
    protected: str
    unit: str
    k: int
    n_protected: int
    set_seed: int | None
    seed: int | None
    seeds: int
    changed: int | None
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
    broken_fraction: float | None
    over: str = "sequences"

    @property
    def condition(self) -> str:
        """The row's name in ``protect_downstream.csv`` (``baseline`` for the unstressed model; a mean over
        seeds ends in ``/mean``)."""
        if self.stress == "none":
            return BASELINE
        parts = [self.stress, f"{self.level_name}={self.level:g}", self.protected, self.unit, f"k={self.k}"]
        if self.over == "seeds":
            return "/".join([*parts, "mean"])
        parts += [f"set_seed={self.set_seed}"] if self.set_seed is not None else []
        return "/".join(parts + ([f"seed={self.seed}"] if self.seed is not None else []))


_FILES: dict[str, tuple[str, str, type[CsvRow]]] = {
    "prune": (PRUNE_CSV, PRUNE_JSON, PruneRow),
    "protect": (PROTECT_CSV, PROTECT_JSON, ProtectRow),
}
_DOWNSTREAM = {"prune": PRUNE_DOWNSTREAM_CSV, "protect": PROTECT_DOWNSTREAM_CSV}


def write_intervention(
    directory: Path,
    kind: Kind,
    rows: Iterable[CsvRow],
    meta: dict,
    figures: Mapping[str, Callable[[Path], None]] | None = None,
    downstream: list[DownstreamRow] | None = None,
) -> tuple[Path, list[str]]:
    """Write one experiment's set into a new directory ``<directory>/<kind>/<n>/`` (claimed atomically: a
    concurrent run gets another number and no earlier set is replaced): ``<kind>.csv``, ``<kind>_downstream.csv``
    (``--tasks``), the figures under ``figures/`` and ``<kind>.json`` (with the csvs' sha256), last; all of it,
    or after any failure or interrupt none of it.

    Args:
        directory: where the sets go (a run directory, or prune's ``--output``).
        kind: ``prune`` or ``protect``.
        rows: the table, baseline first.
        meta: the contents of the json (``status`` and the checksum are added).
        figures: ``{file name under figures/: function drawing into a given path}``; one that fails to draw
            is left out, and its note is returned and recorded under ``figure_notes`` in the json.
        downstream: the lm-eval task rows of ``--tasks`` (their checksum in the json), or None.

    Returns:
        The set's directory and the notes on figures left out.
    """
    csv_name, json_name, row_class = _FILES[kind]
    with new_set(Path(directory), kind) as outputs:
        csv_tmp = outputs.stage(csv_name)
        write_rows(csv_tmp, row_class, rows)
        checksums = {f"{kind}_csv_sha256": sha256(csv_tmp)}
        if downstream is not None:
            downstream_tmp = outputs.stage(_DOWNSTREAM[kind])
            write_downstream_csv(downstream_tmp, downstream)
            checksums["downstream_csv_sha256"] = sha256(downstream_tmp)
        notes = outputs.draw(figures, FIGURES)
        full = {"status": "complete", **meta, **checksums, "figure_notes": notes}
        write_json(outputs.stage(json_name), full)
        outputs.commit()
    return outputs.directory, notes


@dataclass
class InterventionSet:
    """One experiment of ``cwa prune`` or ``cwa protect``: its rows, its json and where the set lies
    (``number`` from 1 in the order started; 0 for the root-level set of an earlier cwa)."""

    kind: str
    rows: list
    meta: dict
    path: Path
    number: int
    downstream: list[DownstreamRow] | None = None  # <kind>_downstream.csv, with --tasks

    @property
    def label(self) -> str:
        """``prune/2``, ``prune/2 (name)``, or ``prune.csv`` for the root-level set of an earlier cwa."""
        label = SetDir(self.kind, self.number, self.path).label
        name = self.meta.get("name")
        return f"{label} ({name})" if isinstance(name, str) and name else label

    @property
    def figures_dir(self) -> Path:
        return self.path / FIGURES


def read_interventions(directory: Path, kind: Kind) -> list[InterventionSet]:
    """Every complete ``prune`` or ``protect`` set of a directory, oldest first; one sentence when one was split."""
    return [_read_set(s.path, kind, s.number) for s in set_dirs(Path(directory), kind)]


def read_intervention(directory: Path, kind: Kind) -> tuple[list, dict] | None:
    """(rows, meta) of the latest ``prune`` or ``protect`` set, None when there is none."""
    found = read_interventions(directory, kind)
    return (found[-1].rows, found[-1].meta) if found else None


def _read_set(directory: Path, kind: Kind, number: int) -> InterventionSet:
    csv_name, json_name, row_class = _FILES[kind]
    csv_path, json_path = directory / csv_name, directory / json_name
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        meta = None
    if not isinstance(meta, dict) or meta.get("status") != "complete" or not csv_path.exists():
        raise CwaError(f"'{directory}' holds an incomplete {kind} set; rerun cwa {kind} for it.")
    if meta.get(f"{kind}_csv_sha256") != sha256(csv_path):
        raise CwaError(f"'{csv_path}' does not match its {json_name} (an interrupted cwa {kind}); rerun it.")
    downstream = _downstream_of(directory, kind, meta)
    return InterventionSet(kind, read_rows(csv_path, row_class), meta, directory, number, downstream)


def read_intervention_downstream(directory: Path, kind: Kind, meta: dict) -> list[DownstreamRow] | None:
    """The lm-eval rows of the ``prune`` or ``protect`` set of ``directory`` whose json is ``meta`` (from
    :func:`read_intervention`: the latest), None when it ran without ``--tasks``."""
    return next((s.downstream for s in reversed(read_interventions(directory, kind)) if s.meta == meta), None)


def _downstream_of(directory: Path, kind: Kind, meta: dict) -> list[DownstreamRow] | None:
    """A set's lm-eval rows when its json records them; one sentence when the file does not match."""
    expected = meta.get("downstream_csv_sha256")
    if expected is None:
        return None
    path = Path(directory) / _DOWNSTREAM[kind]
    if not path.exists() or sha256(path) != expected:
        raise CwaError(f"'{path}' is missing or does not match its {kind}.json (an interrupted cwa {kind}); rerun it.")
    return read_downstream_csv(path)
