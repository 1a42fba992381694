"""``cwa find-super-weights``: super weights found from activations, each candidate verified by ablation.

A recipe (as :mod:`cwa.perturb.recipe`): the same YAML as ``cwa fit-sensitivity`` (its ``model``, ``data`` and
``trainer`` sections; ``model.metric`` and ``model.k`` play no part) plus an optional ``super_weights``
section with :class:`FindSuperWeights`'s options. :meth:`~FindSuperWeights.scan` runs forward passes over
a few calibration blocks with hooks on every MLP output projection (:mod:`cwa.ablation.super_weights`);
:meth:`~FindSuperWeights.verify` zeroes each candidate alone, through perturb's machinery (bit-exact
restore, paired bootstrap interval and paired test on the held-out split), and calls it a super weight
only when the damage is real and large; :meth:`~FindSuperWeights.write` writes the run directory
(``super_weights.csv``, ``figures/activation_spikes.png``, ``summary.json`` with ``kind:
find-super-weights``, TensorBoard scalars) through :mod:`cwa.rundir`.
"""

from __future__ import annotations

import datetime as dt
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from cwa.ablation.perturbations import ChecksumCache, Zero, perturbed
from cwa.ablation.row_test import RowTest
from cwa.ablation.super_weights import Candidate, SuperWeightScan, find_super_weights, recovered_published
from cwa.common import format as fmt
from cwa.common import smoke
from cwa.common.errors import CwaError
from cwa.find_super_weights.row_test import print_row_test
from cwa.find_super_weights.row_test import summary as row_test_summary
from cwa.perturb.evaluate import Condition, Result, StatisticsOptions, evaluate, perturb_rows
from cwa.rundir import CONFIG, ROW_TEST, ConditionKind, PerturbRow, remove_unfinished_run, write_super_weights

DEFAULT_HELDOUT = 24
"""Held-out blocks each candidate is evaluated on by default (README: "Super weights from activations")."""

SUPER = "super_weight"
DAMAGING = "damaging"
ACTIVATION_ONLY = "activation_only"


