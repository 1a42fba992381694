"""Held-out evaluation of ``cwa perturb``: one forward pass per condition, and the statistics that turn
each condition's per-sequence results into a :class:`~cwa.rundir.PerturbRow` against the baseline."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from cwa.ablation.controls import Control
from cwa.ablation.perturbations import Perturbation
from cwa.ablation.stats import (
    METRICS,
    SequenceStats,
    bootstrap_deltas,
    bootstrap_weights,
    minimum_sequences,
    paired_bootstrap_test,
)
from cwa.common.errors import CwaError
from cwa.rundir import ConditionKind, PerturbRow


@dataclass
class Evaluation:
    stats: SequenceStats
    perplexity: float  # torchmetrics
    seconds: float


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module,
    blocks: Tensor,
    batch_size: int,
    device: torch.device,
    before_batch: Callable[[int], None] | None = None,
) -> Evaluation:
    """One forward pass over ``blocks``: per-sequence NLL sums, token counts, correct predictions, and
    the torchmetrics perplexity of the whole pass.

    Args:
        model: a causal language model (its ``logits`` are read).
        blocks: (sequences, tokens) token ids.
        batch_size: sequences per forward pass.
        device: where the model is.
        before_batch: called with the batch's number (0, 1, ...) before each forward pass (the batches
            always come in the same order: activation restore records and replays by batch).
    """
    from torchmetrics.text import Perplexity

    start = time.perf_counter()
    metric = Perplexity().to(device)
    nll, tokens, correct = [], [], []
    for batch, first in enumerate(range(0, blocks.shape[0], batch_size)):
        if before_batch is not None:
            before_batch(batch)
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
    """One perturbed set (``kind``): the top-K prefix, a control of the same K (``control`` draws it), one top
    weight alone, the top-K set without its member of rank ``rank`` (``leave_one_out``) or two top weights
    together (``pair``, ``ranks``); each at its ``unit`` (the weights themselves, or every weight of their output
    rows or input columns)."""

    perturbation: Perturbation
    kind: ConditionKind
    k: int | None = None
    rank: int | None = None  # single: the weight's rank; leave_one_out: the member left out
    seed: int | None = None
    control: Control | None = field(default=None, repr=False)  # draws a control target's weights
    unit: str = "weight"
    ranks: tuple[int, ...] | None = None  # pair: the ranks perturbed together
    restore: str = ""  # activation restore mode of a restored twin (cwa.ablation.restore), "" for none

    def __post_init__(self) -> None:
        self.kind = ConditionKind(self.kind)  # its value ("topk") names it too
        if (self.kind is ConditionKind.CONTROL) != (self.control is not None):
            raise ValueError("a control condition, and only a control condition, has a control.")

    @property
    def target(self) -> str:
        """The ``target`` cell of perturb.csv: the kind's value, or the control's name."""
        return self.control.name if self.control is not None else self.kind.value

    @property
    def name(self) -> str:
        parts = [self.perturbation.name, self.target]
        if self.ranks is not None:
            parts.append("ranks=" + "+".join(map(str, self.ranks)))
        elif self.kind is ConditionKind.LEAVE_ONE_OUT:
            parts += [f"k={self.k}", f"without={self.rank}"]
        elif self.rank is not None:
            parts.append(f"rank={self.rank}")
        elif self.k is not None:
            parts.append(f"k={self.k}")
        if self.seed is not None:
            parts.append(f"seed={self.seed}")
        if self.unit != "weight":
            parts.append(f"unit={self.unit}")
        if self.restore:
            parts.append(f"restore={self.restore}")
        return "/".join(parts)

    @property
    def is_control(self) -> bool:
        return self.kind is ConditionKind.CONTROL


@dataclass
class Result:
    condition: Condition | None  # None: the baseline
    evaluation: Evaluation
    n_weights: int
    apply_restore_s: float = 0.0
    select_s: float = 0.0
    where: str = ""
    restored_tokens: int | None = None  # (token, channel) activations written back by activation restore


# -- statistics ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StatisticsOptions:
    """How each condition is compared with the baseline (and each control with its top-K set).

    Args:
        bootstrap: bootstrap resamples (over held-out sequences) for the studentized confidence intervals.
        permutations: bootstrap resamples of the paired bootstrap-t test (the smallest p-value it can give
            is 2 / (1 + permutations)).
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

    def check_sample(self, sequences: int) -> None:
        """Refuse, in one sentence, a held-out sample too small to reach the stated confidence."""
        needed = minimum_sequences(self.confidence)
        if sequences < needed:
            raise CwaError(
                f"{sequences} held-out sequence{'s' if sequences != 1 else ''} cannot reach {self.confidence:g} "
                f"confidence (n paired sequences give p of at least 2^(1-n)); evaluate at least {needed} "
                "(raise heldout_samples or data.heldout_fraction)."
            )


