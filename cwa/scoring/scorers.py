"""Per-weight sensitivity metrics as small classes over tensors (no Lightning here).

The contract (``docs/design.md``): L is the token-weighted mean next-token NLL over all calibration tokens.

* ``magnitude``: |w|.
* ``grad_x_weight``: |g * w| with g = dL/dw over the whole calibration set.
* ``grad_squared``: mean over micro-batches of g_m ** 2 (empirical Fisher diagonal).
* ``hutchinson_diag``: mean over Rademacher probes v of v * (H v), an unbiased estimate of diag(H)
  (:mod:`cwa.scoring.hutchinson`, with its Hessian-vector products in :mod:`cwa.scoring.hvp`).

The base class and what a metric declares about itself are in :mod:`cwa.scoring.base`; this module
re-exports them (and ``HutchinsonDiag``), so ``cwa.scoring.scorers.Scorer`` and the ``class_path``
``cwa.scorers.HutchinsonDiag`` of older configs keep working.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cwa.common.errors import CwaError
from cwa.scoring.base import Batch, LossFn, Scorer, _local, nonfinite_error
from cwa.scoring.hutchinson import HutchinsonDiag
from cwa.scoring.sizing import Layout, MetricMemory, consumed_gradients, float32_accumulators, gradient_casts

__all__ = [
    "Batch",
    "GradSquared",
    "GradXWeight",
    "HutchinsonDiag",
    "LossFn",
    "Magnitude",
    "Scorer",
    "_local",
    "nonfinite_error",
]


class Magnitude(Scorer):
    """|w|: needs no data (the loss is still measured for the summary)."""

    name = "magnitude"
    description = "|w| (no data)"
    needs_data = False

    def update(self, batch: Batch, loss_fn: LossFn) -> None:
        with torch.no_grad():
            nll, tokens = loss_fn(batch)
        self._count(nll, tokens)

    def compute(self) -> dict[str, Tensor]:
        return {n: _local(p.detach()).abs().float() for n, p in self.params.items()}


class GradXWeight(Scorer):
    """|g * w|, g the gradient of the token-weighted mean loss over the whole calibration set.

    The first-order Taylor estimate of the loss change when w is set to zero.
    """

    name = "grad_x_weight"
    description = "|g·w|, g the gradient of the mean calibration NLL (first-order loss change when w is zeroed)"

    def update(self, batch: Batch, loss_fn: LossFn) -> None:
        nll, tokens = loss_fn(batch)
        self._count(nll, tokens)
        with self._consume_grads(lambda n, g: self.acc[n].add_(g)):
            nll.backward()

    def compute(self) -> dict[str, Tensor]:
        self.check_finite()
        tokens = self.tokens
        # In place: the scores take the accumulators' memory instead of another float32 copy of the model.
        return {n: self.acc[n].div_(tokens).mul_(_local(p.detach())).abs_() for n, p in self.params.items()}


class GradSquared(Scorer):
    """Empirical Fisher diagonal: the mean over micro-batches of the squared micro-batch gradient.

    A micro-batch without a predicted token (all padding) has no loss to take a gradient of: it is not
    counted, so it does not dilute the mean.

    Args:
        fisher_microbatch: sequences per micro-batch; each micro-batch's gradient (of its own mean
            loss) is squared separately. 1 gives the per-sequence empirical Fisher.
    """

    name = "grad_squared"
    description = "mean over micro-batches of g² (empirical Fisher diagonal)"
    turn_taking = True

    def __init__(self, fisher_microbatch: int = 1) -> None:
        super().__init__()
        if fisher_microbatch < 1:
            raise CwaError(f"fisher_microbatch must be at least 1, got {fisher_microbatch}.")
        self.fisher_microbatch = fisher_microbatch

    def settings(self) -> dict:
        return {"fisher_microbatch": self.fisher_microbatch}

    def memory(self, layout: Layout, weight_bytes: int) -> MetricMemory:
        """Each gradient consumed as it is ready, squared in float32 (16-bit gradients are cast first)."""
        gradients = consumed_gradients(layout, weight_bytes)
        return MetricMemory(gradients, float32_accumulators(layout), gradient_casts(layout, weight_bytes))

    def update(self, batch: Batch, loss_fn: LossFn) -> None:
        size = next(iter(batch.values())).shape[0]
        for start in range(0, size, self.fisher_microbatch):
            micro = {k: v[start : start + self.fisher_microbatch] for k, v in batch.items()}
            nll, tokens = loss_fn(micro)
            self._count(nll, tokens, microbatches=int(tokens > 0))
            if tokens == 0 and not self.sharded:
                continue  # nothing to add; sharded ranks still join backward's collectives (zero gradient)
            with self._consume_grads(lambda n, g: self.acc[n].addcmul_(g.float(), g.float())):
                # An idle rank's loss is 0 with 0 tokens: its (zero) gradient must not be 0/0.
                (nll / max(tokens, 1)).backward()

    def compute(self) -> dict[str, Tensor]:
        self.check_finite()
        return {n: self.acc[n].div_(float(self.counters[2])) for n in self.params}
