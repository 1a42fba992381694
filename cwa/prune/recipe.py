"""``cwa prune``: remove the lowest-scoring weights of each run's metric and measure held-out quality against
sparsity, one line per metric, the dense model as the baseline.

A recipe: :class:`PruneRecipe` takes the typed options, then ``setup`` (load the runs, the model once and the
held-out blocks), ``build_conditions``, ``evaluate`` (each condition pruned in place, one held-out pass,
restored bit for bit and checksummed; with ``--tasks`` the lm-eval tasks under the same pruning) and ``write``
(``prune.csv``, ``prune_downstream.csv``, the figure and ``prune.json`` as one set through
:func:`cwa.rundir.interventions.write_intervention`).

SparseGPT's weight update (reconstructing the surviving weights) is not a saliency and is out of scope:
every condition here only removes weights, so metrics compare on what they choose, not on a repair.
"""

from __future__ import annotations

import datetime as dt
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from cwa.ablation.interventions import Prune, StressContext
from cwa.ablation.pruning import GROUPS, Group, check_sparsity, parse_structure
from cwa.common import format as fmt
from cwa.common.errors import CwaError
from cwa.common.io import remove_stale_temporaries
from cwa.perturb.downstream import format_downstream, task_meta, task_settings, tasks_from_option
from cwa.perturb.evaluate import StatisticsOptions
from cwa.prune.session import HeldOutSession, Pass, TensorChoice, quality, resamples
from cwa.rundir import DownstreamRow, Run
from cwa.rundir.interventions import PruneRow, write_intervention
from cwa.rundir.outputs import check_name


@dataclass
class PruneCondition:
    run: int  # position in the recipe's runs
    stress: Prune


