"""Held-out evaluation of ``cwa perturb``: one forward pass per condition, and the statistics that turn
each condition's per-sequence results into a :class:`~cwa.rundir.PerturbRow` against the baseline."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from cwa.controls import Control
from cwa.errors import CwaError
from cwa.perturbations import Perturbation
from cwa.rundir import PerturbRow
from cwa.stats import SequenceStats, bootstrap_deltas, bootstrap_weights, paired_sign_flip_test


@dataclass
class Evaluation:
    stats: SequenceStats
    perplexity: float  # torchmetrics
    seconds: float


@torch.inference_mode()
def evaluate(model: torch.nn.Module, blocks: Tensor, batch_size: int, device: torch.device) -> Evaluation:
    """One forward pass over ``blocks``: per-sequence NLL sums, token counts, correct predictions, and
    the torchmetrics perplexity of the whole pass.

    Args:
        model: a causal language model (its ``logits`` are read).
        blocks: (sequences, tokens) token ids.
        batch_size: sequences per forward pass.
        device: where the model is.
    """
    from torchmetrics.text import Perplexity

    start = time.perf_counter()
    metric = Perplexity().to(device)
    nll, tokens, correct = [], [], []
    for first in range(0, blocks.shape[0], batch_size):
        input_ids = blocks[first : first + batch_size].to(device)
        logits = model(input_ids=input_ids).logits[:, :-1].float()
        labels = input_ids[:, 1:]
        token_nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
        nll.append(token_nll.view(labels.shape).double().sum(1).cpu())
        tokens.append(torch.full((labels.shape[0],), labels.shape[1], dtype=torch.float64))
        correct.append((logits.argmax(-1) == labels).sum(1).double().cpu())
        metric.update(logits, labels)
    stats = SequenceStats(torch.cat(nll), torch.cat(tokens), torch.cat(correct))
    return Evaluation(stats, float(metric.compute()), time.perf_counter() - start)


# -- conditions and their results ------------------------------------------------------------------
@dataclass
class Condition:
    """One perturbed set of weights: the top-K prefix, a control of the same K, or one top weight alone."""

    perturbation: Perturbation
    target: str  # "topk", "single" or a control's name
    k: int | None = None
    rank: int | None = None
    seed: int | None = None
    control: Control | None = field(default=None, repr=False)  # draws a control target's weights

    @property
    def name(self) -> str:
        parts = [self.perturbation.name, self.target]
        if self.rank is not None:
            parts.append(f"rank={self.rank}")
        elif self.k is not None:
            parts.append(f"k={self.k}")
        if self.seed is not None:
            parts.append(f"seed={self.seed}")
        return "/".join(parts)

    @property
    def is_control(self) -> bool:
        return self.target not in ("topk", "single")


@dataclass
class Result:
    condition: Condition | None  # None: the baseline
    evaluation: Evaluation
    n_weights: int
    apply_restore_s: float = 0.0
    select_s: float = 0.0
    where: str = ""


# -- statistics ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StatisticsOptions:
    """How each condition is compared with the baseline (and each control with its top-K set).

    Args:
        bootstrap: bootstrap resamples (over held-out sequences) for the confidence intervals.
        permutations: random sign patterns of the paired test (exact enumeration up to 16 sequences).
        confidence: coverage of the confidence intervals.
    """

    bootstrap: int = 2000
    permutations: int = 10000
    confidence: float = 0.95

    def __post_init__(self) -> None:
        if not 0 < self.confidence < 1:
            raise CwaError(f"confidence must be between 0 and 1, got {self.confidence}.")
        if self.bootstrap < 1 or self.permutations < 1:
            raise CwaError("bootstrap and permutations must be at least 1.")


def perturb_rows(baseline: Result, results: list[Result], options: StatisticsOptions) -> list[PerturbRow]:
    """The rows of perturb.csv: the baseline, then every condition in the order evaluated. A control is
    tested against the top-K set of the same perturbation and K; top-K and single weights against the
    baseline. All conditions share one set of bootstrap resamples (paired intervals)."""
    weights = bootstrap_weights(len(baseline.evaluation.stats), options.bootstrap, seed=0)
    topk = {(r.condition.perturbation, r.condition.k): r for r in results if r.condition.target == "topk"}
    rows = [_row(baseline, baseline, weights, options, None)]
    for result in results:
        cond = result.condition
        reference = topk.get((cond.perturbation, cond.k)) if cond.is_control else None
        rows.append(_row(result, baseline, weights, options, reference))
    return rows


def _row(
    result: Result, baseline: Result, weights: Tensor, options: StatisticsOptions, reference: Result | None
) -> PerturbRow:
    cond, stats, base = result.condition, result.evaluation.stats, baseline.evaluation.stats
    deltas = bootstrap_deltas(base, stats, weights, options.confidence)
    if cond is None:
        p_value, vs = None, ""
    elif not cond.is_control:
        p_value, vs = paired_sign_flip_test(stats, base, options.permutations), "baseline"
    elif reference is not None:
        p_value, vs = paired_sign_flip_test(reference.evaluation.stats, stats, options.permutations), "topk"
    else:
        p_value, vs = None, ""
    return PerturbRow(
        condition="baseline" if cond is None else cond.name,
        perturbation="" if cond is None else cond.perturbation.name,
        target="baseline" if cond is None else cond.target,
        k=None if cond is None else cond.k,
        rank=None if cond is None else cond.rank,
        seed=None if cond is None else cond.seed,
        n_weights=result.n_weights,
        perplexity=result.evaluation.perplexity,
        nll=stats.mean_nll,
        accuracy=stats.accuracy,
        **{
            f"delta_{metric}{suffix}": value
            for metric in ("perplexity", "nll", "accuracy")
            for suffix, value in zip(("", "_low", "_high"), deltas[metric], strict=True)
        },
        p_value=p_value,
        p_value_vs=vs,
    )
