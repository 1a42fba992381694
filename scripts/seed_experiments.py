"""Run the seed report's six experiments with their exact settings, then write the report over them.

    python scripts/seed_experiments.py --output /tmp/seed-grid

Each experiment is one ``cwa fit-sensitivity`` run of the config in ``configs/`` that the seed report's
experiment used, with the experiment's metric, K, mode and number of samples given on the command line.
Where the Hugging Face hub is not reachable (or ``HF_HUB_OFFLINE`` is set and the models are not cached),
the script says so in one line and runs the same grid on the embedded SmolLM2-135M, with a shorter
sequence length so that the whole grid finishes in about a quarter of an hour on two CPU cores. Extra
calibration seeds of one cheap experiment (``--replicates``) give ``cwa report`` a stability estimate.
Finished runs in the output directory are reused unless ``--force`` is given.

Experiments that differ only in a metric that can share a forward and backward (``SHAREABLE``: same
config, K, mode, samples and seed) run as one shared pass (``--model.metric [a, b]``), each still written
to its own run directory (``version_<n>-<metric>``). The seed report's six experiments differ in K, mode or
samples wherever their metrics could share, so today each runs alone; a grid edited to compare metrics on
the same blocks shares its passes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cwa.common import smoke

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
EMBEDDED = "smollm2-135m"


@dataclass(frozen=True)
class Experiment:
    """One seed-report experiment: its name there, the config it runs and the settings it reported."""

    name: str
    config: str
    metric: str
    k: int
    mode: str
    samples: int


# The six experiments of the seed report, with the settings it lists for each.
SEED_GRID = [
    Experiment("dialogpt-small_grad_x_weight_k100", "dialogpt-small.yaml", "grad_x_weight", 100, "global", 20),
    Experiment("dialogpt-small_hutchinson_diag_k100", "dialogpt-small.yaml", "hutchinson_diag", 100, "global", 20),
    Experiment("gpt2_grad_x_weight_k50", "gpt2.yaml", "grad_x_weight", 50, "per_layer", 10),
    Experiment("llama-3.1-8b_grad_x_weight_k100", "llama-3.1-8b.yaml", "grad_x_weight", 100, "per_layer", 100),
    Experiment("gpt2_magnitude_k10", "gpt2.yaml", "magnitude", 10, "per_layer", 5),
    Experiment("dialogpt-small_grad_x_weight_k50", "dialogpt-small.yaml", "grad_x_weight", 50, "per_layer", 10),
]
SHAREABLE = frozenset({"magnitude", "grad_x_weight", "grad_squared", "wanda", "obd"})
"""Metrics that ``cwa fit-sensitivity`` accumulates in one shared pass (``cwa.scoring.shared_pass``)."""

Entry = tuple[Experiment, str, int]  # (experiment, its run name, calibration seed)

HUB_MODELS = {
    "dialogpt-small.yaml": "microsoft/DialoGPT-small",
    "gpt2.yaml": "gpt2",
    "llama-3.1-8b.yaml": "meta-llama/Llama-3.1-8B",
}


def hub_reachable(timeout: float = 30.0) -> tuple[bool, str]:
    """Whether gpt2's config loads (from the hub or the local cache), tried in a child process with a timeout."""
    code = "from transformers import AutoConfig; AutoConfig.from_pretrained('gpt2')"
    try:
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"loading gpt2's config took longer than {timeout:.0f} s"
    if result.returncode == 0:
        return True, ""
    last = (result.stderr.strip().splitlines() or ["unknown error"])[-1]
    return False, last[:160]


