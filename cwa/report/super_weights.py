"""The report's section on ``cwa find-super-weights`` runs: per run, the held-out baseline its verdicts are paired
over, every candidate with its spikes, its verdict and the damage of zeroing it alone (interval and p), the
row test and the super experts when the run has them, and its spike figure. Read from the run's
``summary.json`` (:func:`cwa.rundir.super_weights.read_super_weights`); this module only renders."""

from __future__ import annotations

from pathlib import Path

from cwa.common import format as fmt
from cwa.report.text import _rel, _table
from cwa.rundir.super_weights import SuperWeightsRun

VERDICTS = {
    "super_weight": "super weight",
    "damaging": "damaging",
    "activation_only": "activation only",
    "unverified": "not verified",
}


def labels_of(runs: list[SuperWeightsRun]) -> list[str]:
    """``S1``, ``S2``, ...: the super-weight runs' labels (the fit-sensitivity runs are ``R1``, ``R2``, ...)."""
    return [f"S{i + 1}" for i in range(len(runs))]


def section(runs: list[SuperWeightsRun], output: Path) -> list[str]:
    """The Markdown of the section (nothing without super-weight runs)."""
    if not runs:
        return []
    lines = [
        "### Super weights (`cwa find-super-weights`)",
        "",
        "A candidate is a layer whose MLP output projection has both an input and an output spike above the "
        "threshold (× the layer's median channel maximum); each verified candidate was zeroed alone on the "
        "held-out split. *Super weight*: significant damage (interval above 0, p < 0.05) of at least the run's "
        "`min_increase`; *damaging*: significant but smaller; *activation only*: no significant damage.",
        "",
    ]
    for label, run in zip(labels_of(runs), runs, strict=True):
        lines += _run(label, run, output)
    return lines


def _run(label: str, run: SuperWeightsRun, output: Path) -> list[str]:
    s = run.summary
    settings = s.get("settings") or {}
    head = (
        f"{label} (`{run.name}`, {s.get('model')}): {fmt.count(s.get('blocks'))} calibration blocks "
        f"({fmt.count(s.get('tokens'))} tokens) scanned over {s.get('layers')} MLP output projections, threshold "
        f"{settings.get('threshold', '?')}×, {len(s['candidates'])} candidate{'' if len(s['candidates']) == 1 else 's'}"
    )
    heldout = s.get("heldout")
    if isinstance(heldout, dict) and heldout.get("sequences"):
        tokens = f", {fmt.count(heldout['tokens'])} tokens" if heldout.get("tokens") is not None else ""
        head += (
            f"; held-out baseline perplexity {fmt.perplexity(heldout.get('perplexity'))} over "
            f"{fmt.count(heldout['sequences'])} sequences{tokens} (every verdict is paired over them)"
        )
    lines = [head + ".", ""]
    if s["candidates"]:
        lines += _table(
            ["rank", "layer", "[row, col]", "w (rank of |w|)", "input / output spike", "Δppl zeroed [95% CI]", "p",
             "verdict"],
            [_candidate(c) for c in s["candidates"]],
        )  # fmt: skip
    else:
        lines += ["No layer's input and output spikes both clear the threshold: no candidate.", ""]
    lines += _super_experts(s.get("super_experts") or [])
    lines += _row_test(s.get("row_test"))
    figure = run.figures_dir / "activation_spikes.png"
    if figure.exists():
        lines += [f"![{label} activation spikes]({_rel(figure, output.parent)})", ""]
    return lines


def _candidate(c: dict) -> list[str]:
    ablation = c.get("ablation") if isinstance(c.get("ablation"), dict) else {}
    expert = "" if c.get("expert") is None else f" expert {c['expert']}"
    delta = ablation.get("delta_perplexity")
    effect = (
        ""
        if delta is None
        else fmt.interval(
            delta, ablation.get("delta_perplexity_low"), ablation.get("delta_perplexity_high"), fmt.effect
        )
    )
    return [
        str(c.get("rank")),
        f"{c.get('layer')}{expert}",
        f"[{c.get('row')}, {c.get('col')}]",
        f"{fmt.number(c.get('weight'))} ({c.get('weight_rank')})",
        f"{_ratio(c.get('input_ratio'))} / {_ratio(c.get('output_ratio'))}",
        effect,
        fmt.p_value(ablation.get("p_value")) if ablation else "",
        VERDICTS.get(c.get("verdict", ""), str(c.get("verdict", ""))),
    ]


def _ratio(value: object) -> str:
    return f"{value:.0f}×" if isinstance(value, int | float) and not isinstance(value, bool) else "?"


def _super_experts(experts: list[dict]) -> list[str]:
    if not experts:
        return []
    shown = ", ".join(
        f"layer {e.get('layer')} expert {e.get('expert')} (largest |output| {fmt.number(e.get('output_max'))})"
        for e in experts
    )
    return [f"Super experts (largest output above the 99.5th percentile of all experts'): {shown}.", ""]


def _row_test(test: dict | None) -> list[str]:
    if not isinstance(test, dict):
        return []
    rows = [r for r in [test.get("candidate"), *(test.get("controls") or [])] if isinstance(r, dict)]
    g = test.get("g") if isinstance(test.get("g"), dict) else {}
    lines = [
        f"Row test (`{test.get('parameter')}`, base NLL {fmt.number(test.get('base_nll'))}): R = relative held-out "
        f"NLL increase when the whole row is zeroed ({test.get('interval', '')}).",
        "",
    ]
    lines += _table(
        ["row", "role", "R [interval]"],
        [
            [str(r.get("row")), r.get("role", ""), fmt.interval(r.get("r"), r.get("r_low"), r.get("r_high"))]
            for r in rows
        ],
    )
    return lines + [
        f"G = R − median control R: {fmt.interval(g.get('value'), g.get('low'), g.get('high'), fmt.effect)}.",
        "",
    ]
