"""``cwa perturb``: perturb the top-K weights of a fit-sensitivity run and matched controls, measure the
held-out damage with bootstrap confidence intervals and paired tests.

A recipe (torchtune's shape): :class:`PerturbRecipe` takes the typed options, then :meth:`~PerturbRecipe.setup`
(load the run, the model and the held-out data), :meth:`~PerturbRecipe.build_conditions`,
:meth:`~PerturbRecipe.evaluate` and :meth:`~PerturbRecipe.write`; :meth:`~PerturbRecipe.run` calls them in
order. The model is loaded once and never cloned: each condition writes its perturbation into the chosen
weights in place, runs one forward pass over the held-out blocks and restores the saved bits, verified
by checksum, also when the condition fails. The run is read only through :mod:`cwa.rundir`, and written
only through :func:`cwa.rundir.write_perturbation` (a new set ``perturb/<n>/``, all of it or nothing).

The steps' pieces live beside it: :mod:`cwa.perturb.loading` (run, model, held-out blocks),
:mod:`cwa.perturb.conditions` (the conditions and their weights), :mod:`cwa.perturb.restoring` (activation
restore), :mod:`cwa.perturb.evaluate` (the forward pass and the rows' statistics).
"""

from __future__ import annotations

import datetime as dt
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from cwa.ablation.controls import Control, ControlContext, ControlName, ControlUnavailable, check_seeds, make_control
from cwa.ablation.perturbations import (
    ChecksumCache,
    Perturbation,
    PerturbationName,
    Selection,
    make_perturbation,
    perturbed,
    seeded,
    selection_size,
    topk_prefix,
)
from cwa.ablation.restore import RestoreMode
from cwa.ablation.units import Unit, check_units
from cwa.common import smoke
from cwa.common.environment import torch_device
from cwa.common.errors import CwaError
from cwa.common.io import remove_stale_temporaries
from cwa.perturb.conditions import condition_place, selection_of, unit_conditions, with_restored_twins
from cwa.perturb.downstream import task_meta, task_settings, tasks_from_option
from cwa.perturb.evaluate import Condition, Result, StatisticsOptions, evaluate, perturb_rows
from cwa.perturb.loading import fit_sensitivity_first, load_heldout, load_run_model
from cwa.perturb.restoring import ActivationRestore
from cwa.rundir import DownstreamRow, Run, check_name, write_perturbation

MAX_PAIRS = 20
DEFAULT_KS = (1, 10, 100, 1000, 10000)  # --ks unset: cut to the run's list

DEFAULT_CONTROLS: tuple[ControlName, ...] = ("random_matched", "magnitude_matched", "bottomk")


