"""All seven metrics on the same calibration blocks: top-100 agreement and the damage of zeroing each
metric's top 1, 10 and 100 weights (the table in the README).

Usage (from the project's root, after its README set-up):
    .venv/bin/python scripts/metric_comparison.py --output /tmp/metrics [--samples 16] [--heldout 16]
    .venv/bin/python scripts/metric_comparison.py --output /tmp/metrics-gemma --config configs/gemma3-270m.yaml

Every step is a cwa command (fit-sensitivity, perturb per run, compare over all runs); finished steps are
reused when the script is run again with the same output directory. It prints a Markdown table. The metrics
that can share a forward and backward (magnitude, grad_x_weight, grad_squared, wanda, obd) are scored in one
shared pass (``--model.metric [...]``, one run directory per metric); hutchinson_diag and obs run alone.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METRICS = ("magnitude", "grad_x_weight", "grad_squared", "hutchinson_diag", "wanda", "obs", "obd")
KS = (1, 10, 100)
SHAREABLE = ("magnitude", "grad_x_weight", "grad_squared", "wanda", "obd")


def cwa(*args: str) -> None:
    command = [sys.executable, "-m", "cwa", *args]
    print("+ cwa", " ".join(args), file=sys.stderr, flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def fit(out: Path, metrics: list[str], samples: int, config: str, k: int) -> dict[str, Path]:
    """Score ``metrics`` on the same blocks: one run for one metric, one shared pass for several."""
    name = metrics[0] if len(metrics) == 1 else "shared"
    runs = {m: out / "logs" / name / ("version_0" if len(metrics) == 1 else f"version_0-{m}") for m in metrics}
    if not all((run / "summary.json").exists() for run in runs.values()):
        cwa(
            "fit-sensitivity",
            "--config",
            config,
            f"--model.k={k}",
            f"--model.metric={metrics[0] if len(metrics) == 1 else '[' + ', '.join(metrics) + ']'}",
            f"--data.num_samples={samples}",
            f"--trainer.logger.init_args.save_dir={out / 'logs'}",
            f"--trainer.logger.init_args.name={name}",
            "--trainer.enable_progress_bar=false",
        )
    return runs


def perturb(run: Path, heldout: int, tokens: int | None) -> None:
    if not (run / "perturb.json").exists() and not list(run.glob("perturb/*/perturb.json")):
        cwa(
            "perturb",
            f"--run={run}",
            f"--ks=[{','.join(map(str, KS))}]",
            "--single=0",
            "--controls=[random_matched]",
            "--seeds=[0]",
            f"--heldout_samples={heldout}",
            *([f"--heldout_tokens={tokens}"] if tokens else []),
        )


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if abs(value) >= 1e4:
        return f"{value:+.2e}"
    return f"{value:+.{digits}g}"


def damage_table(runs: dict[str, Path]) -> str:
    """Δ perplexity of zeroing each metric's top 1, 10 and 100 weights, with a random matched control."""
    from cwa.rundir import Run

    header = ["metric", *(f"zero top-{k}: Δppl [95% CI]" for k in KS), "random matched, K=100"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for metric, path in runs.items():
        rows = Run.load(path).perturbation.rows
        top = {r.k: r for r in rows if r.target == "topk"}
        control = next((r for r in rows if r.target == "random_matched" and r.k == max(KS)), None)
        cells = [f"`{metric}`"]
        for k in KS:
            r = top.get(k)
            low, high = (None, None) if r is None else (r.delta_perplexity_low, r.delta_perplexity_high)
            cells.append("n/a" if r is None else f"{_fmt(r.delta_perplexity)} [{_fmt(low)}, {_fmt(high)}]")
        cells.append("n/a" if control is None else _fmt(control.delta_perplexity))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def agreement_tables(out: Path, metrics: list[str]) -> str:
    """Top-100 Jaccard (upper triangle) and Spearman over 1e6 random weights (lower triangle)."""
    compare = json.loads((out / "compare" / "compare.json").read_text())
    jaccard = compare["overlap"]["100"]["jaccard"]
    spearman = (compare.get("correlation") or {}).get("random_sample", {}).get("spearman")
    lines = ["| | " + " | ".join(f"`{m}`" for m in metrics) + " |", "|" + "---|" * (len(metrics) + 1)]
    for i, a in enumerate(metrics):
        cells = [f"`{a}`"]
        for j in range(len(metrics)):
            if i == j:
                cells.append("—")
            elif j > i:
                cells.append(f"J {jaccard[i][j]:.2f}")
            else:
                rho = spearman[i][j] if spearman else None
                cells.append("n/a" if rho is None else f"ρ {rho['value']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=16, help="calibration blocks of 256 tokens (default 16)")
    parser.add_argument("--heldout", type=int, default=16, help="held-out blocks for perturb (default 16)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens kept per held-out block")
    parser.add_argument("--metrics", nargs="+", default=list(METRICS))
    parser.add_argument("--config", default="configs/smollm2-135m.yaml", help="the model's config (default SmolLM2)")
    parser.add_argument("--k", type=int, default=10000, help="top-K kept per run (default 10000, for cwa protect)")
    args = parser.parse_args()
    out = args.output.resolve()
    shared = [m for m in args.metrics if m in SHAREABLE]
    passes = ([shared] if len(shared) > 1 else [[m] for m in shared]) + [[m] for m in args.metrics if m not in shared]
    found = {m: run for metrics in passes for m, run in fit(out, metrics, args.samples, args.config, args.k).items()}
    runs = {m: found[m] for m in args.metrics}  # the table in the order asked for
    for run in runs.values():
        perturb(run, args.heldout, args.tokens)
    if not (out / "compare" / "compare.json").exists():
        cwa("compare", *map(str, runs.values()), "--ks=[10,100]", f"--output={out / 'compare'}")
    print(damage_table(runs))
    print()
    print(agreement_tables(out, list(runs)))


if __name__ == "__main__":
    main()