def perturb_rows(baseline: Result, results: list[Result], options: StatisticsOptions) -> list[PerturbRow]:
    """The rows of perturb.csv: the baseline, then every condition in the order evaluated. A control, and
    a leave-one-out set, is tested against the top-K set of the same perturbation, K and unit (the joint
    set); top-K, single weights and pairs against the baseline. All conditions share one set of bootstrap
    resamples for the intervals and one for the tests (paired statistics, comparable across conditions)."""
    n = len(baseline.evaluation.stats)
    options.check_sample(n)
    weights = bootstrap_weights(n, options.bootstrap, seed=0), bootstrap_weights(n, options.permutations, seed=1)
    topk = {
        _joint_key(r.condition): r
        for r in results
        if r.condition.kind is ConditionKind.TOPK and not r.condition.restore
    }
    unrestored = {r.condition.name: r for r in results if not r.condition.restore}
    rows = [_row(baseline, baseline, weights, options, None)]
    for result in results:
        cond = result.condition
        against_joint = cond.is_control or cond.kind is ConditionKind.LEAVE_ONE_OUT
        reference = topk.get(_joint_key(cond)) if against_joint else None
        row = _row(result, baseline, weights, options, reference)
        if cond.restore:
            perturbed = unrestored[replace(cond, restore="").name]
            row = _restored_row(row, result, perturbed, baseline, weights, options)
        rows.append(row)
    return rows


def _joint_key(condition: Condition) -> tuple[Perturbation, int | None, str]:
    return condition.perturbation, condition.k, condition.unit


def _restored_row(
    row: PerturbRow,
    result: Result,
    perturbed: Result,
    baseline: Result,
    weights: tuple[Tensor, Tensor],
    options: StatisticsOptions,
) -> PerturbRow:
    """A restored twin's row: its p-value tests it against the perturbed pass (not the baseline), and it
    carries the recovered fraction of the damage with its interval (cwa.ablation.restore.recovered_fraction)."""
    from cwa.ablation.restore import recovered_fraction

    base, hurt, mended = (r.evaluation.stats for r in (baseline, perturbed, result))
    testable = not any(s.broken_fraction > 0 for s in (hurt, mended))
    damage = bootstrap_deltas(base, hurt, weights[0], options.confidence)["nll"] if testable else None
    fraction, low, high = recovered_fraction(
        base, hurt, mended, weights[0], options.confidence, None if damage is None else damage[1:]
    )
    return replace(
        row,
        p_value=paired_bootstrap_test(hurt, mended, weights[1]) if testable else None,
        p_value_vs=perturbed.condition.name,
        restore=result.condition.restore,
        recovered_fraction=fraction,
        recovered_fraction_low=low,
        recovered_fraction_high=high,
        restored_tokens=result.restored_tokens,
    )


def _row(
    result: Result,
    baseline: Result,
    weights: tuple[Tensor, Tensor],
    options: StatisticsOptions,
    reference: Result | None,
) -> PerturbRow:
    """A condition's row. A pass with any non-finite sequence NLL (a bit flip to inf or NaN) has no mean
    change and no test: its ``delta_*`` are NaN, its p-value empty, and ``broken_fraction`` says on how
    many sequences the model broke."""
    cond, stats, base = result.condition, result.evaluation.stats, baseline.evaluation.stats
    interval_weights, test_weights = weights
    if stats.broken_fraction > 0 or base.broken_fraction > 0:
        deltas = {metric: (math.nan, math.nan, math.nan) for metric in METRICS}
    else:
        deltas = bootstrap_deltas(base, stats, interval_weights, options.confidence)
    if cond is None:
        pair, vs = None, ""
    elif not cond.is_control and cond.kind is not ConditionKind.LEAVE_ONE_OUT:
        pair, vs = (stats, base), ConditionKind.BASELINE.value
    elif reference is not None:
        pair, vs = (reference.evaluation.stats, stats), ConditionKind.TOPK.value
    else:
        pair, vs = None, ""
    testable = pair is not None and not any(s.broken_fraction > 0 for s in pair)
    p_value = paired_bootstrap_test(*pair, test_weights) if testable else None
    return PerturbRow(
        condition=ConditionKind.BASELINE.value if cond is None else cond.name,
        perturbation="" if cond is None else cond.perturbation.name,
        target=ConditionKind.BASELINE.value if cond is None else cond.target,
        k=None if cond is None else cond.k,
        rank=None if cond is None else cond.rank,
        seed=None if cond is None else cond.seed,
        n_weights=result.n_weights,
        perplexity=result.evaluation.perplexity,
        nll=stats.mean_nll,
        accuracy=stats.accuracy,
        **{
            f"delta_{metric}{suffix}": value
            for metric in METRICS
            for suffix, value in zip(("", "_low", "_high"), deltas[metric], strict=True)
        },
        p_value=p_value,
        p_value_vs=vs,
        broken_fraction=stats.broken_fraction,
        unit="weight" if cond is None else cond.unit,
        ranks="" if cond is None or cond.ranks is None else "+".join(map(str, cond.ranks)),
    )