def overrides(exp: Experiment, embedded: bool, seq_len: int | None, seed: int) -> list[str]:
    """Command-line overrides that give the config the experiment's exact metric, K, mode and samples."""
    args = ["--model.k", str(exp.k), "--model.mode", exp.mode, "--data.num_samples", str(exp.samples)]
    args += ["--data.seed", str(seed)]
    # dialogpt-small.yaml configures Hutchinson with options; every other experiment names its metric.
    if not (exp.config == "dialogpt-small.yaml" and exp.metric == "hutchinson_diag"):
        args += ["--model.metric", exp.metric]
    if embedded:
        args += ["--model.pretrained", EMBEDDED]
        if exp.metric == "hutchinson_diag":
            # Same estimator (v ⊙ Hv, Rademacher probes), finite-difference HVPs: about 2.5× faster than double
            # backward on CPU and within 0.2% of it on this model (docs/design.md), so the grid fits on a laptop.
            args += ["--model.metric.init_args.hvp", "finite_difference"]
        if exp.config == "llama-3.1-8b.yaml":
            # The 8-GPU FSDP / bf16 settings of the Llama config do not apply to one CPU process.
            args += ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto"]
            args += ["--model.dtype", "float32", "--model.save_scores", "float32", "--data.batch_size", "4"]
    if seq_len:
        args += ["--data.seq_len", str(seq_len)]
    return args


def shared_groups(plan: list[Entry]) -> list[list[Entry]]:
    """The plan's entries grouped into passes, in plan order: entries whose metrics can share a pass and whose
    config, K, mode, samples and seed agree form one group (each metric at most once); the rest run alone."""
    groups: dict[tuple, list[Entry]] = {}
    for entry in plan:
        exp, name, seed = entry
        key: tuple = (exp.config, exp.k, exp.mode, exp.samples, seed) if exp.metric in SHAREABLE else (name,)
        while key in groups and any(e.metric == exp.metric for e, _, _ in groups[key]):
            key = (*key, name)  # the same metric twice: a pass of its own
        groups.setdefault(key, []).append(entry)
    return list(groups.values())


def complete_runs(root: Path, metric: str | None = None) -> set[Path]:
    """Complete run directories under ``root``: ``version_<n>``, or a shared pass's ``version_<n>-<metric>``."""
    found = set()
    pattern = f"version_*-{metric}/summary.json" if metric else "version_*/summary.json"
    for summary in root.glob(pattern):
        if not metric and "-" in summary.parent.name:
            continue  # a shared pass's metric directory, not this experiment's
        try:
            if json.loads(summary.read_text()).get("status") == "complete":
                found.add(summary.parent)
        except (OSError, json.JSONDecodeError):
            continue
    return found


def entry_runs(entry: Entry, group: list[Entry], logs: Path) -> set[Path]:
    """An experiment's complete runs: run alone (under its own name) or in a shared pass of its group (under
    the pass's first experiment's name, the metric in the directory name)."""
    found = complete_runs(logs / entry[1])
    for _, name, _ in group:
        found |= complete_runs(logs / name, entry[0].metric)
    return found


def group_runs(group: list[Entry], logs: Path) -> list[set[Path]]:
    """Each entry's complete runs (``entry_runs``)."""
    return [entry_runs(entry, group, logs) for entry in group]


