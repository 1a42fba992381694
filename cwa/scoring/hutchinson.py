"""``hutchinson_diag``: Hutchinson's unbiased estimate of the Hessian diagonal (no Lightning here).

The estimator draws the probes and keeps the accounting; how each probe's Hessian-vector product is obtained
is a strategy of :mod:`cwa.scoring.hvp`, chosen by the ``hvp`` and ``fd_scheme`` options.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from cwa.common.errors import CwaError
from cwa.model.sharding import is_dtensor, local_slice
from cwa.scoring.base import Batch, LossFn, Scorer, _local
from cwa.scoring.hvp import FiniteDifference, HessianVectorProducts, make_hvp
from cwa.scoring.sizing import Layout, MetricMemory, float32_accumulators


class HutchinsonDiag(Scorer):
    """Hutchinson estimate of the Hessian diagonal, E_v[v * (H v)] with Rademacher v.

    Stored signed; ranked by absolute value. Each (batch, probe) pair contributes
    v * (H_b v) with H_b the Hessian of the batch's summed NLL; dividing by the total token count
    and the probe count gives an unbiased estimate of diag of the Hessian of L. Finite differences divide by
    the step float32 actually applied to each weight; weights the step cannot move score 0 and are counted
    per tensor in the run's facts (``fd_zero_steps``; see :mod:`cwa.scoring.hvp`).

    Args:
        probes: Rademacher probes per batch. The estimate's standard error per weight falls as
            1/sqrt(probes x batches).
        hvp: ``autograd`` (double backward; several probes share one forward and one backward;
            switches attention to ``eager``) or ``finite_difference`` (differences of gradients; any
            attention kernel, sharded parameters; needs float32).
        fd_eps: relative finite-difference step: eps = fd_eps * ||w|| / ||v|| over the scored tensors.
        seed: seed of the probe generator; batch b draws its probes from seed and b, so results do not
            depend on how batches are split over processes.
        fd_scheme: ``forward``: one unperturbed gradient per batch, shared by the probes, and one gradient
            at w + eps v per probe, so probes + 1 gradients per batch; the unperturbed gradient is held
            during the batch (one float32 copy of the scored gradients beside the accumulators).
            ``central``: gradients at w + eps v and w - eps v, two per probe, no held gradient. Its
            truncation error is O(eps^2); the forward scheme's O(eps) term is odd in v and averages out
            over probes, so both are unbiased to second order.
    """

    name = "hutchinson_diag"
    description = "Hutchinson estimate of the Hessian diagonal (signed; ranked by |·|)"
    signed = True
    turn_taking = True

    def __init__(
        self,
        probes: int = 1,
        hvp: Literal["autograd", "finite_difference"] = "autograd",
        fd_eps: float = 1e-4,
        seed: int = 0,
        fd_scheme: Literal["forward", "central"] = "forward",
    ) -> None:
        super().__init__()
        if probes < 1:
            raise CwaError(f"probes must be at least 1, got {probes}.")
        self.strategy: HessianVectorProducts = make_hvp(hvp, fd_scheme, probes, fd_eps)
        self.probes, self.hvp, self.fd_eps, self.seed, self.fd_scheme = probes, hvp, fd_eps, seed, fd_scheme
        self.generator: torch.Generator | None = None

    @property
    def zero_steps(self) -> dict[str, int]:
        """Weights per tensor (all ranks) whose finite-difference step rounds to 0: they score 0."""
        return self.strategy.zero_steps if isinstance(self.strategy, FiniteDifference) else {}

    def settings(self) -> dict:
        base = {"probes": self.probes, "hvp": self.hvp, "fd_eps": self.fd_eps, "seed": self.seed}
        return {**base, **self.strategy.settings()}

    def facts(self) -> dict:
        return self.strategy.facts()

    def required_attn_implementation(self) -> str | None:
        return self.strategy.attn_implementation

    @property
    def repeats_passes(self) -> bool:
        return self.strategy.repeats_passes

    def check_plan(self, dtype: str, sharded: bool) -> None:
        self.strategy.check_plan(dtype, sharded)

    def memory(self, layout: Layout, weight_bytes: int) -> MetricMemory:
        """The strategy's gradients and extras beside one float32 accumulator per scored weight."""
        gradients, extras = self.strategy.memory(layout, weight_bytes)
        return MetricMemory(gradients, float32_accumulators(layout), extras)

    def bind(self, params: dict[str, nn.Parameter], sharded: bool = False) -> None:
        super().bind(params, sharded)
        self.generator = torch.Generator(device=next(iter(params.values())).device)
        self.strategy.bind(self.params, sharded, self.probe)

    def probe(self, like: Tensor, out: Tensor | None = None) -> Tensor:
        """A float32 Rademacher probe for ``like`` (written into ``out`` when given); for a shard, its rows
        of the whole tensor's probe, so that every process count draws the same v.

        One random byte gives eight signs (drawing one random number per weight is the slowest part of a
        probe on a CPU), and each sign is written straight into the float32 sign bit: two passes, where
        unpacking bytes and converting them to floats takes five."""
        device = _local(like).device
        n = like.numel()
        words = torch.zeros((n + 31) // 32, dtype=torch.int32, device=device)
        octets = words.view(torch.uint8)  # little-endian: bit k of word j is sign 32 j + k
        octets[: (n + 7) // 8].random_(0, 256, generator=self.generator)
        octets.bitwise_not_()  # a set bit is +1, and +1.0 has its sign bit clear
        direct = out is not None and not is_dtensor(like) and n % 32 == 0
        whole = out.view(-1) if direct else torch.empty(words.numel() * 32, dtype=torch.float32, device=device)
        # Bit k of each word to the sign bit (the other bits are left over), then 1.0 with that sign.
        torch.bitwise_left_shift(words.unsqueeze(1), _sign_shifts(device), out=whole.view(torch.int32).view(-1, 32))
        torch.copysign(torch.ones((), device=device).expand(whole.shape), whole, out=whole)
        if direct:
            return out
        v = local_slice(like, whole[:n].view(like.shape))
        return out.copy_(v) if out is not None else v.clone()

    def update(self, batch: Batch, loss_fn: LossFn) -> None:
        self.generator.manual_seed(self.seed * 1_000_003 + self.step)
        nll, tokens = self.strategy.accumulate(self.acc, batch, loss_fn)
        self._count(nll, tokens, probes=self.probes)

    def compute(self) -> dict[str, Tensor]:
        self.check_finite()
        denom = self.tokens * self.probes  # each batch added one v * (H_b v) per probe
        scores = {}
        for n, p in self.params.items():
            scores[n] = self.acc[n].div_(denom)
            self.strategy.finish(n, p, scores[n])
        return scores


def _sign_shifts(device: torch.device) -> Tensor:
    """Left shifts that move bit k of a 32-bit word to the sign bit, k = 0..31."""
    return torch.arange(31, -1, -1, dtype=torch.int32, device=device)
