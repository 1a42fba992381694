"""Which model a run scored: the identity that decides whether two runs' weight coordinates mean the same thing.

A weight coordinate (tensor name, flat index) names the same weight in two runs only when both scored the same
model. Top-K overlaps, rank correlations and "the same weight in runs X and Y" are therefore computed within one
model only (``cwa compare`` refuses runs of several models; ``cwa report`` compares coordinates within each model
and writes an "Across models" section that compares models by relative depth and module type instead).

The identity is what the run recorded: the model's name or path (``summary.json``'s ``model``), its revision
(``config.yaml``'s ``model.revision``), and, where recorded, its class and number of parameters (a different
checkpoint saved under the same path shows there).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePath

from cwa.common.errors import CwaError
from cwa.rundir import Run


@dataclass(frozen=True)
class ModelId:
    """A model as runs record it.

    Args:
        name: ``summary.json``'s ``model`` (a hub name, a local path or ``smollm2-135m``).
        revision: the hub revision the run loaded (None: the default branch, or not recorded).
        model_class: the transformers class (None where not recorded).
        num_parameters: every parameter of the model, scored or not (None where not recorded).
    """

    name: str
    revision: str | None = None
    model_class: str | None = None
    num_parameters: int | None = None

    @property
    def short(self) -> str:
        """A short display name: the last component of a path, with the revision."""
        name = self.name.rstrip("/")
        short = PurePath(name).name if name.startswith(("/", "./", "../", "~")) else name
        return short + (f"@{self.revision}" if self.revision else "")

    def same_model(self, other: ModelId) -> bool:
        """Same name and revision, and no recorded class or size that differs."""
        if (self.name, self.revision) != (other.name, other.revision):
            return False
        for mine, theirs in ((self.model_class, other.model_class), (self.num_parameters, other.num_parameters)):
            if mine is not None and theirs is not None and mine != theirs:
                return False
        return True


def model_of(run: Run) -> ModelId:
    """The model a fit-sensitivity run scored."""
    try:
        settings = run.config.get("model")
    except CwaError:  # an unreadable config.yaml: readers that need it say so; the revision is then unknown
        settings = None
    revision = settings.get("revision") if isinstance(settings, dict) else None
    return ModelId(
        name=run.model,
        revision=None if revision is None else str(revision),
        model_class=run.summary.model_class,
        num_parameters=run.summary.num_parameters,
    )


def group_models(ids: list[ModelId]) -> list[tuple[ModelId, list[int]]]:
    """Positions of ``ids`` grouped by model, in order of first appearance; a group is named by its first member
    that records the most (class and size)."""
    groups: list[tuple[ModelId, list[int]]] = []
    for i, identity in enumerate(ids):
        for g, (first, members) in enumerate(groups):
            if all(identity.same_model(ids[m]) for m in members):
                members.append(i)
                if first.model_class is None and identity.model_class is not None:
                    groups[g] = (identity, members)
                break
        else:
            groups.append((identity, [i]))
    return groups


def model_groups(runs: list[Run]) -> list[tuple[ModelId, list[int]]]:
    """Positions of ``runs`` grouped by the model they scored (:func:`group_models`)."""
    return group_models([model_of(run) for run in runs])


def display_names(models: list[ModelId]) -> list[str]:
    """Distinct names of distinct models: the short name; the full name where two short ones collide; then the
    number of parameters (or a position) where even those do."""
    names = [m.short for m in models]
    for widen in (_full_name, lambda m, i: f"{_full_name(m, i)} ({_size(m, i)})"):
        names = [widen(m, i) if names.count(name) > 1 else name for i, (m, name) in enumerate(zip(models, names,
                 strict=True))]  # fmt: skip
    return names


def _full_name(m: ModelId, _: int) -> str:
    return m.name.rstrip("/") + (f"@{m.revision}" if m.revision else "")


def _size(m: ModelId, position: int) -> str:
    return f"{m.num_parameters:,} parameters" if m.num_parameters is not None else f"#{position + 1}"


def require_one_model(runs: list[Run], names: list[str]) -> None:
    """One CwaError sentence when ``runs`` scored more than one model: their coordinates do not compare."""
    groups = model_groups(runs)
    if len(groups) < 2:
        return
    labels = display_names([m for m, _ in groups])
    which = "; ".join(
        f"{label}: {', '.join(names[i] for i in members)}" for label, (_, members) in zip(labels, groups, strict=True)
    )
    raise CwaError(
        f"the runs score {len(groups)} different models ({which}), and a weight's coordinates mean nothing across "
        "models, so no top-K overlap or rank correlation is computed; compare the runs of one model at a time, or "
        "run `cwa report` over all of them for its section comparing the models by relative depth and module type."
    )