class FindSuperWeights:
    """Find super weights (Yu et al. 2024) from activation spikes at every MLP output projection, and verify
    each candidate by zeroing it alone on the held-out split.

    Args:
        blocks: calibration blocks scanned (forward passes only).
        threshold: a layer is a candidate when its largest |input| and its largest |output| of the MLP output
            projection both stand at least this many times above the layer's median channel maximum.
        projections: a regular expression for the MLP output projections' module names (default: by role,
            e.g. ``mlp.down_proj``, GPT-2 ``mlp.c_proj``, GPT-NeoX ``mlp.dense_4h_to_h``).
        verify: zero each candidate alone and measure held-out perplexity (off: the scan only).
        max_verify: verify at most this many candidates (the strongest spikes first).
        min_increase: a candidate is called a super weight when zeroing it raises held-out perplexity
            significantly (the interval's lower bound above 0 and p below 0.05) by at least this fraction
            (0.1: +10%); significant but smaller damage is ``damaging``; a candidate whose removal does no
            significant damage is ``activation_only`` (a large activation, not a super weight).
        heldout_samples: evaluate at most this many held-out blocks (None: the data settings', at most 64).
            Every verdict rests on these paired sequences; the console and ``summary.json`` (``heldout``) give
            their number and the baseline perplexity.
        bootstrap: bootstrap resamples (over held-out sequences) for the intervals.
        permutations: bootstrap resamples of the paired bootstrap-t test (smallest p: 2 / (1 + permutations)).
        confidence: coverage of the intervals.
        figures: write figures/activation_spikes.png.
        tensorboard: write per-layer spike scalars to TensorBoard.
        row_test: the census-comparable row test (:mod:`cwa.ablation.row_test`): ablate the strongest
            candidate's whole down-projection output row and ``row_controls`` random rows of the same tensor,
            each alone, and write R = relative held-out NLL increase and G = R - median control R
            (``row_test.csv``).
        row_controls: random control rows of the row test.
        row_seed: seed of the control rows' draw.
    """

    def __init__(
        self,
        blocks: int = 8,
        threshold: float = 10.0,
        projections: str | None = None,
        verify: bool = True,
        max_verify: int = 10,
        min_increase: float = 0.1,
        heldout_samples: int | None = DEFAULT_HELDOUT,
        bootstrap: int = 2000,
        permutations: int = 10000,
        confidence: float = 0.95,
        figures: bool = True,
        tensorboard: bool = True,
        row_test: bool = False,
        row_controls: int = 5,
        row_seed: int = 0,
    ) -> None:
        if blocks < 1:
            raise CwaError(f"blocks must be at least 1, got {blocks}.")
        if not threshold > 1:
            raise CwaError(f"threshold must be above 1 (a ratio to the typical channel maximum), got {threshold}.")
        if max_verify < 0 or min_increase < 0:
            raise CwaError("max_verify and min_increase must be 0 or more.")
        if heldout_samples is not None and heldout_samples < 1:
            raise CwaError("heldout_samples must be at least 1.")
        self.blocks, self.threshold, self.projections = blocks, threshold, projections
        self.verify_candidates, self.max_verify, self.min_increase = verify, max_verify, min_increase
        self.heldout_samples = heldout_samples
        self.statistics = StatisticsOptions(bootstrap, permutations, confidence)
        self.figures, self.tensorboard = figures, tensorboard
        if row_controls < 1:
            raise CwaError(f"row_controls must be at least 1, got {row_controls}.")
        self.row_test_enabled, self.row_controls, self.row_seed = row_test, row_controls, row_seed
        self.row_result: RowTest | None = None
        self.baseline: Result | None = None
        self.timings: dict[str, float] = {}
        self.notes: list[str] = []
        self.rows: list[PerturbRow] = []

    # -- the life cycle ----------------------------------------------------------------------------
    def run(self, module, data, trainer, config_yaml: str) -> Path:
        """Set up from the parsed fit-sensitivity settings, scan, verify, write; return the run directory."""
        started = time.perf_counter()
        self.setup(module, data, trainer)
        try:
            self.scan()
            if self.verify_candidates:
                self.verify()
            if self.row_test_enabled:
                self.row_test()
            self.timings["total_s"] = time.perf_counter() - started
            self.write(config_yaml)
        except BaseException:
            remove_unfinished_run(self.run_dir)
            raise
        self.print_summary()
        return self.run_dir

    def setup(self, module, data, trainer) -> None:
        """The model (loaded as fit-sensitivity would load it), the calibration and held-out blocks."""
        from cwa.fit.preflight import check_trainer
        from cwa.model.loading import load_model

        if trainer.world_size > 1:
            raise CwaError("find-super-weights runs in one process (a few forward passes); use --trainer.devices 1.")
        check_trainer(trainer)
        self.pretrained = module.pretrained
        self.run_dir = Path(trainer.logger.log_dir)
        start = time.perf_counter()
        if self.heldout_samples is not None:
            data.heldout_samples = self.heldout_samples
        data.setup()
        self.data = data
        if self.verify_candidates and data.heldout is not None and data.heldout.shape[0] > 0:
            # before the scan, not after it; the verdicts also need p < 0.05, whatever the interval's confidence
            strictest = replace(self.statistics, confidence=max(self.statistics.confidence, 0.95))
            strictest.check_sample(data.heldout.shape[0])
        self.timings["data_s"] = time.perf_counter() - start
        start = time.perf_counter()
        self.device = trainer.strategy.root_device
        self.model = load_model(
            module.pretrained,
            module.dtype_name,
            attn_implementation=module.attn_implementation,
            trust_remote_code=module.trust_remote_code,
            revision=module.revision,
        ).to(self.device)
        self.model.requires_grad_(False).eval()
        self.dtype = module.dtype_name
        self.timings["load_model_s"] = time.perf_counter() - start

    def scan(self) -> None:
        """Forward passes over the first ``blocks`` calibration blocks with hooks on the projections."""
        calibration = self.data.calibration
        if calibration.shape[0] < self.blocks:
            self.notes.append(f"only {calibration.shape[0]} calibration blocks exist; all were scanned.")
        blocks = calibration[: self.blocks]
        size = self.data.batch_size
        batches = [{"input_ids": blocks[i : i + size].to(self.device)} for i in range(0, blocks.shape[0], size)]
        start = time.perf_counter()
        self.result: SuperWeightScan = find_super_weights(self.model, batches, self.projections, self.threshold)
        self.timings["scan_s"] = time.perf_counter() - start

    def verify(self) -> None:
        """Zero each candidate alone (restored bit for bit) and compare held-out perplexity with the baseline."""
        from tqdm.auto import tqdm

        heldout = self.data.heldout
        if heldout is None or heldout.shape[0] == 0:
            raise CwaError(
                "the held-out split is empty; raise data.heldout_fraction or set super_weights.verify false."
            )
        candidates = self.result.candidates[: self.max_verify]
        if len(self.result.candidates) > self.max_verify:
            self.notes.append(f"verified the {self.max_verify} strongest of {len(self.result.candidates)} candidates.")
        params = {c.parameter: dict(self.model.named_parameters())[c.parameter].data for c in candidates}
        checksums = ChecksumCache(params)
        zero = Zero()
        start = time.perf_counter()
        with tqdm(total=len(candidates) + 1, desc="cwa find-super-weights", unit="condition", file=sys.stderr) as bar:
            baseline = self.baseline = Result(None, self._evaluate(heldout), 0)
            bar.update(1)
            results = []
            for candidate in candidates:
                selection = {candidate.parameter: torch.tensor([self._flat_index(candidate)])}
                with perturbed(params, selection, zero, None, checksums):
                    evaluation = self._evaluate(heldout)
                condition = Condition(zero, ConditionKind.SINGLE, rank=candidate.rank)  # tested against the baseline
                results.append(Result(condition, evaluation, 1, where=self._where(candidate)))
                bar.update(1)
        self.rows = perturb_rows(baseline, results, self.statistics)
        self.timings["verify_s"] = time.perf_counter() - start

    def row_test(self) -> None:
        """The census row test on the strongest candidate (:mod:`cwa.find_super_weights.row_test`)."""
        from cwa.find_super_weights.row_test import run_row_test

        if not self.result.candidates:
            self.notes.append("no candidate: the row test did not run.")
            return
        heldout = self.data.heldout
        if heldout is None or heldout.shape[0] == 0:
            raise CwaError(
                "the held-out split is empty; raise data.heldout_fraction or set super_weights.row_test false."
            )
        start = time.perf_counter()
        if self.baseline is None:
            self.baseline = Result(None, self._evaluate(heldout), 0)
        self.row_result = run_row_test(self, self.result.candidates[0])
        self.timings["row_test_s"] = time.perf_counter() - start

    def write(self, config_yaml: str) -> None:
        """super_weights.csv, the figure and summary.json as one set; config.yaml; TensorBoard scalars."""
        from cwa.common.io import atomic_open

        with atomic_open(self.run_dir / CONFIG) as handle:
            handle.write(config_yaml)
        figures = {}
        if self.figures:
            from functools import partial

            from cwa.fit.figures import activation_spikes

            title = f"{self.pretrained} · MLP output projections"
            figures["activation_spikes.png"] = partial(activation_spikes, self.result, title)
        tables = {} if self.row_result is None else {ROW_TEST: self.row_result.rows()}
        for note in write_super_weights(self.run_dir, self.csv_rows(), self.summary(), figures, tables):
            print(f"note: {note}.", file=sys.stderr)
        if self.tensorboard:
            self._tensorboard()

    # -- results -----------------------------------------------------------------------------------
    def verdicts(self) -> dict[int, tuple[str, PerturbRow]]:
        """Candidate rank -> (verdict, its ablation row)."""
        out = {}
        if not self.rows:
            return out
        baseline = self.rows[0]
        for row in self.rows[1:]:
            significant = row.delta_perplexity_low > 0 and row.p_value is not None and row.p_value < 0.05
            large = row.perplexity >= (1 + self.min_increase) * baseline.perplexity
            verdict = SUPER if significant and large else DAMAGING if significant else ACTIVATION_ONLY
            out[row.rank] = (verdict, row)
        return out

    def csv_rows(self) -> list[dict]:
        verdicts = self.verdicts()
        rows = []
        for row in self.result.to_rows():
            rank = row.get("candidate_rank")
            verdict, ablation = verdicts.get(rank, ("", None)) if rank != "" else ("", None)
            row.update(
                verdict=verdict,
                delta_perplexity="" if ablation is None else ablation.delta_perplexity,
                delta_perplexity_low="" if ablation is None else ablation.delta_perplexity_low,
                delta_perplexity_high="" if ablation is None else ablation.delta_perplexity_high,
                p_value="" if ablation is None or ablation.p_value is None else ablation.p_value,
            )
            rows.append(row)
        return rows

    def summary(self) -> dict:
        from cwa.common.environment import environment, peak_memory

        verdicts = self.verdicts()
        candidates = []
        for c in self.result.candidates:
            verdict, row = verdicts.get(c.rank, ("unverified", None))
            entry = {**asdict(c), "verdict": verdict}
            if row is not None:
                entry["ablation"] = {k: v for k, v in row.as_dict().items() if k.startswith(("delta_", "p_", "perp"))}
            candidates.append(entry)
        published = [
            {**asdict(p), "recovered": c is not None, "candidate_rank": None if c is None else c.rank}
            for p, c in recovered_published(self.result, self.pretrained)
        ]
        return {
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "model": self.pretrained,
            "dtype": self.dtype,
            "settings": self.settings(),
            "blocks": self.result.blocks,
            "tokens": self.result.tokens,
            "layers": len(self.result.layers),
            "candidates": candidates,
            "super_weights": [c for c in candidates if c["verdict"] == SUPER],
            "super_experts": []
            if self.result.experts is None
            else [asdict(e) for e in self.result.experts.super_experts],
            "published": published,
            "row_test": None if self.row_result is None else row_test_summary(self.row_result),
            "heldout": self._heldout(),
            "data": self.data.describe(),
            "notes": self.notes,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "memory": peak_memory(),
            "environment": environment(),
        }

    def _heldout(self) -> dict | None:
        """The held-out baseline every verdict is measured against: its sequences, tokens and perplexity (None
        when nothing was evaluated)."""
        if self.baseline is None:
            return None
        stats = self.baseline.evaluation.stats
        return {
            "sequences": len(stats),
            "tokens": int(stats.tokens.sum()),
            "perplexity": stats.perplexity,
            "nll": stats.mean_nll,
        }

    def settings(self) -> dict:
        return {
            "blocks": self.blocks,
            "threshold": self.threshold,
            "projections": self.projections,
            "verify": self.verify_candidates,
            "max_verify": self.max_verify,
            "min_increase": self.min_increase,
            "heldout_samples": self.heldout_samples,
            "row_test": self.row_test_enabled,
            "row_controls": self.row_controls,
            "row_seed": self.row_seed,
            **vars(self.statistics),
        }

    def print_summary(self) -> None:
        verdicts = self.verdicts()
        result = self.result
        print()
        print(
            f"cwa find-super-weights: {self.pretrained} · {len(result.layers)} MLP output projections · "
            f"{result.blocks} blocks ({fmt.count(result.tokens)} tokens) · threshold {self.threshold:g}x"
        )
        heldout = self._heldout()
        if heldout is not None:
            print(
                f"  held-out baseline: perplexity {fmt.perplexity(heldout['perplexity'])} over "
                f"{fmt.count(heldout['sequences'])} sequences ({fmt.count(heldout['tokens'])} tokens); each verdict "
                f"and interval below is paired over these {fmt.count(heldout['sequences'])} sequences"
            )
        if not result.candidates:
            print("  no layer's input and output spikes both clear the threshold: no candidate.")
        for c in result.candidates:
            verdict, row = verdicts.get(c.rank, ("unverified", None))
            effect = ""
            if row is not None:
                low, high = row.delta_perplexity_low, row.delta_perplexity_high
                effect = f"  Δppl {fmt.interval(row.delta_perplexity, low, high, fmt.effect)}"
            expert = "" if c.expert is None else f" expert {c.expert}"
            print(
                f"  {c.rank:>3}  layer {c.layer:>3}{expert} [{c.row}, {c.col}] w={c.weight:.4g} "
                f"(|w| rank {c.weight_rank})  spikes x{c.input_ratio:.0f} in, x{c.output_ratio:.0f} out"
                f"{effect}  {verdict}"
            )
        for e in [] if result.experts is None else result.experts.super_experts:
            print(f"  super expert: layer {e.layer} expert {e.expert} (largest |output| {e.output_max:.4g})")
        for p, c in recovered_published(result, self.pretrained):
            found = f"recovered (candidate {c.rank})" if c is not None else "not among the candidates"
            print(f"  published ({p.model}) layer {p.layer} [{p.row}, {p.col}]: {found}")
        if self.row_result is not None:
            print_row_test(self.row_result)
        for note in self.notes:
            print(f"  note: {note}")
        print(f"  run directory: {self.run_dir}")

    # -- helpers -----------------------------------------------------------------------------------
    def _evaluate(self, blocks):
        return evaluate(self.model, blocks, self.data.batch_size, self.device)

    def _flat_index(self, candidate: Candidate) -> int:
        weight = dict(self.model.named_parameters())[candidate.parameter]
        flat = 0
        for size, i in zip(weight.shape, candidate.storage_index, strict=True):  # (row, col) or (expert, row, col)
            flat = flat * size + i
        return flat

    @staticmethod
    def _where(candidate: Candidate) -> str:
        expert = "" if candidate.expert is None else f"{candidate.expert},"
        return f"{candidate.parameter}[{expert}{candidate.row},{candidate.col}]"

    def _tensorboard(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(self.run_dir))
        try:
            for record in self.result.layers:
                writer.add_scalar("super_weights/max_abs_input", record.input.value, record.layer)
                writer.add_scalar("super_weights/max_abs_output", record.output.value, record.layer)
                writer.add_scalar("super_weights/input_ratio", _finite(record.input.ratio), record.layer)
                writer.add_scalar("super_weights/output_ratio", _finite(record.output.ratio), record.layer)
        finally:
            writer.close()


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 0.0


