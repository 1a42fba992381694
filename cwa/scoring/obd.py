"""``obd``: LeCun's Optimal Brain Damage saliency over an existing Hessian-diagonal estimator (no Lightning here).

1/2 * H_ii * w^2 with diag(H) from the empirical Fisher (``grad_squared``) or from Hutchinson
(``hutchinson_diag``), optionally the signed second-order estimate of the loss change -g * w + 1/2 * H_ii * w^2.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from cwa.common.errors import CwaError
from cwa.scoring.base import Batch, LossFn, Scorer, _local
from cwa.scoring.hutchinson import HutchinsonDiag
from cwa.scoring.scorers import GradSquared, GradXWeight
from cwa.scoring.sizing import Layout, MetricMemory, float32_accumulators


class OBD(Scorer):
    """Optimal Brain Damage (LeCun et al. 1990): 1/2 * H_ii * w^2, the loss change of zeroing w to second order.

    diag(H) comes from the existing estimators, which this class drives unchanged: ``fisher`` is
    ``grad_squared`` (the mean over micro-batches of the squared micro-batch gradient), ``hutchinson`` is
    ``hutchinson_diag`` (signed; ``obd`` is then signed too).

    Args:
        hessian: ``fisher`` (empirical Fisher diagonal) or ``hutchinson`` (Hutchinson's unbiased estimate).
        signed_taylor: store -g * w + 1/2 * H_ii * w^2 (g the gradient of the mean loss over the calibration
            set; signed, ranked by |.|) instead of 1/2 * H_ii * w^2. Costs one more forward and backward
            per batch and one more float32 accumulator per weight.
        fisher_microbatch: sequences per micro-batch of the Fisher (``hessian: fisher``).
        probes: Rademacher probes per batch (``hessian: hutchinson``).
        hvp: ``autograd`` or ``finite_difference`` Hessian-vector products (``hessian: hutchinson``).
        fd_eps: relative finite-difference step (``hessian: hutchinson``, ``hvp: finite_difference``).
        seed: probe seed (``hessian: hutchinson``).
    """

    name = "obd"
    description = "½·H_ii·w², diag(H) from the Fisher or Hutchinson (Optimal Brain Damage)"
    turn_taking = True

    def __init__(
        self,
        hessian: Literal["fisher", "hutchinson"] = "fisher",
        signed_taylor: bool = False,
        fisher_microbatch: int = 1,
        probes: int = 1,
        hvp: Literal["autograd", "finite_difference"] = "autograd",
        fd_eps: float = 1e-4,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if hessian == "fisher":
            self.diag: Scorer = GradSquared(fisher_microbatch)
        elif hessian == "hutchinson":
            self.diag = HutchinsonDiag(probes=probes, hvp=hvp, fd_eps=fd_eps, seed=seed)
        else:
            raise CwaError(f"unknown hessian '{hessian}': use fisher or hutchinson.")
        self.hessian, self.signed_taylor = hessian, signed_taylor
        self.grad: GradXWeight | None = GradXWeight() if signed_taylor else None
        self.signed = signed_taylor or hessian == "hutchinson"

    def _parts(self) -> list[Scorer]:
        return [self.diag] + ([self.grad] if self.grad is not None else [])

    @property
    def repeats_passes(self) -> bool:
        return self.diag.repeats_passes

    def settings(self) -> dict:
        return {"hessian": self.hessian, "signed_taylor": self.signed_taylor, **self.diag.settings()}

    def facts(self) -> dict:
        return self.diag.facts()

    def required_attn_implementation(self) -> str | None:
        return self.diag.required_attn_implementation()

    def check_plan(self, dtype: str, sharded: bool) -> None:
        self.diag.check_plan(dtype, sharded)

    def memory(self, layout: Layout, weight_bytes: int) -> MetricMemory:
        """The Hessian estimator's gradients and extras, and a second accumulator with ``signed_taylor``."""
        diag = self.diag.memory(layout, weight_bytes)
        extras = dict(diag.extras)
        if self.signed_taylor:
            extras["second accumulator (signed_taylor gradient)"] = layout.rank_scored * 4
        return MetricMemory(diag.gradients, float32_accumulators(layout), extras)

    def bind(self, params: dict[str, nn.Parameter], sharded: bool = False) -> None:
        self.params = dict(params)
        self.sharded = sharded
        for part in self._parts():
            part.bind(params, sharded)
        self.counters = self.diag.counters  # the loss and token counts are the Hessian estimator's

    def set_step(self, step: int) -> None:
        self.step = step
        for part in self._parts():
            part.set_step(step)

    def update(self, batch: Batch, loss_fn: LossFn) -> None:
        for part in self._parts():
            part.update(batch, loss_fn)

    def take_part(self, batch: Batch, loss_fn: LossFn) -> None:
        for part in self._parts():
            part.take_part(batch, loss_fn)

    def receive_counters(self, counters: Tensor) -> None:
        for part in self._parts():
            part.receive_counters(counters)

    def reduce(self, all_reduce) -> None:
        for part in self._parts():
            part.reduce(all_reduce)

    def nonfinite(self) -> list[str]:
        return [name for part in self._parts() for name in part.nonfinite()]

    def state_dict(self) -> dict:
        return {"diag": self.diag.state_dict(), "grad": self.grad.state_dict() if self.grad is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.diag.load_state_dict(state["diag"])
        if self.grad is not None:
            self.grad.load_state_dict(state["grad"])

    def compute(self) -> dict[str, Tensor]:
        self.check_finite()
        gradient = None
        if self.grad is not None:
            tokens = self.grad.tokens
            gradient = {n: self.grad.acc[n].div_(tokens) for n in self.params}
        diagonal = self.diag.compute()
        scores = {}
        for name, param in self.params.items():
            w = _local(param.detach()).float()
            score = diagonal[name].mul_(w).mul_(w).mul_(0.5)
            if gradient is not None:
                score.sub_(gradient[name] * w)
            scores[name] = score
        return scores
