"""Hessian-vector products for :class:`cwa.scoring.hutchinson.HutchinsonDiag`, one small class per strategy.

Each strategy adds, for every probe v of a batch, v * (H_b v) to the estimator's accumulators (H_b the Hessian
of the batch's summed NLL), possibly scaled by a per-weight factor that :meth:`HessianVectorProducts.finish`
removes once, when the scores are computed:

* :class:`DoubleBackward` (``hvp: autograd``): the exact product by differentiating the gradient again.
  Several probes share one forward and one backward; needs an attention kernel with a double backward
  (``eager``) and unsharded parameters.
* :class:`ForwardDifference` (``hvp: finite_difference``, ``fd_scheme: forward``): g(w + eps v) - g(w), the
  unperturbed gradient computed once per batch and held, so probes + 1 gradients per batch.
* :class:`CentralDifference` (``fd_scheme: central``): g(w + eps v) - g(w - eps v), two gradients per probe,
  nothing held. Its truncation error is O(eps^2); the forward scheme's O(eps) term is odd in v and averages
  out over probes, so both are unbiased to second order.

Finite differences (any attention kernel, sharded parameters, float32 weights only) divide by the step
float32 actually applied, weight by weight: w + eps v rounds to a multiple of the weight's ulp, so for weights
far above the tensor's rms (super weights) the applied step differs from eps by a factor, and below half an
ulp it is 0. With the perturbation d = s * v elementwise (s >= 0 the applied step), the contribution
v_i (H d)_i / s_i = (H d)_i / d_i keeps the diagonal term exact. The cross terms are zero-mean when s does not
depend on the sign of v: always for the central scheme; for the forward scheme except at weights within eps
of a power of two, where the two signs round to steps one ulp apart. Weights whose applied step is 0 (forward:
for either sign of v) cannot be moved by eps: they score 0, not inf or NaN, and their count per tensor is a
fact of the run (``fd_zero_steps``); a larger ``fd_eps`` reaches them.

The accumulators hold sum v * (g(w + d) - g(w - d or w)) and are divided by s once, in ``finish``: s depends
on the weight alone, except for the forward scheme's weights near a power of two, which get an exact
correction by index each probe. That keeps each probe to a draw, one fused shift of the weights and one fused
multiply-add per gradient (about 15 passes over the scored weights).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor, nn

from cwa.common.errors import CwaError
from cwa.model.sharding import all_reduce_sum
from cwa.scoring.base import Batch, LossFn, _local, consume_grads
from cwa.scoring.sizing import Layout, probe_draw

Draw = Callable[..., Tensor]
"""``draw(like, out=None)``: the estimator's next Rademacher probe for a parameter (float32, this rank's rows)."""

SHARDED_AUTOGRAD = (
    "hutchinson_diag on sharded parameters (ModelParallelStrategy) needs hvp: finite_difference; "
    "double backward through FSDP is not supported."
)


class HessianVectorProducts:
    """How a Hutchinson estimator gets v * (H v): the interface of the three strategies.

    Args:
        probes: Rademacher probes per batch.
    """

    hvp: ClassVar[str] = ""
    """The value of ``HutchinsonDiag``'s ``hvp`` option that selects this strategy."""
    attn_implementation: ClassVar[str | None] = None
    """The attention kernel the products need, or None for any."""
    repeats_passes: ClassVar[bool] = False
    """Several forward+backward passes per batch (see ``Scorer.repeats_passes``)."""

    def __init__(self, probes: int) -> None:
        self.probes = probes
        self.params: dict[str, nn.Parameter] = {}
        self.draw: Draw | None = None

    def check_plan(self, dtype: str, sharded: bool) -> None:
        """Refuse, before any weight is loaded, what ``bind`` would refuse (default: nothing)."""

    def bind(self, params: dict[str, nn.Parameter], sharded: bool, draw: Draw) -> None:
        """Attach to the scored parameters; ``draw`` gives the probes (seeded per batch by the estimator)."""
        self.params, self.draw = params, draw

    def accumulate(self, acc: dict[str, Tensor], batch: Batch, loss_fn: LossFn) -> tuple[Tensor, int]:
        """Add every probe's v * (H_b v), scaled as :meth:`finish` expects, to ``acc``.

        Returns:
            (the batch's summed NLL at w, its token count), for the estimator's counters.
        """
        raise NotImplementedError

    def finish(self, name: str, param: Tensor, score: Tensor) -> None:
        """Turn one tensor's accumulated sum (already divided by tokens x probes) into the estimate, in place."""

    def settings(self) -> dict:
        """The strategy's options beyond ``hvp`` and ``fd_eps``."""
        return {}

    def facts(self) -> dict:
        """What the strategy found out about this run."""
        return {}

    def memory(self, layout: Layout, weight_bytes: int) -> tuple[int, dict[str, int]]:
        """(gradient bytes, extras) on the fullest rank (``cwa.scoring.sizing``)."""
        raise NotImplementedError