def run_experiment(
    group: list[Entry], logs: Path, embedded: bool, seq_len: int | None, force: bool, cwa: list[str]
) -> list[Path]:
    """Run (or reuse) one experiment, or several in one shared pass, and return their run directories."""
    exp, name, seed = group[0]
    before = group_runs(group, logs)
    if all(before) and not force:
        runs = [sorted(found)[-1] for found in before]
        print(f"  {', '.join(n for _, n, _ in group)}: reusing {', '.join(map(str, runs))}", flush=True)
        return runs
    command = [*cwa, "fit-sensitivity", "--config", str(CONFIGS / exp.config)]
    command += overrides(exp, embedded, seq_len, seed)
    metrics = [e.metric for e, _, _ in group]
    if len(group) > 1:
        command += ["--model.metric", f"[{', '.join(metrics)}]"]  # after the first's: the list wins
    command += ["--trainer.logger.init_args.save_dir", str(logs), "--trainer.logger.init_args.name", name]
    print(
        f"  {name}: {', '.join(metrics)}{' (one shared pass)' * (len(group) > 1)}, {exp.mode} k={exp.k}, "
        f"{exp.samples} samples, seed {seed} ...",
        flush=True,
    )
    start = time.perf_counter()
    log = logs / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:  # the run's own output, to follow progress with `tail -f`
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        sys.stderr.write(log.read_text()[-4000:])
        raise SystemExit(f"seed_experiments: {name} failed (exit {result.returncode}): {' '.join(command)}")
    runs = []
    for (_, entry_name, _), found, old in zip(group, group_runs(group, logs), before, strict=True):
        new = found - old
        if not new:
            raise SystemExit(f"seed_experiments: {entry_name} finished but left no complete run under {logs / name}.")
        runs.append(sorted(new)[-1])
    print(f"  {name}: done in {time.perf_counter() - start:.0f} s -> {', '.join(map(str, runs))}", flush=True)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("seed-experiments"), help="directory for runs and report")
    parser.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="sequence length override (default: the configs' on the hub, 64 on the embedded fallback)",
    )
    parser.add_argument(
        "--replicates",
        type=int,
        default=3,
        help="calibration seeds (0..N-1) of gpt2_grad_x_weight_k50 for the "
        "stability estimate (1 = only the seed report's runs)",
    )
    parser.add_argument(
        "--embedded", action="store_true", help="run the grid on the embedded model without asking the hub"
    )
    parser.add_argument("--force", action="store_true", help="rerun experiments that already have a complete run")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated experiment names to run (e.g. to run parts of the grid in parallel); the report then "
        "covers the complete runs of the whole grid found in the output directory",
    )
    parser.add_argument("--no-report", action="store_true", help="run the experiments only")
    args = parser.parse_args(argv)
    if smoke.active():  # sizes shrunk: one extra seed still gives the report its stability section
        args.replicates = min(args.replicates, 2)

    embedded = args.embedded
    if not embedded:
        ok, why = hub_reachable()
        if not ok:
            print(
                f"seed_experiments: the Hugging Face hub is not reachable ({why}); running the same grid on the "
                f"embedded {EMBEDDED} instead.",
                flush=True,
            )
            embedded = True
    seq_len = args.seq_len or (64 if embedded else None)
    logs = args.output.resolve() / "lightning_logs"
    cwa = [sys.executable, "-m", "cwa"]
    env_note = "embedded SmolLM2-135M" if embedded else "hub models"
    print(f"seed_experiments: {len(SEED_GRID)} experiments on the {env_note}; runs under {logs}", flush=True)
    stability = SEED_GRID[2]
    plan = [(exp, exp.name, 0) for exp in SEED_GRID]
    plan += [(stability, f"{stability.name}_seed{seed}", seed) for seed in range(1, max(1, args.replicates))]
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    unknown = only - {name for _, name, _ in plan}
    if unknown:
        raise SystemExit(f"seed_experiments: unknown experiment(s) {sorted(unknown)}; see --help for the grid.")
    groups = shared_groups(plan)
    for group in groups:
        chosen = [entry for entry in group if not only or entry[1] in only]
        if chosen:
            run_experiment(chosen, logs, embedded, seq_len, args.force, cwa)
    if args.no_report:
        return 0
    runs = []
    for group in groups:
        # A group run whole or one by one (--only): its entries' runs are wherever they were written.
        for entry in group:
            found = sorted(entry_runs(entry, group, logs))
            if found:
                runs.append(found[-1])
            else:
                print(f"seed_experiments: {entry[1]} has no complete run yet; the report leaves it out.", flush=True)
    report = args.output.resolve() / "reports" / "critical-weights.md"
    command = [*cwa, "report", *map(str, runs), "--output", str(report)]
    print(f"seed_experiments: writing the report: {' '.join(command[2:])}", flush=True)
    result = subprocess.run(command)
    if result.returncode != 0:
        raise SystemExit(f"seed_experiments: cwa report failed (exit {result.returncode}).")
    print(f"seed_experiments: report at {report}", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