class PruneRecipe:
    """Prune by each run's metric (lowest scores first, within comparison groups); quality against sparsity.

    Args:
        run: one or several fit-sensitivity run directories of the same model and data, one per metric
            (each run's scores.safetensors decides what is removed; a magnitude run needs none).
        sparsity: shares of each group removed (unstructured structures).
        groups: comparison groups of unstructured pruning: ``row`` (each output unit, as Wanda),
            ``tensor``, ``global`` (the whole model).
        structure: ``unstructured`` and/or ``N:M`` (``2:4``: 2 of every 4 consecutive inputs of a row); quote
            it in a list, ``'[unstructured, "2:4"]'``: YAML reads an unquoted 2:4 as the number 124.
        tensors: ``linear`` (weights of Linear / Conv1D layers inside the blocks, what pruners touch) or
            ``scored`` (every tensor the run scored: embeddings, norms and biases too).
        output: the directory that receives this experiment's new set ``prune/<n>/`` (prune.csv, prune.json and
            figures/prune.png) (None: the first run's).
        heldout_samples: evaluate at most this many held-out blocks (None: the run's setting).
        heldout_tokens: only the first this many tokens of each block (None: whole blocks).
        batch_size: held-out blocks per forward pass (None: the run's setting).
        bootstrap: bootstrap resamples over held-out sequences for the intervals.
        permutations: resamples of the paired bootstrap-t test against the dense model.
        confidence: coverage of the intervals.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``...
        trust_remote_code: let the model's own code run; taken only from this command.
        verify: checksum every pruned tensor after restoring it.
        figures: write figures/prune.png.
        tasks: lm-evaluation-harness tasks to run on the dense model and under every pruning (needs the
            ``cwa[eval]`` extra; as ``cwa perturb --tasks``): ``cwa_pydoc_lastword`` (offline, from the run's
            held-out text) and/or hub tasks; a list or a comma-separated string. Written to prune_downstream.csv.
        tasks_limit: evaluate at most this many items of each task (None: all).
        tasks_batch_size: lm-eval batch size.
        name: a label for this experiment, recorded in prune.json and shown by the report.
    """

    def __init__(
        self,
        run: list[str],
        sparsity: tuple[float, ...] = (0.5, 0.7),
        groups: tuple[Group, ...] = ("row",),
        structure: tuple[str, ...] = ("unstructured", "2:4"),
        tensors: TensorChoice = "linear",
        output: str | None = None,
        heldout_samples: int | None = None,
        heldout_tokens: int | None = None,
        batch_size: int | None = None,
        bootstrap: int = 2000,
        permutations: int = 10000,
        confidence: float = 0.95,
        device: str = "auto",
        trust_remote_code: bool = False,
        verify: bool = True,
        figures: bool = True,
        tasks: str | list[str] | None = None,
        tasks_limit: int | None = None,
        tasks_batch_size: int = 8,
        name: str | None = None,
    ) -> None:
        self.name = check_name(name)
        self.run_paths = [run] if isinstance(run, str) else list(run)
        if not self.run_paths:
            raise CwaError("give at least one fit-sensitivity run directory with --run.")
        self.sparsity = tuple(sorted({check_sparsity(s) for s in sparsity}))
        unknown = [g for g in groups if g not in GROUPS]
        if unknown:
            raise CwaError(f"unknown comparison group '{unknown[0]}': use {', '.join(GROUPS)}.")
        self.groups, self.structure = tuple(dict.fromkeys(groups)), tuple(dict.fromkeys(structure))
        for s in self.structure:
            parse_structure(s)
        if "unstructured" in self.structure and not (self.sparsity and self.groups):
            raise CwaError("unstructured pruning needs at least one sparsity and one group.")
        if not self.structure:
            raise CwaError("give at least one structure (unstructured or N:M).")
        self.tensor_choice, self.output, self.figures = tensors, output, figures
        self.statistics = StatisticsOptions(bootstrap, permutations, confidence)
        self.session_options = (heldout_samples, heldout_tokens, batch_size, device, trust_remote_code, verify)
        self.downstream = tasks_from_option(tasks, tasks_limit, tasks_batch_size)
        self.downstream_rows: list[DownstreamRow] | None = None
        self.notes: list[str] = []
        self.timings: dict[str, float] = {}

    # -- the life cycle ----------------------------------------------------------------------------
    def run(self) -> Path:
        started = time.perf_counter()
        self.setup()
        self.build_conditions()
        self.evaluate()
        self.timings["total_s"] = time.perf_counter() - started
        self.write()
        return self.directory

    def setup(self) -> None:
        """Load the runs (same model and held-out data), the model once and the held-out blocks."""
        self.runs = [Run.load(p) for p in self.run_paths]
        first = self.runs[0]
        for other in self.runs[1:]:
            if other.model != first.model:
                raise CwaError(
                    f"'{other.path}' is a run of {other.model}, '{first.path}' of {first.model}: prune one model."
                )
            if other.data.get("heldout_fingerprint") != first.data.get("heldout_fingerprint"):
                raise CwaError(
                    f"'{other.path}' and '{first.path}' hold different held-out data; prune runs of one data set."
                )
        for run in self.runs:
            if not run.has_scores and run.metric != "magnitude":
                raise CwaError(f"'{run.path}' has no scores.safetensors; rerun its fit-sensitivity with scores kept.")
        self.directory = Path(self.output).expanduser() if self.output else first.path
        self.session = HeldOutSession(first, *self.session_options)
        self.session.load()
        self.statistics.check_sample(self.session.blocks.shape[0])
        self.names = list(self.runs[0].infos)
        for run in self.runs[1:]:
            self.names = [n for n in self.names if n in run.infos]  # pruned: what every metric scored
        self.params = self.session.tensors(self.names, self.tensor_choice)
        self.transposed = self.session.transposed(list(self.params))
        if self.downstream is not None:  # an unknown task or a missing local item stops here, before any pass
            self.downstream.setup(self.session.data, self.session.trust_remote_code)

    def build_conditions(self) -> None:
        """Per run: every unstructured (group, sparsity) and every N:M structure."""
        stresses = []
        for structure in self.structure:
            if structure == "unstructured":
                stresses += [Prune(s, g) for g in self.groups for s in self.sparsity if s > 0]
            else:
                stresses.append(Prune(0.0, "row", structure))
        self.conditions = [PruneCondition(i, s) for i in range(len(self.runs)) for s in stresses]

    def evaluate(self) -> None:
        from tqdm.auto import tqdm

        self.baseline = self.session.evaluate()
        self.passes: list[Pass] = []
        with tqdm(total=len(self.conditions), desc="cwa prune", unit="condition", file=sys.stderr) as bar:
            for condition in self.conditions:
                run = self.runs[condition.run]
                bar.set_postfix_str(f"{run.metric} {condition.stress.describe()}", refresh=False)
                self.passes.append(self.session.evaluate(condition.stress, self._context(run)))
                bar.update(1)
        self.rows = self._rows()
        self._evaluate_tasks()

    def _evaluate_tasks(self) -> None:
        """The lm-eval tasks on the dense model and under each pruning, applied in place and restored (and
        checksummed) exactly as for its held-out pass."""
        if self.downstream is None:
            return
        conditions = [
            (row.condition, partial(self._pruned, condition))
            for condition, row in zip(self.conditions, self.rows[1:], strict=True)
        ]
        stats = self.statistics
        self.downstream_rows = self.downstream.run(
            self.session.model, conditions, stats.bootstrap, stats.confidence, "cwa prune"
        )

    def _pruned(self, condition: PruneCondition):
        return self.session.intervened(condition.stress, self._context(self.runs[condition.run]))

    def _context(self, run: Run) -> StressContext:
        if not run.has_scores:  # a magnitude run without its scores file: |w| is its score
            return StressContext(self.params, transposed=self.transposed)
        scores = run.scores()
        return StressContext(self.params, transposed=self.transposed, scores=lambda name: scores[name])

    def _rows(self) -> list[PruneRow]:
        base = self.baseline.evaluation.stats
        weights = resamples(len(base), self.statistics)
        total = sum(p.numel() for p in self.params.values())
        rows = [PruneRow("dense", "", "", "", 0.0, total, 0, **quality(base, base, weights, self.statistics))]
        for condition, result in zip(self.conditions, self.passes, strict=True):
            run, stress = self.runs[condition.run], condition.stress
            stats = quality(base, result.evaluation.stats, weights, self.statistics)
            group = "row" if stress.structure != "unstructured" else stress.group
            removed = result.applied.edited
            rows.append(
                PruneRow(run.metric, run.name, stress.structure, group, stress.sparsity, total, removed, **stats)
            )
        return rows

    # -- writing -----------------------------------------------------------------------------------
    def write(self) -> None:
        figures = {}
        if self.figures:
            from cwa.prune.figures import quality_against_sparsity

            model = self.session.run.model
            figures["prune.png"] = partial(quality_against_sparsity, self.rows, model, downstream=self.downstream_rows)
        meta = self._meta()
        self.set_dir, notes = write_intervention(
            self.directory, "prune", self.rows, meta, figures, self.downstream_rows
        )
        remove_stale_temporaries(self.directory)  # what an earlier, killed prune may have left
        self._print()
        for note in notes:
            print(f"note: {note}.", file=sys.stderr)

    def _meta(self) -> dict:
        from cwa.common.environment import environment, peak_memory

        passes = self.passes
        n = max(1, len(passes))
        mean_eval = sum(p.evaluation.seconds for p in passes) / n
        mean_apply = sum(p.apply_restore_s for p in passes) / n
        self.timings.update(
            {
                "baseline_eval_s": self.baseline.evaluation.seconds,
                "mean_eval_s_per_condition": mean_eval,
                "mean_apply_restore_s_per_condition": mean_apply,
                "apply_restore_share_of_eval": mean_apply / mean_eval if mean_eval else None,
            }
        )
        return {
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "name": self.name,
            "runs": [{"path": str(r.path), "metric": r.metric, "name": r.name} for r in self.runs],
            "model": self.session.run.model,
            "dtype": self.session.dtype,
            "tensors": {"choice": self.tensor_choice, "count": len(self.params), "names": list(self.params)},
            "settings": {
                "sparsity": list(self.sparsity),
                "groups": list(self.groups),
                "structure": list(self.structure),
                **vars(self.statistics),
                **task_settings(self.downstream),
            },
            "heldout": self.session.heldout_meta(),
            "timings": {**self.session.timings, **self.timings},
            "downstream": task_meta(self.downstream, mean_eval),
            "memory": peak_memory(),
            "notes": self.notes,
            "environment": environment(),
        }

    def _print(self) -> None:
        dense = self.rows[0]
        model, tensors = self.session.run.model, len(self.params)
        print(f"\ncwa prune: {model} · {tensors} tensors · dense perplexity {fmt.perplexity(dense.perplexity)}")
        for row in self.rows[1:]:
            where = f"{row.structure} {row.group} {row.sparsity:.0%}"
            low, high = row.delta_perplexity_low, row.delta_perplexity_high
            delta = f"Δppl {fmt.interval(row.delta_perplexity, low, high, fmt.effect)}"
            print(f"  {row.metric:<16} {where:<26} perplexity {fmt.perplexity(row.perplexity):>10}  {delta}")
        if self.downstream_rows:
            print("\n".join(format_downstream(self.downstream_rows, self.statistics.confidence)))
        print(f"  -> {self.set_dir / 'prune.csv'}")
