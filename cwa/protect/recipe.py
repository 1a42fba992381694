"""``cwa protect``: stress every weight of the chosen tensors except a protected set, and measure what the
protection buys against protected sets of the same size drawn at random.

The stresses (:mod:`cwa.ablation.interventions`): ``rtn`` (round-to-nearest quantization; protected weights
are kept exactly and left out of their group's range), ``prune`` (magnitude, or another run's metric, never
removing a protected weight), ``bit_errors`` (each stored bit of each unprotected weight flips with
probability p) and ``noise`` (Gaussian, relative to each tensor's rms). The protected sets: the run's top-K
(K as counts or fractions), the verified super weights of a find-super-weights run, their rows or columns
(``units``), and the controls of the same size (``random_matched``: the same count in each tensor;
``magnitude_matched``: the same |w| quantile bins), with K = 0 (nothing protected) as every curve's start.

A recipe like perturb's: ``setup``, ``build_conditions``, ``evaluate`` (each condition one in-place stress,
one held-out pass, a bit-exact restore; with ``--tasks`` the lm-eval tasks under the same stress, the same
random draws included), ``write`` (``protect.csv``, ``protect_downstream.csv``, the figures and
``protect.json`` as one set through :func:`cwa.rundir.interventions.write_intervention`).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from cwa.ablation.controls import Control, ControlContext, ControlName, ControlUnavailable, make_control
from cwa.ablation.faults import BitField
from cwa.ablation.interventions import RTN, BitErrors, Noise, Prune, Stress, StressContext, StressName
from cwa.ablation.perturbations import Selection, seeded, topk_prefix
from cwa.ablation.pruning import Group
from cwa.ablation.units import Unit, check_units, expand
from cwa.common.errors import CwaError
from cwa.common.io import remove_stale_temporaries
from cwa.perturb.downstream import task_settings, tasks_from_option
from cwa.perturb.evaluate import StatisticsOptions
from cwa.prune.session import HeldOutSession, Pass, TensorChoice
from cwa.rundir import DownstreamRow, Run
from cwa.rundir.files import SUMMARY, SUPER_WEIGHTS_KIND


@dataclass
class ProtectCondition:
    stress: Stress
    protected: str  # none, topk, super_weights or a control's name
    k: int
    unit: str = "weight"
    set_seed: int | None = None
    seed: int | None = None  # the random stress's seed
    control: Control | None = None


class ProtectRecipe:
    """Stress every weight of the chosen tensors except a protected set; compare with random sets of the same size.

    Args:
        run: a finished fit-sensitivity run (its top-K list, model and held-out data).
        stress: ``rtn``, ``prune``, ``bit_errors`` or ``noise``.
        levels: the stress levels: bits (rtn), sparsity (prune), bit-error rate p (bit_errors) or sigma
            relative to each tensor's rms (noise).
        protect_k: protected set sizes: counts, or fractions (below 1) of the stressed weights; 0: nothing
            protected (always evaluated).
        controls: protected sets of the same size to compare with: ``random_matched`` (the top-K set's count
            in each tensor), ``magnitude_matched`` (its count in each |w| quantile bin).
        super_weights: a find-super-weights run directory: also protect its verified super weights.
        units: what is protected around each chosen weight: ``weight``, its output ``row`` or input ``column``.
        seeds: seeds of the random controls and of the random stresses (bit_errors, noise).
        group_size: rtn: consecutive inputs of an output row sharing a scale (None: whole rows).
        symmetric: rtn: absmax symmetric grid (True) or min-max asymmetric (False).
        clip_ratio: rtn: each group's range is this share of its unprotected range (clips the other outliers).
        prune_group: prune: comparison group, ``row``, ``tensor`` or ``global``.
        prune_run: prune: a fit-sensitivity run whose scores decide what is removed (None: magnitude).
        bit_field: bit_errors: ``all`` bits, only the ``sign`` bit or only the ``exponent`` bits.
        tensors: ``linear`` (Linear / Conv1D weights inside the blocks) or ``scored`` (every scored tensor).
        heldout_samples: evaluate at most this many held-out blocks (None: the run's setting).
        heldout_tokens: only the first this many tokens of each block (None: whole blocks).
        batch_size: held-out blocks per forward pass (None: the run's setting).
        bootstrap: bootstrap resamples over held-out sequences for the intervals.
        permutations: resamples of the paired bootstrap-t test against the unstressed model.
        confidence: coverage of the intervals.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``...
        trust_remote_code: let the model's own code run; taken only from this command.
        verify: checksum every stressed tensor after restoring it.
        figures: write figures/protect_k.png and figures/protect_level.png.
        tasks: lm-evaluation-harness tasks to run on the unstressed model and under every condition, each seed
            of a random stress or set its own (needs the ``cwa[eval]`` extra; as ``cwa perturb --tasks``):
            ``cwa_pydoc_lastword`` (offline, from the run's held-out text) and/or hub tasks; a list or a
            comma-separated string. Written to protect_downstream.csv.
        tasks_limit: evaluate at most this many items of each task (None: all).
        tasks_batch_size: lm-eval batch size.
    """

    def __init__(
        self,
        run: str,
        stress: StressName = "rtn",
        levels: tuple[float, ...] = (3, 4),
        protect_k: tuple[float, ...] = (0, 1, 10, 100, 1000),
        controls: tuple[ControlName, ...] = ("random_matched", "magnitude_matched"),
        super_weights: str | None = None,
        units: tuple[Unit, ...] = ("weight",),
        seeds: tuple[int, ...] = (0, 1, 2),
        group_size: int | None = None,
        symmetric: bool = True,
        clip_ratio: float = 1.0,
        prune_group: Group = "row",
        prune_run: str | None = None,
        bit_field: BitField = "exponent",
        tensors: TensorChoice = "linear",
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
    ) -> None:
        if not levels:
            raise CwaError("give at least one stress level with --levels.")
        if any(k < 0 for k in protect_k):
            raise CwaError(f"every protected K must be 0 or more, got {list(protect_k)}.")
        if not seeds:
            raise CwaError("give at least one seed.")
        self.run_path, self.super_weights_path, self.prune_run = run, super_weights, prune_run
        self.options = {"group_size": group_size, "symmetric": symmetric, "clip_ratio": clip_ratio}
        self.options |= {"prune_group": prune_group, "bit_field": bit_field}
        self.stress_name = stress
        self.stresses = [make_stress(stress, level, **self.options) for level in dict.fromkeys(levels)]
        self.protect_k, self.seeds = tuple(dict.fromkeys(protect_k)), tuple(seeds)
        self.controls = [make_control(c) for c in controls]
        self.units = check_units(tuple(units))
        self.tensor_choice, self.figures = tensors, figures
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
        return self.run_dir.path

    def setup(self) -> None:
        """Load the run, the model and held-out blocks; resolve K; read the super weights and prune scores."""
        self.run_dir = Run.load(self.run_path)
        self.session = HeldOutSession(self.run_dir, *self.session_options)
        self.session.load()
        self.statistics.check_sample(self.session.blocks.shape[0])
        from cwa.model.loading import torch_dtype

        for stress in self.stresses:
            stress.validate(torch_dtype(self.session.dtype))
        self.scored = {n: self.session.named[n] for n in self.run_dir.infos if n in self.session.named}
        self.params = self.session.tensors(list(self.run_dir.infos), self.tensor_choice)
        self.transposed = self.session.transposed(list(self.scored))
        self.shapes = {n: tuple(t.shape) for n, t in self.scored.items()}
        total = sum(p.numel() for p in self.params.values())
        self.ks = sorted({int(round(k * total)) if 0 < k < 1 else int(k) for k in self.protect_k})
        # K counts protected weights that the stress would change: the run's ranked list within the stressed
        # tensors (a norm weight at the top of a gradient metric's list needs no protection from a linear stress).
        self.ranked = self.run_dir.topk.within(self.params)
        too_many = [k for k in self.ks if k > len(self.ranked)]
        if too_many:
            self.ks = [k for k in self.ks if k <= len(self.ranked)]
            where = (
                f"only {len(self.ranked)} of the run's top-{len(self.run_dir.topk)} list are in the stressed tensors"
            )
            if not any(self.ks):
                raise CwaError(
                    f"protect_k {too_many} asks for more weights than the run can name: {where}; lower protect_k, "
                    "or rerun fit-sensitivity with a larger model.k (or model.include on the stressed tensors)."
                )
            self.notes.append(f"K={', '.join(map(str, too_many))} left out: {where}.")
        self.super_selection = self._super_weights() if self.super_weights_path else None
        self.prune_scores = self._prune_scores() if self.prune_run else None
        if self.downstream is not None:  # an unknown task or a missing local item stops here, before any pass
            self.downstream.setup(self.session.data, self.session.trust_remote_code)

    def _super_weights(self) -> Selection:
        """The verified super weights of a find-super-weights run, as a selection of the stressed tensors."""
        path = Path(self.super_weights_path).expanduser() / SUMMARY
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CwaError(f"cannot read '{path}' ({exc}); pass a finished find-super-weights run.") from None
        if summary.get("kind") != SUPER_WEIGHTS_KIND or summary.get("status") != "complete":
            raise CwaError(f"'{path.parent}' is not a finished find-super-weights run.")
        chosen: dict[str, list[int]] = {}
        for weight in summary.get("super_weights") or []:
            name, (r, c) = weight["parameter"], weight["storage_index"]
            if name not in self.scored:
                raise CwaError(f"super weight '{name}' is not a tensor the run scored; use runs of the same model.")
            chosen.setdefault(name, []).append(int(r) * self.shapes[name][1] + int(c))
        if not chosen:
            self.notes.append(f"'{path.parent}' has no verified super weight: the super_weights set is left out.")
        return {n: torch.unique(torch.tensor(i, dtype=torch.long)) for n, i in chosen.items()}

    def _prune_scores(self):
        other = Run.load(self.prune_run)
        if not other.has_scores:
            raise CwaError(f"'{other.path}' has no scores.safetensors to prune by; rerun it with scores kept.")
        missing = [n for n in self.params if n not in other.infos]
        if missing:
            raise CwaError(
                f"'{other.path}' did not score '{missing[0]}'; prune by a run that scored every stressed tensor."
            )
        return other.scores()

    def build_conditions(self) -> None:
        """Per stress level: nothing protected, then per K and unit the top-K set, the super weights and each
        control (a random one per seed); a random stress runs every condition once per seed."""
        controls = self._prepared_controls()
        self.conditions: list[ProtectCondition] = []
        for stress in self.stresses:
            stress_seeds = self.seeds if stress.random else (None,)
            sets: list[ProtectCondition] = [ProtectCondition(stress, "none", 0)]
            for unit in self.units:
                if self.super_selection:
                    n = sum(int(i.numel()) for i in self.super_selection.values())
                    sets.append(ProtectCondition(stress, "super_weights", n, unit))
                for k in (k for k in self.ks if k > 0):
                    sets.append(ProtectCondition(stress, "topk", k, unit))
                    for control in controls:
                        for seed in self.seeds if control.seeded else (None,):
                            sets.append(ProtectCondition(stress, control.name, k, unit, seed, control=control))
            for condition in sets:
                for seed in stress_seeds:
                    self.conditions.append(ProtectCondition(**{**vars(condition), "seed": seed}))

    def _prepared_controls(self) -> list[Control]:
        if not any(k > 0 for k in self.ks):
            return []
        run = self.run_dir
        scores = (lambda: dict(run.scores().items())) if run.has_scores else None
        context = ControlContext(self.scored, self.ranked, max(self.ks), scores, self.transposed)
        ready = []
        for control in self.controls:
            note = control.prepare(context)
            if note is None:
                ready.append(control)
            else:
                self.notes.append(note)
        return ready

    # -- evaluating --------------------------------------------------------------------------------
    def evaluate(self) -> None:
        from tqdm.auto import tqdm

        from cwa.protect.rows import protect_rows

        self.baseline = self.session.evaluate()
        self.results: list[tuple[ProtectCondition, Pass, int]] = []
        with tqdm(total=len(self.conditions), desc="cwa protect", unit="condition", file=sys.stderr) as bar:
            for condition in self.conditions:
                bar.set_postfix_str(
                    f"{condition.stress.describe()} {condition.protected} k={condition.k}", refresh=False
                )
                result = self._evaluate_condition(condition)
                if result is not None:
                    self.results.append(result)
                bar.update(1)
        self.rows = protect_rows(self.baseline, self.results, self.statistics)
        self._evaluate_tasks()

    def _evaluate_tasks(self) -> None:
        """The lm-eval tasks on the unstressed model and under each evaluated condition, stressed in place
        (the same random draws as its held-out pass) and restored, checksummed; then the means over seeds."""
        if self.downstream is None:
            return
        from cwa.protect.rows import downstream_means

        named = zip(self.results, self.rows[1 : 1 + len(self.results)], strict=True)
        conditions = [(row.condition, partial(self._stressed, condition)) for (condition, _, _), row in named]
        stats = self.statistics
        rows = self.downstream.run(self.session.model, conditions, stats.bootstrap, stats.confidence, "cwa protect")
        self.downstream_rows = rows + downstream_means(self.rows, rows, stats.confidence)

    def _stressed(self, condition: ProtectCondition):
        return self.session.intervened(condition.stress, self._context(condition)[0])

    def _protected(self, condition: ProtectCondition) -> Selection:
        if condition.protected == "none":
            return {}
        if condition.protected == "super_weights":
            chosen = self.super_selection or {}
        elif condition.control is not None:
            if condition.unit == "weight":
                return self._within(condition.control.select(condition.k, condition.set_seed))
            return self._within(condition.control.select(condition.k, condition.set_seed, condition.unit))
        else:
            chosen = topk_prefix(self.ranked, condition.k)
        return self._within(expand(chosen, self.shapes, self.transposed, condition.unit))

    def _within(self, selection: Selection) -> Selection:
        """Only the protected weights in stressed tensors (elsewhere nothing changes anyway)."""
        return {n: i for n, i in selection.items() if n in self.params}

    def _evaluate_condition(self, condition: ProtectCondition) -> tuple[ProtectCondition, Pass, int] | None:
        try:
            context, n_protected = self._context(condition)
        except ControlUnavailable as exc:
            self.notes.append(f"{condition.protected} k={condition.k} skipped: {exc}")
            return None
        return condition, self.session.evaluate(condition.stress, context), n_protected

    def _context(self, condition: ProtectCondition) -> tuple[StressContext, int]:
        """What the condition's stress sees (its generator seeded from the condition alone, so every pass
        under it draws the same bits or noise) and the number of protected weights."""
        protected = self._protected(condition)
        level = self.stresses.index(condition.stress)
        generator = seeded(condition.seed or 0, level, 7) if condition.stress.random else None
        scores = self.prune_scores
        context = StressContext(
            self.params,
            protected,
            self.transposed,
            scores=(lambda name: scores[name]) if scores is not None else None,
            generator=generator,
        )
        return context, sum(int(i.numel()) for i in protected.values())

    # -- writing -----------------------------------------------------------------------------------
    def write(self) -> None:
        from cwa.protect.rows import meta, print_rows
        from cwa.rundir.interventions import write_intervention

        figures = {}
        if self.figures:
            from cwa.prune.figures import protect_against_k, protect_against_level

            title = f"{self.run_dir.model} · {self.run_dir.metric}"
            figures["protect_k.png"] = partial(protect_against_k, self.rows, title, downstream=self.downstream_rows)
            figures["protect_level.png"] = partial(protect_against_level, self.rows, title)
        rows, downstream = self.rows, self.downstream_rows
        notes = write_intervention(self.run_dir.path, "protect", rows, meta(self), figures, downstream)
        remove_stale_temporaries(self.run_dir.path)  # what an earlier, killed protect may have left
        print_rows(self)
        for note in notes:
            print(f"note: {note}.", file=sys.stderr)

    def settings(self) -> dict:
        return {
            "stress": self.stress_name,
            "levels": [s.level for s in self.stresses],
            "stresses": [{"name": s.name, **s.options()} for s in self.stresses],
            "protect_k": list(self.protect_k),
            "ks": list(self.ks),
            "controls": [{"name": c.name, **c.options()} for c in self.controls],
            "super_weights": self.super_weights_path,
            "prune_run": self.prune_run,
            "units": list(self.units),
            "seeds": list(self.seeds),
            "tensors": self.tensor_choice,
            **vars(self.statistics),
            **task_settings(self.downstream),
        }


def make_stress(
    name: str,
    level: float,
    group_size: int | None = None,
    symmetric: bool = True,
    clip_ratio: float = 1.0,
    prune_group: Group = "row",
    bit_field: BitField = "exponent",
) -> Stress:
    """The stress ``name`` at ``level`` (bits, sparsity, p or sigma), with the command's options for it."""
    if name == "rtn":
        if level != int(level):
            raise CwaError(f"RTN levels are integer bit widths, got {level}.")
        return RTN(int(level), group_size, symmetric, clip_ratio)
    if name == "prune":
        return Prune(level, prune_group)
    if name == "bit_errors":
        return BitErrors(level, bit_field)
    if name == "noise":
        return Noise(level)
    raise CwaError(f"unknown stress '{name}': use rtn, prune, bit_errors or noise.")
