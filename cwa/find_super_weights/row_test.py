"""The census-comparable row test of ``cwa find-super-weights`` (``--super_weights.row_test true``).

Zeroes the strongest candidate's whole down-projection output row, then each of a few seeded random rows of
the same tensor, one at a time through perturb's machinery (restored and verified bit for bit), and turns the
held-out passes into R and G (:mod:`cwa.ablation.row_test`).
"""

from __future__ import annotations

import torch

from cwa.ablation.perturbations import ChecksumCache, Zero, perturbed
from cwa.ablation.row_test import RowTest, control_rows, gap, row_effect, row_indices
from cwa.ablation.stats import bootstrap_weights
from cwa.ablation.super_weights import Candidate
from cwa.common import format as fmt

CENSUS = (
    'the published census ("Structure is not mechanism", Georgakopoulos-Soares lab): '
    "SmolLM2-135M base, layer 11, row 507, R ≈ 3.13"
)


def _layout(model: torch.nn.Module, candidate: Candidate, weight: torch.Tensor) -> tuple[int, int]:
    """(output-channel dimension, input-channel dimension) of the candidate's weight tensor."""
    if weight.dim() == 3:  # packed experts: (expert, out, in)
        return 1, 2
    module = model.get_submodule(candidate.parameter.rsplit(".", 1)[0])
    return (1, 0) if type(module).__name__ == "Conv1D" else (0, 1)


def run_row_test(recipe, candidate: Candidate) -> RowTest:
    """Ablate ``candidate``'s row and ``recipe.row_controls`` random rows, each alone, on ``recipe``'s held-out
    blocks against ``recipe.baseline``; percentile intervals over ``recipe.statistics.bootstrap`` resamples."""
    weight = dict(recipe.model.named_parameters())[candidate.parameter].data
    row_dim, col_dim = _layout(recipe.model, candidate, weight)
    rows = weight.shape[row_dim]
    controls = control_rows(rows, candidate.row, min(recipe.row_controls, rows - 1), recipe.row_seed)
    if len(controls) < recipe.row_controls:
        recipe.notes.append(f"the tensor has {rows} rows: the row test used {len(controls)} controls.")
    params = {candidate.parameter: weight}
    checksums = ChecksumCache(params)
    base = recipe.baseline.evaluation.stats
    weights = bootstrap_weights(len(base), recipe.statistics.bootstrap, seed=0)
    confidence = recipe.statistics.confidence
    effects, samples = [], []
    for role, row in [("candidate", candidate.row)] + [("control", r) for r in controls]:
        index = row_indices(tuple(weight.shape), candidate.storage_index, row_dim, col_dim, row)
        with perturbed(params, {candidate.parameter: index}, Zero(), None, checksums):
            ablated = recipe._evaluate(recipe.data.heldout).stats
        effect, replicates = row_effect(role, row, base, ablated, weights, confidence)
        effects.append(effect)
        samples.append(torch.cat([torch.tensor([effect.r], dtype=replicates.dtype), replicates]))
    g, g_low, g_high = gap(samples[0], samples[1:], confidence)
    return RowTest(
        parameter=candidate.parameter,
        layer=candidate.layer,
        expert=candidate.expert,
        base_nll=base.mean_nll,
        candidate=effects[0],
        controls=effects[1:],
        g=g,
        g_low=g_low,
        g_high=g_high,
        seed=recipe.row_seed,
        confidence=confidence,
        resamples=recipe.statistics.bootstrap,
    )


def summary(test: RowTest) -> dict:
    """The row test's entry in ``summary.json``."""
    return {
        "parameter": test.parameter,
        "layer": test.layer,
        "expert": test.expert,
        "row": test.candidate.row,
        "base_nll": test.base_nll,
        "candidate": vars(test.candidate),
        "controls": [vars(c) for c in test.controls],
        "g": {"value": test.g, "low": test.g_low, "high": test.g_high},
        "seed": test.seed,
        "interval": f"{test.confidence:g} percentile, {test.resamples} resamples of held-out sequences",
        "compare_with": CENSUS,
    }


def print_row_test(test: RowTest) -> None:
    """The row test on the console: R of the candidate's row and of each control, and G."""
    expert = "" if test.expert is None else f" expert {test.expert}"
    print(f"  row test: layer {test.layer}{expert} row {test.candidate.row}, base NLL {fmt.number(test.base_nll)}")
    for e in [test.candidate, *test.controls]:
        print(f"    {e.role:<9} row {e.row:>6}  R {fmt.interval(e.r, e.r_low, e.r_high)}")
    print(f"    G = R - median control R: {fmt.interval(test.g, test.g_low, test.g_high, fmt.effect)}")