class DoubleBackward(HessianVectorProducts):
    """H v by differentiating the gradient a second time (``hvp: autograd``); probes share one forward pass."""

    hvp = "autograd"
    attn_implementation = "eager"

    def check_plan(self, dtype: str, sharded: bool) -> None:
        if sharded:
            raise CwaError(SHARDED_AUTOGRAD)

    def bind(self, params: dict[str, nn.Parameter], sharded: bool, draw: Draw) -> None:
        if sharded:
            raise CwaError(SHARDED_AUTOGRAD)
        super().bind(params, sharded, draw)

    def accumulate(self, acc: dict[str, Tensor], batch: Batch, loss_fn: LossFn) -> tuple[Tensor, int]:
        names, params = list(self.params), list(self.params.values())
        nll, tokens = loss_fn(batch)
        try:
            grads = torch.autograd.grad(nll, params, create_graph=True, materialize_grads=True)
        except RuntimeError as exc:
            raise CwaError(f"double backward failed ({str(exc).splitlines()[0]}); use hvp: finite_difference.") from exc
        for i in range(self.probes):
            vs = [self.draw(p).to(p.dtype) for p in params]
            hvs = torch.autograd.grad(
                grads, params, grad_outputs=vs, retain_graph=i < self.probes - 1, materialize_grads=True
            )
            for name, v, hv in zip(names, vs, hvs, strict=True):
                acc[name].addcmul_(v.float(), hv.float())
        return nll.detach(), tokens

    def memory(self, layout: Layout, weight_bytes: int) -> tuple[int, dict[str, int]]:
        """First-order gradients kept with their graph, and two Hessian-vector products and probes at the
        hand-over between probes (the next probe's set is built while the previous one is still referenced)."""
        b = weight_bytes
        held = min(self.probes, 2)
        gradients = layout.scored * b * (1 + held)
        extras = {"probes": layout.scored * b * held, "drawing one whole probe": probe_draw(layout)}
        if b < 4:
            extras["float32 casts of one probe and its product"] = 2 * layout.largest_scored * 4
        return gradients, extras


