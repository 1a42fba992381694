"""The rows, metadata and console table of ``cwa protect``."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

from cwa.common import format as fmt
from cwa.perturb.downstream import format_downstream, seed_means, task_meta
from cwa.perturb.evaluate import StatisticsOptions
from cwa.prune.session import Pass, over_seeds, quality, resamples
from cwa.rundir import DownstreamRow
from cwa.rundir.interventions import ProtectRow

if TYPE_CHECKING:
    from cwa.protect.recipe import ProtectCondition, ProtectRecipe


def protect_rows(
    baseline: Pass, results: list[tuple[ProtectCondition, Pass, int]], options: StatisticsOptions
) -> list[ProtectRow]:
    """The baseline, one row per evaluated condition, and after the last row of each (level, protected set,
    unit, K) with several passes (seeds of a random stress or a random set) their mean over seeds."""
    base = baseline.evaluation.stats
    weights = resamples(len(base), options)
    rows = [
        ProtectRow("none", "", None, "none", "weight", 0, 0, None, None, 1, 0, **quality(base, base, weights, options))
    ]
    groups: dict[tuple, list[ProtectRow]] = {}
    for condition, result, n_protected in results:
        stress = condition.stress
        row = ProtectRow(
            stress.name,
            stress.level_name,
            stress.level,
            condition.protected,
            condition.unit,
            condition.k,
            n_protected,
            condition.set_seed,
            condition.seed,
            1,
            result.applied.changed,
            **quality(base, result.evaluation.stats, weights, options),
        )
        rows.append(row)
        groups.setdefault((id(stress), condition.protected, condition.unit, condition.k), []).append(row)
    for members in groups.values():
        if len(members) > 1:
            first = members[0]
            summary = over_seeds([m.as_dict() for m in members], options.confidence)
            mean_protected = round(sum(m.n_protected for m in members) / len(members))
            rows.append(
                ProtectRow(
                    first.stress,
                    first.level_name,
                    first.level,
                    first.protected,
                    first.unit,
                    first.k,
                    mean_protected,
                    None,
                    None,
                    len(members),
                    None,
                    **summary,
                    over="seeds",
                )
            )
    return rows


def _key(row: ProtectRow) -> tuple:
    return row.stress, row.level, row.protected, row.unit, row.k


def downstream_means(rows: list[ProtectRow], downstream: list[DownstreamRow], confidence: float) -> list[DownstreamRow]:
    """The lm-eval rows of the means over seeds: one per task for each mean row of ``protect.csv``, over the
    task rows of the conditions that mean stands for (named by :attr:`ProtectRow.condition`)."""
    means = {_key(r): r.condition for r in rows if r.over == "seeds"}
    mean_of = {r.condition: means[_key(r)] for r in rows if r.over != "seeds" and _key(r) in means}
    groups: dict[str, list[DownstreamRow]] = {name: [] for name in means.values()}
    for row in downstream:
        if row.condition in mean_of:
            groups[mean_of[row.condition]].append(row)
    return seed_means(groups, confidence)


def meta(recipe: ProtectRecipe) -> dict:
    """The contents of protect.json: settings, the run, held-out data, timings (the transform and restore
    cost against the held-out pass), the memory bound, notes and the environment."""
    from cwa.common.environment import environment, peak_memory

    passes = [p for _, p, _ in recipe.results]
    n = max(1, len(passes))
    mean_eval = sum(p.evaluation.seconds for p in passes) / n
    mean_apply = sum(p.apply_restore_s for p in passes) / n
    dense = recipe.stress_name in ("rtn", "noise")
    backup = sum(p.numel() * p.element_size() for p in recipe.params.values())
    recipe.timings.update(
        {
            "baseline_eval_s": recipe.baseline.evaluation.seconds,
            "mean_eval_s_per_condition": mean_eval,
            "mean_apply_restore_s_per_condition": mean_apply,
            "apply_restore_share_of_eval": mean_apply / mean_eval if mean_eval else None,
        }
    )
    return {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "name": recipe.name,
        "settings": recipe.settings(),
        "run": {"path": str(recipe.run_dir.path), "model": recipe.run_dir.model, "metric": recipe.run_dir.metric},
        "dtype": recipe.session.dtype,
        "tensors": {"count": len(recipe.params), "weights": sum(p.numel() for p in recipe.params.values())},
        "heldout": recipe.session.heldout_meta(),
        "timings": {**recipe.session.timings, **recipe.timings},
        "backup_bytes_bound": backup if dense else None,
        "downstream": task_meta(recipe.downstream, mean_eval),
        "memory": peak_memory(),
        "notes": recipe.notes,
        "environment": environment(),
    }


def print_rows(recipe: ProtectRecipe) -> None:
    """One line per level, protected set and K (the mean over seeds where there are several)."""
    rows = recipe.rows
    base = rows[0]
    run = recipe.run_dir
    print(f"\ncwa protect: {run.model} · {run.metric} · baseline perplexity {fmt.perplexity(base.perplexity)}")
    shown = [r for r in rows[1:] if r.over == "seeds" or r.seeds == 1]
    multiple = {(r.level, r.protected, r.unit, r.k) for r in rows if r.over == "seeds"}
    for row in shown:
        if row.over != "seeds" and (row.level, row.protected, row.unit, row.k) in multiple:
            continue
        unit = "" if row.unit == "weight" else f" ({row.unit}s)"
        over = f" mean of {row.seeds}" if row.over == "seeds" else ""
        low, high = row.delta_perplexity_low, row.delta_perplexity_high
        print(
            f"  {row.stress} {row.level_name}={row.level:g}  {row.protected + unit:<24} K={row.k:<7} "
            f"perplexity {fmt.perplexity(row.perplexity):>10}  "
            f"Δppl {fmt.interval(row.delta_perplexity, low, high, fmt.effect)}{over}"
        )
    if recipe.downstream_rows:  # as the table above: a mean over seeds stands for its seeds
        members = {r.condition for r in rows if r.over != "seeds" and (r.level, r.protected, r.unit, r.k) in multiple}
        shown_tasks = [r for r in recipe.downstream_rows if r.condition not in members]
        print("\n".join(format_downstream(shown_tasks, recipe.statistics.confidence)))
    for note in recipe.notes:
        print(f"  note: {note}")
    print(f"  -> {recipe.set_dir / 'protect.csv'}")
