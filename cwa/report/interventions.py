"""The report's section on ``cwa prune`` and ``cwa protect``: one compact table per experiment
(``prune/<n>/``, ``protect/<n>/``, or the root-level set of an earlier cwa) of a run directory, labelled (with each
lm-eval task's accuracy and its change when the set ran ``--tasks``), with the figures that experiment drew
linked beside it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cwa.common import format as fmt
from cwa.report.text import _rel, _table
from cwa.rundir import DownstreamRow, Run
from cwa.rundir.interventions import InterventionSet, ProtectRow, PruneRow, read_interventions

PRUNE_FIGURES = ("prune.png",)
PROTECT_FIGURES = ("protect_k.png", "protect_level.png")


@dataclass
class Interventions:
    """The prune and protect experiments written into one run directory, oldest first (empty where none)."""

    prune: list[InterventionSet] = field(default_factory=list)
    protect: list[InterventionSet] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.prune or self.protect)

    def to_json(self) -> dict:
        return {
            kind: [
                {
                    "experiment": s.label,
                    "path": str(s.path),
                    "rows": [r.as_dict() for r in s.rows],
                    "downstream": [r.as_dict() for r in s.downstream or []],
                }
                for s in sets
            ]
            for kind, sets in (("prune", self.prune), ("protect", self.protect))
        }


def interventions_of(run: Run) -> Interventions:
    """The prune and protect sets of a run directory; an incomplete set stops in one sentence."""
    return Interventions(read_interventions(run.path, "prune"), read_interventions(run.path, "protect"))


def _delta(row: PruneRow | ProtectRow) -> str:
    return fmt.interval(row.delta_perplexity, row.delta_perplexity_low, row.delta_perplexity_high, fmt.effect)


def _task_columns(tasks: list[DownstreamRow]) -> tuple[list[str], Callable[[PruneRow | ProtectRow], list[str]]]:
    """Per lm-eval task, the header of its accuracy and change columns and a function giving a row's cells."""
    names = list(dict.fromkeys(r.task for r in tasks))
    by = {(r.condition, r.task): r for r in tasks}
    header = [h for name in names for h in (f"{name} acc", "Δacc [95% CI]")]

    def cells(row: PruneRow | ProtectRow) -> list[str]:
        out = []
        for name in names:
            found = by.get((row.condition, name))
            if found is None:
                out += ["", ""]
                continue
            low, high = found.delta_accuracy_low, found.delta_accuracy_high
            change = "" if row.condition == "baseline" else fmt.interval(found.delta_accuracy, low, high, fmt.effect)
            out += [fmt.number(found.accuracy), change]
        return out

    return header, cells


def prune_table(rows: list[PruneRow], tasks: list[DownstreamRow] | None = None) -> list[str]:
    """Metric, structure, group, sparsity, perplexity and Δ perplexity from the dense model per pruning, and
    each task's accuracy and its change when the set ran ``--tasks``."""
    extra, cells = _task_columns(tasks or [])
    header = ["pruned by", "structure", "group", "sparsity", "removed", "ppl", "Δppl [95% CI]", "p", *extra]
    table = [
        [r.metric, r.structure, r.group, fmt.percent(r.sparsity), fmt.count(r.removed), fmt.perplexity(r.perplexity),
         _delta(r), fmt.p_value(r.p_value), *cells(r)]
        for r in rows
    ]  # fmt: skip
    return _table(header, table)


def _compact(rows: list[ProtectRow]) -> list[ProtectRow]:
    """The rows to show: where several seeds were averaged, only their mean row."""
    averaged = {(r.stress, r.level, r.protected, r.unit, r.k) for r in rows if r.over == "seeds"}
    return [r for r in rows if r.over == "seeds" or (r.stress, r.level, r.protected, r.unit, r.k) not in averaged]


def protect_table(rows: list[ProtectRow], tasks: list[DownstreamRow] | None = None) -> list[str]:
    """Stress level, protected set, K and the quality against the unstressed model per condition, and each
    task's accuracy and its change when the set ran ``--tasks`` (a mean over seeds: the tasks' mean too)."""
    extra, cells = _task_columns(tasks or [])
    header = ["stress", "level", "protected", "unit", "K", "kept", "seeds", "ppl", "Δppl [95% CI]", "p", *extra]
    table = [
        [r.stress, "" if r.level is None else f"{r.level_name} = {r.level:g}",
         r.protected, r.unit, fmt.count(r.k), fmt.count(r.n_protected), str(r.seeds), fmt.perplexity(r.perplexity),
         _delta(r), fmt.p_value(r.p_value), *cells(r)]
        for r in _compact(rows)
    ]  # fmt: skip
    return _table(header, table)


def section(labels: list[str], found: list[Interventions], output: Path) -> list[str]:
    """The Markdown of the section (nothing when no run directory holds a prune or protect set)."""
    if not any(found):
        return []
    lines = [
        "### Pruning and protection",
        "",
        "Δ perplexity is against the unpruned (dense) or unstressed model of the same command, with its 95% "
        "bootstrap interval over held-out sequences; a row over several seeds (seeds > 1) stands for them: the mean "
        "over the seeds with a Student-t interval over the seeds, and no p-value. With `--tasks`, each lm-eval "
        "task's accuracy and its change from the same model, paired over the task's items (its McNemar p-value "
        "is in `<kind>_downstream.csv`).",
        "",
    ]
    for label, item in zip(labels, found, strict=True):
        for kind, sets, table, names in (
            ("prune", item.prune, prune_table, PRUNE_FIGURES),
            ("protect", item.protect, protect_table, PROTECT_FIGURES),
        ):
            for one in sets:
                lines += [f"{label} · {one.label} (`cwa {kind}`):", ""] + table(one.rows, one.downstream)
                for name in names:
                    if (one.figures_dir / name).exists():
                        lines += [f"![{label} {one.label} {name}]({_rel(one.figures_dir / name, output.parent)})", ""]
    return lines