class FiniteDifference(HessianVectorProducts):
    """Differences of gradients at shifted weights (``hvp: finite_difference``): the common part of the schemes.

    Args:
        probes: Rademacher probes per batch.
        fd_eps: relative step: eps = fd_eps * ||w|| / ||v|| over the scored tensors.
    """

    hvp = "finite_difference"
    repeats_passes = True
    scheme: ClassVar[str] = ""
    """The value of ``fd_scheme`` that selects this scheme."""

    def __init__(self, probes: int, fd_eps: float) -> None:
        super().__init__(probes)
        self.fd_eps = fd_eps
        self.eps = 0.0
        self.zero_steps: dict[str, int] = {}
        """Weights per tensor (all ranks) whose step rounds to 0: they score 0."""
        self._zero_index: dict[str, Tensor] = {}
        self._backup: dict[str, Tensor] = {}
        self._v: dict[str, Tensor] = {}

    def check_plan(self, dtype: str, sharded: bool) -> None:
        if dtype != "float32":
            raise CwaError(
                f"hutchinson_diag with hvp finite_difference needs float32 weights (dtype is {dtype}): a relative "
                f"step of {self.fd_eps:g} is below the resolution of 16-bit floats; set dtype: float32."
            )

    def bind(self, params: dict[str, nn.Parameter], sharded: bool, draw: Draw) -> None:
        super().bind(params, sharded, draw)
        self._backup, self._v = {}, {}
        bad = [n for n, p in params.items() if p.dtype != torch.float32]
        if bad:
            raise CwaError(
                f"hutchinson_diag with hvp finite_difference needs float32 weights ('{bad[0]}' is "
                f"{params[bad[0]].dtype}): a relative step of {self.fd_eps:g} is below the resolution "
                "of 16-bit floats; set dtype: float32."
            )
        # ||w|| over the whole model: under sharding each rank sums its shards, then one all-reduce.
        device = next(iter(params.values())).device
        norms = torch.zeros(2, dtype=torch.float64, device=device)
        for p in params.values():
            local = _local(p.detach())
            norms[0] += local.double().pow(2).sum()
            norms[1] += local.numel()
        if sharded:
            all_reduce_sum(norms)
        self.eps = self.fd_eps * math.sqrt(float(norms[0])) / math.sqrt(float(norms[1]))
        self._find_steps(sharded, device)

    def _shifted(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """(w + eps, w - eps) as float32 rounds them, computed with the kernel that shifts the weights
        (``_shift``): the forward scheme's steps are their distances to w, the central scheme's their
        difference."""
        ones = torch.ones_like(w)
        return torch.add(w, ones, alpha=self.eps), torch.add(w, ones, alpha=-self.eps)

    def _find_steps(self, sharded: bool, device: torch.device) -> None:
        """The weights that eps cannot move (and what the scheme needs to know about the others)."""
        self._zero_index = {}
        counts = []
        for n, p in self.params.items():
            w = _local(p.detach()).reshape(-1)
            index = torch.nonzero(self._stuck(n, w, *self._shifted(w))).squeeze(1)
            if index.numel():
                self._zero_index[n] = index
            counts.append(index.numel())
        total = torch.tensor(counts, dtype=torch.float64, device=device)
        if sharded:
            all_reduce_sum(total)
        self.zero_steps = dict(zip(self.params, (int(c) for c in total.tolist()), strict=True))

    def _stuck(self, name: str, w: Tensor, plus: Tensor, minus: Tensor) -> Tensor:
        """Where the step float32 applies to the flat weights ``w`` is 0 (``plus`` and ``minus`` may be reused)."""
        raise NotImplementedError

    def _applied_step(self, w: Tensor, plus: Tensor, minus: Tensor) -> Tensor:
        """The step s each weight was moved by, as the accumulators were scaled (``plus`` may be reused)."""
        raise NotImplementedError

    def accumulate(self, acc: dict[str, Tensor], batch: Batch, loss_fn: LossFn) -> tuple[Tensor, int]:
        if not self._backup:
            self._backup = {n: _local(p.detach()).clone() for n, p in self.params.items()}
            self._v = {n: torch.empty_like(b) for n, b in self._backup.items()}
        try:
            return self._probes(acc, batch, loss_fn)
        finally:
            self._shift(0.0)

    def _probes(self, acc: dict[str, Tensor], batch: Batch, loss_fn: LossFn) -> tuple[Tensor, int]:
        """Every probe of one batch, the weights shifted as the scheme needs (restored by the caller)."""
        raise NotImplementedError

    def _draw(self) -> None:
        """This probe's v for every scored tensor, in the buffers reused across probes and batches."""
        for n, p in self.params.items():
            self.draw(p, out=self._v[n])

    def _shift(self, step: float) -> None:
        """Set the scored weights to backup + step * v, one fused pass each (step 0 restores them bit for bit)."""
        with torch.no_grad():
            for n, p in self.params.items():
                local = _local(p.data)
                if step:
                    torch.add(self._backup[n], self._v[n], alpha=step, out=local)
                else:
                    local.copy_(self._backup[n])

    def finish(self, name: str, param: Tensor, score: Tensor) -> None:
        w = _local(param.detach())
        score.div_(self._applied_step(w, *self._shifted(w)))
        index = self._zero_index.get(name)
        if index is not None:  # 0 / 0 there: these weights were never moved
            score.view(-1).index_fill_(0, index, 0.0)

    def settings(self) -> dict:
        return {"fd_scheme": self.scheme}

    def facts(self) -> dict:
        return {"fd_zero_steps": {n: c for n, c in self.zero_steps.items() if c}}

    def memory(self, layout: Layout, weight_bytes: int) -> tuple[int, dict[str, int]]:
        """Every scored gradient shard over two backward passes (plus one unit's unsharded ones), the weight
        backup, float32 probes and the transient of drawing one."""
        b = weight_bytes
        gradients = layout.rank_scored * b + (layout.largest_unit_scored * b if layout.sharded else 0)
        extras = {
            "weight backup (finite differences)": layout.rank_scored * b,
            "float32 probes": layout.rank_scored * 4,
            "drawing one whole probe": probe_draw(layout),
        }
        return gradients, extras


class ForwardDifference(FiniteDifference):
    """v * (g(w + eps v) - g(w)) per probe, g(w) computed once per batch and held (``fd_scheme: forward``)."""

    scheme = "forward"

    def __init__(self, probes: int, fd_eps: float) -> None:
        super().__init__(probes, fd_eps)
        self._uneven: dict[str, tuple[Tensor, Tensor]] = {}

    def _find_steps(self, sharded: bool, device: torch.device) -> None:
        self._uneven = {}
        super()._find_steps(sharded, device)

    def _stuck(self, name: str, w: Tensor, plus: Tensor, minus: Tensor) -> Tensor:
        """Either sign of v leaves the weight where it is; records the weights whose two steps differ."""
        up, down = plus.sub_(w), minus.sub_(w).neg_()
        zero = (up == 0) | (down == 0)
        uneven = torch.nonzero((up != down) & ~zero).squeeze(1)
        if uneven.numel():
            # v = -1 there contributes diff / -down; the accumulator adds -diff and finish divides by up.
            self._uneven[name] = (uneven, 1.0 - up[uneven] / down[uneven])
        return zero

    def _applied_step(self, w: Tensor, plus: Tensor, minus: Tensor) -> Tensor:
        return plus.sub_(w)

    def _probes(self, acc: dict[str, Tensor], batch: Batch, loss_fn: LossFn) -> tuple[Tensor, int]:
        held: dict[str, Tensor] = {}
        nll, tokens = loss_fn(batch)
        with consume_grads(self.params, lambda n, g: held.__setitem__(n, g.float())):  # float32 weights: no copy
            nll.backward()
        unperturbed = nll.detach()
        del nll

        def consume(name: str, grad: Tensor) -> None:
            if name not in held:  # the loss does not depend on this tensor
                return
            difference = grad.float().sub_(held[name])  # the gradient is freed after this hook
            acc[name].addcmul_(self._v[name], difference)
            uneven = self._uneven.get(name)
            if uneven is not None:
                index, factor = uneven
                negative = self._v[name].view(-1)[index] < 0
                acc[name].view(-1).index_add_(0, index, difference.view(-1)[index] * factor * negative)

        for _ in range(self.probes):
            self._draw()
            self._shift(self.eps)
            nll, _ = loss_fn(batch)
            with consume_grads(self.params, consume):
                nll.backward()
        return unperturbed, tokens

    def memory(self, layout: Layout, weight_bytes: int) -> tuple[int, dict[str, int]]:
        """The common part, and the unperturbed gradient of the batch, held in float32 for every probe."""
        gradients, extras = super().memory(layout, weight_bytes)
        extras["float32 unperturbed gradient (forward scheme)"] = layout.rank_scored * 4
        return gradients, extras


class CentralDifference(FiniteDifference):
    """v * (g(w + eps v) - g(w - eps v)) per probe: two gradients per probe (``fd_scheme: central``)."""

    scheme = "central"

    def _stuck(self, name: str, w: Tensor, plus: Tensor, minus: Tensor) -> Tensor:
        return plus == minus

    def _applied_step(self, w: Tensor, plus: Tensor, minus: Tensor) -> Tensor:
        return plus.sub_(minus)

    def _probes(self, acc: dict[str, Tensor], batch: Batch, loss_fn: LossFn) -> tuple[Tensor, int]:
        loss = None
        for _ in range(self.probes):
            self._draw()
            losses = []
            # p.grad accumulates grad(w + eps v) and then -grad(w - eps v): their difference.
            for sign in (1.0, -1.0):
                self._shift(sign * self.eps)
                nll, tokens = loss_fn(batch)
                losses.append(nll.detach())
                (sign * nll).backward()
            if loss is None:  # (L(w + eps v) + L(w - eps v)) / 2 = L(w) + O(eps^2): the loss for the summary
                loss = (losses[0] + losses[1]) / 2
            for name, p in self.params.items():
                if p.grad is not None:  # None: the loss does not depend on this tensor
                    acc[name].addcmul_(self._v[name], _local(p.grad).float())
                    p.grad = None
        return loss, tokens


def make_hvp(hvp: str, fd_scheme: str, probes: int, fd_eps: float) -> HessianVectorProducts:
    """The strategy ``HutchinsonDiag``'s options select; one clear sentence for an unknown or bad option.

    Args:
        hvp: ``autograd`` or ``finite_difference``.
        fd_scheme: ``forward`` or ``central`` (finite differences only).
        probes: Rademacher probes per batch.
        fd_eps: relative finite-difference step.
    """
    if hvp not in ("autograd", "finite_difference"):
        raise CwaError(f"unknown hvp backend '{hvp}': use autograd or finite_difference.")
    if fd_scheme not in ("forward", "central"):
        raise CwaError(f"unknown fd_scheme '{fd_scheme}': use forward or central.")
    if not fd_eps > 0:
        raise CwaError(f"fd_eps must be positive, got {fd_eps}.")
    if hvp == "autograd":
        return DoubleBackward(probes)  # fd_scheme and fd_eps play no part
    return (ForwardDifference if fd_scheme == "forward" else CentralDifference)(probes, fd_eps)
