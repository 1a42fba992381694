"""The summary ``cwa perturb`` prints at the end: Δ perplexity per K for the top-K set and each control."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from cwa.ablation.stats import SequenceStats
from cwa.common import format as fmt
from cwa.rundir import ConditionKind, PerturbRow


def _broken(rows: list[PerturbRow]) -> str | None:
    """Says "broken on x% of sequences" where the model gave a non-finite NLL on a sequence (worst row)."""
    worst = max((r.broken_fraction or 0.0 for r in rows), default=0.0)
    return f"broken on {fmt.percent(worst)} of sequences" if worst > 0 else None


def _finite(value: float | None) -> float:
    return value if value is not None and math.isfinite(value) else 0.0


def _interval(row: PerturbRow) -> str:
    if broken := _broken([row]):
        return f"{broken:>28}"
    return (
        f"{fmt.effect(row.delta_perplexity):>9} [{fmt.effect(row.delta_perplexity_low)}, "
        f"{fmt.effect(row.delta_perplexity_high)}]"
    )


def _dose_lines(mine: list[PerturbRow], kind: str, targets: Mapping[str, str]) -> list[str]:
    ks = sorted({r.k for r in mine if r.kind is ConditionKind.TOPK})
    if not ks:
        return []
    lines = [
        f"  {kind}: Δ perplexity [95% CI]; controls: mean Δ over seeds (largest p of top-K vs control)",
        f"  {'K':>6}  {'top-K':>28}" + "".join(f"  {header:>22}" for header in targets.values()),
    ]
    for k in ks:
        top = next(r for r in mine if r.kind is ConditionKind.TOPK and r.k == k)
        line = f"  {k:>6}  {_interval(top)}"
        line = f"{line:<38}"
        for target in targets:
            ctl = [r for r in mine if r.target == target and r.k == k]
            if not ctl:
                line += f"  {'-':>22}"
                continue
            mean = sum(r.delta_perplexity for r in ctl) / len(ctl)
            ps = [r.p_value for r in ctl if r.p_value is not None]
            cell = _broken(ctl) or f"{fmt.effect(mean)} (p {fmt.p_value(max(ps) if ps else None)})"
            line += f"  {cell:>22}"
        lines.append(line)
    return lines


def _single_lines(mine: list[PerturbRow], label: str) -> list[str]:
    singles = [r for r in mine if r.kind is ConditionKind.SINGLE]
    if not singles:
        return []
    lines = [f"  {label}, each of the top {len(singles)} weights alone: Δ perplexity [95% CI] (p vs baseline)"]
    return lines + [f"  {r.rank:>6}  {_interval(r)}  (p {fmt.p_value(r.p_value)})" for r in singles]


def _set_lines(mine: list[PerturbRow], label: str, most: int = 10) -> list[str]:
    """The leave-one-out sets beside the joint set, and the pairs with the largest damage first."""
    lines = []
    loo = [r for r in mine if r.kind is ConditionKind.LEAVE_ONE_OUT]
    if loo:
        n = loo[0].k
        joint = next((r for r in mine if r.kind is ConditionKind.TOPK and r.k == n), None)
        lines.append(f"  {label}, the top {n} as a set: Δ perplexity [95% CI] (p of the joint set vs each)")
        if joint is not None:
            lines.append(f"  {'joint':>9}  {_interval(joint)}")
        lines += [f"  {'without ' + str(r.rank):>9}  {_interval(r)}  (p {fmt.p_value(r.p_value)})" for r in loo]
    pairs = [r for r in mine if r.kind is ConditionKind.PAIR]
    if pairs:
        ranked = sorted(pairs, key=lambda r: (-(r.broken_fraction or 0.0), -_finite(r.delta_perplexity)))
        more = f"; {len(pairs) - most} more in perturb.csv" if len(pairs) > most else ""
        head = f"  {label}, pairs of top weights, largest damage first{more}"
        lines.append(f"{head}: Δ perplexity [95% CI] (p vs baseline)")
        lines += [f"  {'ranks ' + r.ranks:>11}  {_interval(r)}  (p {fmt.p_value(r.p_value)})" for r in ranked[:most]]
    return lines


def restore_lines(rows: list[PerturbRow]) -> list[str]:
    """One line per restored twin: the fraction of its perturbed condition's NLL damage that restoring the
    activations recovers, with its interval, or why it is undefined."""
    lines = []
    for r in (r for r in rows if r.restore):
        tokens = "" if r.restored_tokens is None else f" ({fmt.count(r.restored_tokens)} tokens restored)"
        head = f"  restore {r.restore} on {r.p_value_vs}: "
        if (r.broken_fraction or 0) > 0 or r.recovered_fraction is None or math.isnan(r.recovered_fraction):
            lines.append(f"{head}recovered fraction undefined (no finite damage to recover){tokens}")
        elif (low := r.recovered_fraction_low) is None or (high := r.recovered_fraction_high) is None:
            lines.append(f"{head}recovered fraction undefined (the damage's interval includes 0){tokens}")
        else:
            lines.append(
                f"{head}recovers {fmt.interval(r.recovered_fraction, low, high, fmt.percent)} of the damage{tokens}"
            )
    return lines


def print_table(
    rows: list[PerturbRow],
    title: str,
    base: SequenceStats,
    timings: dict,
    notes: list[str],
    run_dir: Path,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Print the baseline, the dose-response table per perturbation, the single weights, notes and timings.

    Args:
        rows: perturb.csv's rows, baseline first.
        title: the model and the metric that ranked the weights.
        base: the baseline's per-sequence statistics.
        timings: perturb.json's timings.
        notes: what was skipped or differs, one sentence each.
        run_dir: the set directory the results are in (``perturb/<n>/``).
        headers: a control's name -> its column header (``FigureStyle.short``); others show their name.
    """
    print()
    tokens = fmt.count(int(base.tokens.sum()))
    print(f"cwa perturb: {title} top-K · {fmt.count(len(base))} held-out sequences ({tokens} tokens)")
    print(
        f"  baseline: perplexity {fmt.perplexity(base.perplexity)}, NLL {fmt.number(base.mean_nll, 4)}, "
        f"accuracy {fmt.number(base.accuracy, 4)}"
    )
    targets = {t: (headers or {}).get(t, t) for t in dict.fromkeys(r.target for r in rows[1:] if r.is_control)}
    for kind, unit in dict.fromkeys((r.perturbation, r.unit) for r in rows[1:] if not r.restore):
        mine = [r for r in rows[1:] if r.perturbation == kind and r.unit == unit and not r.restore]
        label = kind if unit == "weight" else f"{kind} of each {unit}"
        for line in [*_dose_lines(mine, label, targets), *_single_lines(mine, label), *_set_lines(mine, label)]:
            print(line)
    for line in restore_lines(rows):
        print(line)
    for note in notes:
        print(f"  note: {note}")
    print(
        f"  {timings.get('conditions', 0)} conditions, {timings.get('mean_eval_s_per_condition', 0.0):.2f} s per "
        f"condition (evaluation), {timings.get('mean_apply_restore_s_per_condition', 0.0) * 1000:.1f} ms "
        f"perturb+restore; total {timings.get('total_s', 0.0):.1f} s"
    )
    print(f"  results: {run_dir / 'perturb.csv'}")