class PerturbRecipe:
    """Perturb the top-K weights of a fit-sensitivity run and matched controls; measure held-out damage.

    Args:
        run: a finished ``cwa fit-sensitivity`` run directory (with summary.json, topk.csv, config.yaml
            and, for the bottom-K control, scores.safetensors).
        fit_config: instead of ``run``: a fit-sensitivity YAML to run first; its new run directory is used.
        fit_args: extra fit-sensitivity options with ``fit_config``, e.g. ``[--model.k, "1000"]``.
        perturbation: one perturbation or a list, each a short name (``zero``, ``sign_flip``, ``scale``,
            ``gaussian_noise``, ``bit_flip``: default options) or a class with its options
            (``--perturbation BitFlip --perturbation.bit sign``; ``--perturbation.help BitFlip`` lists them).
        ks: top-K sizes to perturb (a dose-response curve); each at most the length of the run's list. None:
            1, 10, 100, 1000, 10000 up to the length of the run's list (and that length, with a note, when the
            list is shorter than 10000), so the defaults work on any run.
        single: perturb each of the top ``single`` weights alone (0: no single-weight ablation).
        controls: controls of the same size for every K, by short name or class: ``random_matched``
            (random weights, the same count from each tensor as the top-K set), ``magnitude_matched``
            (random weights from the same |w| quantile bins; option ``bins``), ``bottomk`` (lowest
            |score|, needs scores.safetensors).
        seeds: seeds of the random controls (each is drawn once per seed and K); the first also seeds noise.
        heldout_samples: evaluate at most this many held-out blocks (None: the run's setting).
        heldout_tokens: evaluate only the first this many tokens of each held-out block (None: whole
            blocks): more, shorter sequences for the same compute give the statistics more units.
        batch_size: held-out blocks per forward pass (None: the run's setting).
        bootstrap: bootstrap resamples (over held-out sequences) for the confidence intervals.
        permutations: bootstrap resamples of the paired bootstrap-t test (smallest p: 2 / (1 + permutations)).
        confidence: coverage of the confidence intervals.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``...
        trust_remote_code: let the model's own code from its repository run; taken only from this
            command, never from the run's config.yaml.
        verify: checksum every touched tensor after restoring it (fails loudly if a bit differs).
        figures: write the set's figures/perturb_dose_response.png and figures/perturb_single_weight.png.
        tensorboard: write TensorBoard scalars into the run directory.
        units: what is perturbed around each chosen weight, one or several: ``weight`` (the weight itself),
            ``row`` (every weight of its output unit, a neuron) or ``column`` (every weight of its input
            channel); layout-aware (GPT-2 ``Conv1D`` stores (in, out)). A 1-D tensor's unit is the weight.
            Every condition runs once per unit, and controls draw whole units of the same kind.
        leave_one_out: for the top N weights as a set: N conditions, each the set without one member,
            tested against the joint top-N set (0: none). Adds N to ``ks`` and raises ``single`` to N.
        pairs: every pair among the top N weights, perturbed together (0: none; at most 20). Raises
            ``single`` to N.
        restore: activation restore modes: for every top-K set and single weight (not the controls), and
            each mode, a twin condition with the same perturbation while the baseline output of the
            perturbed weights' layer is written back at their output channels: ``all`` at every token,
            ``spikes`` only where the baseline |activation| is at least ``restore_threshold`` times the
            channel's median |activation| over the held-out tokens. Its row reports the fraction of the
            NLL damage recovered.
        restore_threshold: the spike threshold of ``restore spikes`` (times the channel's median |value|).
        tasks: lm-evaluation-harness tasks to run on the baseline and each top-K and single-weight condition
            (needs the ``cwa[eval]`` extra): ``cwa_pydoc_lastword`` (cwa's offline last-word task over the
            run's held-out text) and/or hub tasks (``hellaswag``, ``arc_easy``, ``piqa``, ``winogrande``,
            ``lambada``); a list or a comma-separated string. Written to downstream.csv.
        tasks_limit: evaluate at most this many items of each task (None: all).
        tasks_batch_size: lm-eval batch size.
        tasks_on_controls: also run the tasks on the control conditions (each costs a full lm-eval pass).
        name: a label for this experiment, recorded in perturb.json and shown by the report and compare. Every
            perturb writes a new numbered set, ``perturb/<n>/`` in the run directory, named or not.
    """

    def __init__(
        self,
        run: str | None = None,
        fit_config: str | None = None,
        fit_args: list[str] | None = None,
        perturbation: PerturbationName | Perturbation | list[PerturbationName | Perturbation] = "zero",
        ks: tuple[int, ...] | None = None,
        single: int = 10,
        controls: tuple[ControlName | Control, ...] = DEFAULT_CONTROLS,
        seeds: tuple[int, ...] = (0, 1, 2),
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
        tensorboard: bool = True,
        units: tuple[Unit, ...] = ("weight",),
        leave_one_out: int = 0,
        pairs: int = 0,
        restore: tuple[RestoreMode, ...] = (),
        restore_threshold: float = 10.0,
        tasks: str | list[str] | None = None,
        tasks_limit: int | None = None,
        tasks_batch_size: int = 8,
        tasks_on_controls: bool = False,
        name: str | None = None,
    ) -> None:
        self.name = check_name(name)
        if (run is None) == (fit_config is None):
            raise CwaError("give exactly one of --run (a fit-sensitivity run directory) and --fit_config.")
        specs = [perturbation] if isinstance(perturbation, str | Perturbation) else list(perturbation)
        if not specs:
            raise CwaError("give at least one perturbation.")
        self.perturbations = [make_perturbation(p) for p in specs]
        self.controls = [make_control(c) for c in controls]
        self.default_ks = ks is None
        self.ks = tuple(sorted(set(DEFAULT_KS if ks is None else ks)))
        if any(k < 1 for k in self.ks):
            raise CwaError(f"every K must be at least 1, got {list(self.ks)}.")
        if single < 0:
            raise CwaError(f"single must be 0 or more, got {single}.")
        if not self.ks and not single and not leave_one_out and not pairs:
            raise CwaError("nothing to perturb: give ks or single.")
        if heldout_samples is not None and heldout_samples < 1:
            raise CwaError("the held-out split is empty (heldout_samples < 1); evaluate at least one block.")
        if heldout_tokens is not None and heldout_tokens < 2:
            raise CwaError(
                f"heldout_tokens must be at least 2 (a sequence predicts its next tokens), got {heldout_tokens}."
            )
        self.statistics = StatisticsOptions(bootstrap, permutations, confidence)
        self.run_path, self.fit_config, self.fit_args = run, fit_config, list(fit_args or [])
        self.single, self.seeds = single, check_seeds(seeds)
        self.heldout_samples, self.heldout_tokens, self.batch_size = heldout_samples, heldout_tokens, batch_size
        self.device_name, self.trust_remote_code, self.verify = device, trust_remote_code, verify
        torch_device(device)  # an absent device is refused here, before the run or the model is read
        self.figures, self.tensorboard = figures, tensorboard
        self._set_units_and_sets(units, leave_one_out, pairs)
        self.timings: dict[str, float] = {}
        self.notes: list[str] = []
        self.conditions: list[Condition] = []
        self.results: list[Result] = []
        self.tasks_on_controls = tasks_on_controls
        self.downstream = tasks_from_option(tasks, tasks_limit, tasks_batch_size)
        self.downstream_rows: list[DownstreamRow] | None = None
        self.restore = ActivationRestore(restore, restore_threshold)

    def _set_units_and_sets(self, units: tuple[str, ...], leave_one_out: int, pairs: int) -> None:
        self.units = check_units(tuple(units))
        for option, n in (("leave_one_out", leave_one_out), ("pairs", pairs)):
            if n < 0 or n == 1:
                raise CwaError(f"{option} needs a set of at least 2 top weights (or 0 for none), got {n}.")
        if pairs > MAX_PAIRS:
            raise CwaError(
                f"pairs={pairs} would evaluate {pairs * (pairs - 1) // 2} pairs; give at most {MAX_PAIRS} top weights."
            )
        self.leave_one_out, self.pairs = leave_one_out, pairs
        if leave_one_out:
            self.ks = tuple(sorted({*self.ks, leave_one_out}))  # the joint set each leave-one-out is tested against
        self.single = max(self.single, leave_one_out, pairs)  # each member alone, beside the sets

    def _clip_default_ks(self, listed: int) -> None:
        """The default ks cut to the run's top-K list (its length added as the last K), with a note."""
        dropped = [k for k in self.ks if k > listed and k in DEFAULT_KS]
        if dropped:
            self.ks = tuple(sorted({*(k for k in self.ks if k <= listed), listed}))
            self.notes.append(
                f"default ks {', '.join(map(str, dropped))} left out: the run's top-K list holds {listed} weights "
                f"(K up to {listed} perturbed; give --ks to choose)"
            )

    # -- the life cycle ----------------------------------------------------------------------------
    def run(self) -> Path:
        """Set up, build the conditions, evaluate them and write the results; return the run directory."""
        started = time.perf_counter()
        self.setup()
        self.build_conditions()
        self.evaluate()
        self.timings["total_s"] = time.perf_counter() - started
        self.write()
        return self.run_dir.path

    def setup(self) -> None:
        """Load the run (running fit-sensitivity first with ``fit_config``), the model and the held-out blocks."""
        if self.fit_config is not None:
            start = time.perf_counter()
            self.run_path = str(fit_sensitivity_first(self.fit_config, self.fit_args))
            self.timings["fit_sensitivity_s"] = time.perf_counter() - start
        self.run_dir = Run.load(self.run_path)
        self.topk = self.run_dir.topk
        if self.default_ks:
            self._clip_default_ks(len(self.topk))
        self.ks = smoke.bound_ks(self.ks, len(self.topk), (self.leave_one_out,))
        longest = max([*self.ks, self.single])
        if longest > len(self.topk):
            raise CwaError(
                f"K={longest} is larger than the run's top-K list ({len(self.topk)} weights); lower ks/single or "
                "rerun fit-sensitivity with a larger model.k."
            )
        self.dtype = self.run_dir.summary.dtype or (self.run_dir.config.get("model") or {}).get("dtype") or "float32"
        from cwa.model.loading import torch_dtype

        for perturbation in self.perturbations:
            perturbation.validate(torch_dtype(self.dtype))  # a bad bit index fails before the model is loaded
        start = time.perf_counter()
        self.loaded = load_run_model(self.run_dir, self.dtype, self.device_name, self.trust_remote_code, self.units)
        self.model, self.device, self.params = self.loaded.model, self.loaded.device, self.loaded.params
        self.notes += self.loaded.notes
        self.timings["load_model_s"] = time.perf_counter() - start
        start = time.perf_counter()
        self.heldout = load_heldout(self.run_dir, self.heldout_samples, self.batch_size, self.heldout_tokens)
        self.data, self.blocks = self.heldout.data, self.heldout.blocks
        self.statistics.check_sample(self.blocks.shape[0])  # before any evaluation, not after all of them
        self.timings["data_s"] = time.perf_counter() - start
        self.notes += self.heldout.notes
        if self.downstream is not None:  # the local task is built from the held-out text, before any evaluation
            self.downstream.setup(self.data, self.trust_remote_code)

    def build_conditions(self) -> None:
        """Prepare the controls (once) and list every condition: per perturbation and unit, per K the top-K
        set and each control (per seed for a random one), each of the top ``single`` weights alone, the
        leave-one-out sets and the pairs; then the activation-restore twins. A control without a definition
        at a unit is left out there, noted."""
        controls = self._prepared_controls() if self.ks else []
        for control in controls:
            missing = [u for u in self.units if u not in control.units]
            if missing:
                units = ", ".join(missing)
                self.notes.append(f"{control.name} skipped at unit {units}: it has no unit-level definition.")
        for perturbation in self.perturbations:
            for unit in self.units:
                self.conditions += unit_conditions(
                    perturbation, unit, self.ks, controls, self.seeds, self.single, self.leave_one_out, self.pairs
                )
        self.conditions = with_restored_twins(self.conditions, self.restore.modes)

    def evaluate(self) -> None:
        """The baseline, then each condition perturbed in place, evaluated and restored; then the rows."""
        from tqdm.auto import tqdm

        self.checksums = ChecksumCache(self.params) if self.verify else None
        bar = tqdm(total=len(self.conditions) + 1, desc="cwa perturb", unit="condition", file=sys.stderr)
        with bar:
            longest = topk_prefix(self.topk, max([*self.ks, self.single]))
            loaded, infos = self.loaded, self.run_dir.infos
            with self.restore.recording(
                self.model, longest, self.units, loaded.shapes, loaded.transposed, infos
            ) as before_batch:
                self.baseline = Result(None, self._evaluation(before_batch), 0)
            bar.update(1)
            for condition in self.conditions:
                bar.set_postfix_str(condition.name, refresh=False)
                result = self._evaluate_condition(condition)
                if result is not None:
                    self.results.append(result)
                bar.update(1)
        self.rows = perturb_rows(self.baseline, self.results, self.statistics)
        self._evaluate_tasks()

    def write(self) -> None:
        """perturb.csv, the figures and perturb.json as a new set perturb/<n>/; TensorBoard scalars; the console."""
        self.timings.update(self._condition_timings())
        figs = self._figures() if self.figures else {}
        self.set_dir, notes = write_perturbation(self.run_dir.path, self.rows, self._meta(), figs, self.downstream_rows)
        self.notes += notes
        remove_stale_temporaries(self.run_dir.path)  # what an earlier, killed perturb may have left
        if self.tensorboard:
            from cwa.perturb.figures import tensorboard_scalars

            tensorboard_scalars(self.run_dir.path, self.rows)
        from cwa.perturb.console import print_table

        base = self.baseline.evaluation.stats
        styles = [(c.name, c.figure_style()) for c in self.controls]
        headers = {name: style.short or style.label for name, style in styles}
        print_table(self.rows, self._title, base, self.timings, self.notes, self.set_dir, headers)
        if self.downstream_rows:
            from cwa.perturb.downstream import format_downstream

            print("\n".join(format_downstream(self.downstream_rows, self.statistics.confidence)))

    # -- the steps' pieces -------------------------------------------------------------------------
    def _prepared_controls(self) -> list[Control]:
        run = self.run_dir
        scores = (lambda: {n: s for n, s in run.scores().items()}) if run.has_scores else None
        context = ControlContext(self.params, self.topk, max(self.ks), scores, self.loaded.transposed)
        ready = []
        for control in self.controls:
            start = time.perf_counter()
            note = control.prepare(context)
            self.timings[f"{control.name}_prepare_s"] = time.perf_counter() - start
            if note is None:
                ready.append(control)
            else:
                self.notes.append(note)
        return ready

    def _evaluation(self, before_batch: Callable[[int], None] | None = None):
        batch_size = self.batch_size or int(self.run_dir.data.get("batch_size") or 4)
        return evaluate(self.model, self.blocks, batch_size, self.device, before_batch)

    def _selection(self, condition: Condition) -> Selection:
        return selection_of(condition, self.topk, self.loaded.shapes, self.loaded.transposed)

    def _evaluate_condition(self, condition: Condition) -> Result | None:
        start = time.perf_counter()
        try:
            selection = self._selection(condition)
        except ControlUnavailable as exc:
            self.notes.append(f"{condition.name} skipped: {exc}")
            return None
        select_s = time.perf_counter() - start
        start = time.perf_counter()
        with (
            self._perturbed(condition, selection),
            self.restore.replaying(self.model, condition, selection, self.run_dir.infos) as replayer,
        ):
            evaluation = self._evaluation(replayer.at_batch if replayer is not None else None)
        apply_restore_s = time.perf_counter() - start - evaluation.seconds
        where = condition_place(condition, self.topk, self.run_dir.infos)
        restored = replayer.restored if replayer is not None else None
        return Result(condition, evaluation, selection_size(selection), apply_restore_s, select_s, where, restored)

    def _perturbed(self, condition: Condition, selection: Selection | None = None):
        """The condition's perturbation in place, restored (and checksummed) on exit. The generator is
        seeded from the condition alone, so the held-out pass and the tasks see the same noise."""
        seed = condition.seed if condition.seed is not None else (self.seeds[0] if self.seeds else 0)
        generator = seeded(seed, condition.k or 0, condition.rank or 0, 3, *(condition.ranks or ()))
        selection = self._selection(condition) if selection is None else selection
        transposed = self.loaded.transposed
        return perturbed(self.params, selection, condition.perturbation, generator, self.checksums, transposed)

    def _evaluate_tasks(self) -> None:
        """The lm-eval tasks on the baseline and on each condition that is not a control (controls too with
        ``tasks_on_controls``), each perturbed in place and restored (checksummed) as in the held-out pass."""
        if self.downstream is None:
            return
        chosen = [  # a restored twin replays held-out activations: it has no meaning on other inputs
            r.condition
            for r in self.results
            if not r.condition.restore and (self.tasks_on_controls or r.condition.control is None)
        ]
        perturbations = [(c.name, partial(self._perturbed, c)) for c in chosen]
        stats = self.statistics
        self.downstream_rows = self.downstream.run(self.model, perturbations, stats.bootstrap, stats.confidence)

    # -- what is written -----------------------------------------------------------------------------
    @property
    def _title(self) -> str:
        return f"{self.run_dir.model} · {self.run_dir.metric}"

    def _condition_timings(self) -> dict[str, float]:
        evals = [r.evaluation.seconds for r in self.results]
        overhead = [r.apply_restore_s for r in self.results]
        n = max(1, len(self.results))
        return {
            "baseline_eval_s": self.baseline.evaluation.seconds,
            "conditions": len(self.results),
            "mean_eval_s_per_condition": sum(evals) / n,
            "mean_apply_restore_s_per_condition": sum(overhead) / n,
            "max_apply_restore_s": max(overhead, default=0.0),
            "mean_select_s_per_condition": sum(r.select_s for r in self.results) / n,
        }

    def _figures(self) -> dict:
        from cwa.perturb import figures as perturb_figures

        figures = {}
        if self.ks:
            styles = {c.name: c.figure_style() for c in self.controls}
            draw = partial(perturb_figures.dose_response, self.rows, self._title, styles=styles)
            figures["perturb_dose_response.png"] = draw
        if self.single:
            where = {r.condition.name: r.where for r in self.results}
            figures["perturb_single_weight.png"] = partial(perturb_figures.single_weight, self.rows, where, self._title)
        if self.leave_one_out:
            figures["perturb_sets.png"] = partial(perturb_figures.sets, self.rows, self._title)
        return figures

    def settings(self) -> dict:
        """This invocation's options as plain data (recorded in perturb.json)."""
        return {
            "run": str(self.run_dir.path),
            "fit_config": self.fit_config,
            "fit_args": self.fit_args,
            "perturbation": [{"name": p.name, **p.options()} for p in self.perturbations],
            "ks": list(self.ks),
            "single": self.single,
            "controls": [{"name": c.name, **c.options()} for c in self.controls],
            "seeds": list(self.seeds),
            "heldout_samples": self.heldout_samples,
            "heldout_tokens": self.heldout_tokens,
            "batch_size": self.batch_size,
            **vars(self.statistics),
            "device": self.device_name,
            "trust_remote_code": self.trust_remote_code,
            "verify": self.verify,
            "figures": self.figures,
            "tensorboard": self.tensorboard,
            "units": list(self.units),
            "leave_one_out": self.leave_one_out,
            "pairs": self.pairs,
            "restore": list(self.restore.modes),
            "restore_threshold": self.restore.threshold,
            **task_settings(self.downstream),
            "tasks_on_controls": self.tasks_on_controls,
        }

    def _meta(self) -> dict:
        from cwa.common.environment import environment, peak_memory

        base = self.baseline.evaluation
        return {
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "name": self.name,
            "settings": self.settings(),
            "perturbations": [p.describe() for p in self.perturbations],
            "run": {
                "model": self.run_dir.model,
                "dtype": self.dtype,
                "metric": self.run_dir.metric,
                "mode": self.run_dir.mode,
                "topk_rows": len(self.topk),
            },
            "heldout": {
                "sequences": len(base.stats),
                "tokens": int(base.stats.tokens.sum()),
                "seq_len": int(self.blocks.shape[1]),
                "block_len": self.data.seq_len,
                "fingerprint": self.data.fingerprint("heldout"),
                "run_fingerprint": self.heldout.run_fingerprint,
                "calibration_fingerprint": self.data.fingerprint("calibration"),
            },
            "baseline": {
                **base.stats.values(),
                "torchmetrics_perplexity": base.perplexity,
                "torchmetrics_relative_gap": abs(base.perplexity - base.stats.perplexity) / base.stats.perplexity,
            },
            "device": str(self.device),
            "timings": {k: round(v, 4) if isinstance(v, float) else v for k, v in self.timings.items()},
            "downstream": task_meta(self.downstream, self._condition_timings()["mean_eval_s_per_condition"]),
            "memory": peak_memory(),
            "notes": self.notes,
            "environment": environment(),
        }