def run_find_super_weights(args: list[str]) -> Path | None:
    """``cwa find-super-weights ARGS``: the fit-sensitivity settings (LightningCLI, ``--config`` included)
    plus the ``super_weights`` options; returns the run directory (None for ``-h`` / ``--print_config``)."""
    from jsonargparse import ArgumentError
    from lightning.pytorch.cli import LightningCLI

    from cwa.common.errors import argument_error
    from cwa.fit.data import CalibrationData
    from cwa.fit.distributed import register_strategy_name
    from cwa.fit.module import SensitivityModule
    from cwa.fit.preflight import check_device, check_hub
    from cwa.fit.trainer import TRAINER_DEFAULTS, CwaTrainer

    register_strategy_name()

    class SuperWeightCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.link_arguments("model.pretrained", "data.tokenizer")
            parser.add_class_arguments(FindSuperWeights, "super_weights")

        def before_instantiate_classes(self) -> None:
            smoke.shrink(self.config)
            check_hub(str(self.config.get("model", {}).get("pretrained", "")))  # once, before any process
            trainer = self.config.get("trainer", {})
            check_device(trainer.get("accelerator"), trainer.get("devices"))

    try:
        cli = SuperWeightCLI(
            SensitivityModule,
            CalibrationData,
            trainer_class=CwaTrainer,
            args=args,
            run=False,
            save_config_callback=None,
            seed_everything_default=0,
            trainer_defaults=TRAINER_DEFAULTS,
            auto_configure_optimizers=False,
            parser_kwargs={"exit_on_error": False, "prog": "cwa find-super-weights"},
        )
    except ArgumentError as exc:
        raise argument_error("find-super-weights", exc) from None
    recipe = cli.config_init["super_weights"]
    config_yaml = cli.parser.dump(cli.config, skip_none=False)
    return recipe.run(cli.model, cli.datamodule, cli.trainer, config_yaml)
