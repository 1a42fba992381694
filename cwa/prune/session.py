"""What ``cwa prune`` and ``cwa protect`` share: a run's model and held-out blocks loaded once, one held-out
pass per condition with the stress applied in place and restored (checksummed), and the paired statistics
of each pass against the unchanged model.

The model and data come from the run's ``config.yaml`` exactly as ``cwa perturb`` takes them (the held-out
split, the pass and the statistics are perturb's own: :func:`cwa.perturb.evaluate.evaluate`,
:func:`cwa.ablation.stats.bootstrap_deltas`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from cwa.ablation.interventions import Applied, Stress, StressContext, intervened
from cwa.ablation.perturbations import ChecksumCache
from cwa.ablation.stats import (
    METRICS,
    SequenceStats,
    bootstrap_deltas,
    bootstrap_weights,
    exp_or_inf,
    mean_over_seeds,
    paired_bootstrap_test,
)
from cwa.common.errors import CwaError
from cwa.perturb.evaluate import Evaluation, StatisticsOptions, evaluate
from cwa.rundir import Run

TensorChoice = Literal["linear", "scored"]


@dataclass
class Pass:
    """One held-out pass under a condition: its evaluation, what the stress changed, what it cost."""

    evaluation: Evaluation
    applied: Applied = field(default_factory=Applied)
    apply_restore_s: float = 0.0


class HeldOutSession:
    """A run's model (loaded once, never copied) and held-out blocks; evaluates stresses in place.

    Args:
        run: the fit-sensitivity run whose model, data and held-out split are used.
        heldout_samples: at most this many held-out blocks (None: the run's setting).
        heldout_tokens: only the first this many tokens of each block (None: whole blocks).
        batch_size: blocks per forward pass (None: the run's setting).
        device: ``auto``, ``cpu``, ``cuda``...
        trust_remote_code: let the model's own code run (from the command only).
        verify: checksum every edited tensor after each restore.
    """

    def __init__(
        self,
        run: Run,
        heldout_samples: int | None,
        heldout_tokens: int | None,
        batch_size: int | None,
        device: str,
        trust_remote_code: bool,
        verify: bool,
    ) -> None:
        if heldout_samples is not None and heldout_samples < 1:
            raise CwaError("the held-out split is empty (heldout_samples < 1); evaluate at least one block.")
        if heldout_tokens is not None and heldout_tokens < 2:
            raise CwaError(f"heldout_tokens must be at least 2, got {heldout_tokens}.")
        self.run, self.verify = run, verify
        self.heldout_samples, self.heldout_tokens, self.batch_size = heldout_samples, heldout_tokens, batch_size
        self.device_name, self.trust_remote_code = device, trust_remote_code
        self.timings: dict[str, float] = {}

    def load(self) -> None:
        """The model (in the run's dtype) and the held-out blocks."""
        from cwa.model.loading import load_model
        from cwa.model.params import select_parameters
        from cwa.perturb.run_data import build_data

        start = time.perf_counter()
        settings = dict(self.run.config.get("model") or {})
        self.dtype = self.run.summary.dtype or settings.get("dtype") or "float32"
        model = load_model(
            settings.get("pretrained") or self.run.model,
            self.dtype,
            attn_implementation=settings.get("attn_implementation"),
            trust_remote_code=self.trust_remote_code,
            revision=settings.get("revision"),
        )
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(auto if self.device_name == "auto" else self.device_name)
        self.model = model.to(self.device).requires_grad_(False)
        self.named = {n: p.data for n, p in self.model.named_parameters()}
        self.infos = {n: info for n, (_, info) in select_parameters(self.model).items()}
        self.modules = dict(self.model.named_modules())
        self.timings["load_model_s"] = time.perf_counter() - start
        start = time.perf_counter()
        self.data = build_data(self.run, self.heldout_samples, self.batch_size)
        blocks = self.data.heldout
        if blocks is None or blocks.shape[0] == 0:
            raise CwaError("the held-out split is empty; raise heldout_fraction or use a longer corpus.")
        self.blocks = blocks if self.heldout_tokens is None else blocks[:, : self.heldout_tokens].contiguous()
        self.timings["data_s"] = time.perf_counter() - start
        self.checksums = None

    def tensors(self, names: list[str], choice: TensorChoice) -> dict[str, torch.Tensor]:
        """The tensors a stress touches: of ``names`` (the run's scored tensors), every one (``scored``) or
        only the weights of Linear / Conv1D layers inside the numbered blocks (``linear``: what Wanda and
        SparseGPT prune; embeddings, the LM head, norms and biases stay)."""
        missing = [n for n in names if n not in self.named]
        if missing:
            raise CwaError(f"the run scored '{missing[0]}', which this model does not have.")
        if choice == "scored":
            chosen = list(names)
        elif choice == "linear":
            chosen = [n for n in names if self._is_block_linear(n)]
        else:
            raise CwaError(f"unknown tensor choice '{choice}': use linear or scored.")
        if not chosen:
            raise CwaError(f"the run scored no {choice} weight tensor; rerun fit-sensitivity with those tensors.")
        self.checksums = ChecksumCache({n: self.named[n] for n in chosen}) if self.verify else None
        return {n: self.named[n] for n in chosen}

    def _is_block_linear(self, name: str) -> bool:
        module_name, _, attribute = name.rpartition(".")
        module = self.modules.get(module_name)
        is_linear = isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"
        info = self.infos.get(name)
        return attribute == "weight" and is_linear and info is not None and info.layer is not None

    def transposed(self, names: list[str]) -> dict[str, bool]:
        return {n: bool(self.infos[n].transposed) if n in self.infos else False for n in names}

    def evaluate(self, stress: Stress | None = None, context: StressContext | None = None) -> Pass:
        """One held-out pass, with ``stress`` applied in place for its duration (None: the unchanged model)."""
        batch_size = self.batch_size or int(self.run.data.get("batch_size") or 4)
        if stress is None:
            return Pass(evaluate(self.model, self.blocks, batch_size, self.device))
        start = time.perf_counter()
        with self.intervened(stress, context) as applied:
            evaluation = evaluate(self.model, self.blocks, batch_size, self.device)
        return Pass(evaluation, applied, time.perf_counter() - start - evaluation.seconds)

    def intervened(self, stress: Stress, context: StressContext):
        """``stress`` applied in place for the duration of a ``with`` block, restored bit for bit (and
        checksummed) on exit: what the held-out pass runs under, for other evaluations (lm-eval tasks)."""
        return intervened(stress, context, self.checksums)

    def heldout_meta(self) -> dict:
        return {
            "sequences": int(self.blocks.shape[0]),
            "seq_len": int(self.blocks.shape[1]),
            "fingerprint": self.data.fingerprint("heldout"),
        }


def quality(
    base: SequenceStats, stats: SequenceStats, weights: tuple[torch.Tensor, torch.Tensor], options: StatisticsOptions
) -> dict[str, float | None]:
    """The quality columns of a row: the pass's perplexity, NLL and accuracy, each change from ``base`` with
    its paired studentized bootstrap interval over sequences, and the paired test against ``base``. A pass
    with a non-finite sequence has NaN changes and no test."""
    out: dict[str, float | None] = {
        "perplexity": stats.perplexity,
        "nll": stats.mean_nll,
        "accuracy": stats.accuracy,
    }
    broken = stats.broken_fraction > 0 or base.broken_fraction > 0
    nan = (math.nan, math.nan, math.nan)
    deltas = {m: nan for m in METRICS} if broken else bootstrap_deltas(base, stats, weights[0], options.confidence)
    for metric in METRICS:
        for suffix, value in zip(("", "_low", "_high"), deltas[metric], strict=True):
            out[f"delta_{metric}{suffix}"] = value
    out["p_value"] = None if broken or stats is base else paired_bootstrap_test(base, stats, weights[1])
    out["broken_fraction"] = stats.broken_fraction
    return out


def resamples(n_sequences: int, options: StatisticsOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """One set of bootstrap multiplicities for the intervals and one for the tests, shared by every row."""
    options.check_sample(n_sequences)
    return bootstrap_weights(n_sequences, options.bootstrap, seed=0), bootstrap_weights(
        n_sequences, options.permutations, seed=1
    )


def over_seeds(rows: list[dict[str, float | None]], confidence: float) -> dict[str, float | None]:
    """The mean of several seeds' quality columns, each change with a Student-t interval over the seeds.

    The mean is taken where the statistics are additive and the intervals stay in range: on the NLL scale (the
    perplexity is exp of the mean NLL, and its change and interval are the Δ NLL's mapped back through the
    unchanged model's perplexity, so they never fall below −baseline), and for accuracy on the accuracy scale with
    the interval clipped to what an accuracy can reach."""
    out: dict[str, float | None] = {}

    def column(key: str) -> torch.Tensor:
        return torch.tensor([float(r[key]) for r in rows], dtype=torch.float64)

    finite = [r for r in rows if math.isfinite(float(r["nll"]) - float(r["delta_nll"]))]
    reference = finite[0] if finite else rows[0]  # every row knows the unchanged model: nll − Δ nll
    base_nll = float(reference["nll"]) - float(reference["delta_nll"])
    base_accuracy = float(reference["accuracy"]) - float(reference["delta_accuracy"])
    out["delta_nll"], out["delta_nll_low"], out["delta_nll_high"] = mean_over_seeds(column("delta_nll"), confidence)
    out["nll"] = base_nll + out["delta_nll"]
    out["perplexity"] = exp_or_inf(out["nll"])
    for suffix in ("", "_low", "_high"):
        out[f"delta_perplexity{suffix}"] = exp_or_inf(base_nll + out[f"delta_nll{suffix}"]) - exp_or_inf(base_nll)
    out["accuracy"] = float(column("accuracy").mean())
    delta, low, high = mean_over_seeds(column("delta_accuracy"), confidence)
    out["delta_accuracy"] = delta
    out["delta_accuracy_low"] = max(low, -base_accuracy) if math.isfinite(low) else low
    out["delta_accuracy_high"] = min(high, 1.0 - base_accuracy) if math.isfinite(high) else high
    out["p_value"] = None
    out["broken_fraction"] = max(float(r["broken_fraction"] or 0.0) for r in rows)
    return out
