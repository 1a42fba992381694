"""Per-weight sensitivity metrics as small classes over tensors (no Lightning here).

A scorer is bound to the parameters it scores, sees the calibration batches one by one through
``update`` and returns one score tensor per parameter from ``compute``. The contract
(``docs/design.md``): L is the token-weighted mean next-token NLL over all calibration tokens.

* ``magnitude``: |w|.
* ``grad_x_weight``: |g * w| with g = dL/dw over the whole calibration set.
* ``grad_squared``: mean over micro-batches of g_m ** 2 (empirical Fisher diagonal).
* ``hutchinson_diag``: mean over Rademacher probes v of v * (H v), an unbiased estimate of diag(H).

Accumulators are float32 whatever the model's dtype. Gradients are consumed by
post-accumulate-grad hooks as soon as each one is ready and then freed, so a scorer never holds a
second full copy of the gradients.

Sharded parameters (FSDP2 DTensors, ``sharded = True``): accumulators cover this rank's row shard only;
the gradient a hook sees is already the sum over ranks (reduce-scatter), so ``reduce`` sums only the
counters. Metrics that are not linear in the batch (``turn_taking``) let the module run one rank's
batch at a time with the other ranks idle (see ``SensitivityModule``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from cwa.common.errors import CwaError
from cwa.model.sharding import all_reduce_sum, is_dtensor, local_slice

Batch = dict[str, Tensor]
LossFn = Callable[[Batch], tuple[Tensor, int]]
"""Maps a batch to (sum of next-token NLL over its counted tokens, number of counted tokens)."""


class Scorer:
    """Base class: float32 accumulators, counters, distributed reduction and checkpoint state."""

    name: ClassVar[str] = ""
    needs_data: ClassVar[bool] = True
    signed: ClassVar[bool] = False
    turn_taking: ClassVar[bool] = False
    """Not linear in the batch (squares, per-batch probes): under sharding each rank's batch runs alone."""

    @property
    def repeats_passes(self) -> bool:
        """Several forward+backward passes over each batch: the loop keeps freed memory for them
        (:func:`cwa.common.environment.keep_freed_memory`)."""
        return False

    def __init__(self) -> None:
        self.params: dict[str, nn.Parameter] = {}
        self.acc: dict[str, Tensor] = {}
        # tokens, summed NLL, micro-batches, probes: float64 so that token counts stay exact.
        self.counters = torch.zeros(4, dtype=torch.float64)
        self.step = 0
        self.sharded = False  # set by the module before bind under FSDP2
        self.counting = True  # False while this rank only takes part in another rank's turn

    # -- setup ---------------------------------------------------------------------------------
    def required_attn_implementation(self) -> str | None:
        """Attention kernel the metric needs (``eager`` for double backward), or None for any."""
        return None

    def bind(self, params: dict[str, nn.Parameter]) -> None:
        """Attach to the parameters to score and allocate zeroed float32 accumulators beside them."""
        self.params = dict(params)
        self.acc = {}
        if self.needs_data:
            self.acc = {
                n: torch.zeros(_local(p).shape, dtype=torch.float32, device=p.device) for n, p in params.items()
            }
        self.counters = torch.zeros(4, dtype=torch.float64)

    def settings(self) -> dict:
        """The metric's options, for the summary."""
        return {}

    def attach(self, model: nn.Module) -> None:
        """Called by the module after ``bind`` with the model itself; scorers that read layer inputs
        (``cwa.scoring.saliency``) register their hooks here. Default: nothing."""

    # -- accumulation --------------------------------------------------------------------------
    @property
    def tokens(self) -> float:
        return float(self.counters[0])

    @property
    def mean_loss(self) -> float:
        return float(self.counters[1] / self.counters[0]) if self.counters[0] > 0 else float("nan")

    def _count(self, nll: Tensor, tokens: int, microbatches: int = 0, probes: int = 0) -> None:
        if not self.counting:
            return
        value = float(nll.detach())
        if not math.isfinite(value):
            raise CwaError(f"the calibration loss became {value}; check the model's dtype and the data.")
        self.counters += torch.tensor([tokens, value, microbatches, probes], dtype=torch.float64)

    def update(self, batch: Batch, loss_fn: LossFn) -> None:
        raise NotImplementedError

    def set_step(self, step: int) -> None:
        """The global index of the batch about to be seen (random metrics seed their probes with it,
        so that any split of the batches over processes gives the same result)."""
        self.step = step

    @contextlib.contextmanager
    def _consume_grads(self, fn: Callable[[str, Tensor], None]) -> Iterator[None]:
        """Call ``fn(name, grad)`` as each scored parameter's gradient is ready, then free the gradient."""

        def hook_for(name: str) -> Callable[[Tensor], None]:
            def hook(param: Tensor) -> None:
                grad = param.grad
                fn(name, _local(grad))
                param.grad = None

            return hook

        handles = [p.register_post_accumulate_grad_hook(hook_for(n)) for n, p in self.params.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    # -- results -------------------------------------------------------------------------------
    def reduce(self, all_reduce: Callable[[Tensor], None]) -> None:
        """Sum accumulators and counters over processes: one collective per tensor. Sharded
        accumulators already hold the sum over ranks (backward reduce-scatters gradients): only the
        counters are summed then."""
        if not self.sharded:
            for tensor in self.acc.values():
                all_reduce(tensor)
        # Counters live on the CPU; NCCL reduces device tensors only.
        device = next(iter(self.params.values())).device if self.params else torch.device("cpu")
        counters = self.counters.to(device)
        all_reduce(counters)
        self.counters.copy_(counters.cpu())

    def compute(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def nonfinite(self) -> list[str]:
        """Names of the accumulators (this rank's part) holding NaN or Inf: an overflowed gradient."""
        return [name for name, tensor in self.acc.items() if not bool(torch.isfinite(tensor).all())]

    def check_finite(self) -> None:
        bad = self.nonfinite()
        if bad:
            raise nonfinite_error(bad[0], next(iter(self.params.values())).dtype)

    def state_dict(self) -> dict:
        return {"acc": self.acc, "counters": self.counters}

    def load_state_dict(self, state: dict) -> None:
        for name, tensor in state["acc"].items():
            self.acc[name].copy_(tensor)
        self.counters.copy_(state["counters"])


def nonfinite_error(name: str, dtype: torch.dtype) -> CwaError:
    hint = "use dtype bfloat16 or float32" if dtype == torch.float16 else "try dtype float32"
    return CwaError(
        f"the gradient of '{name}' overflowed (NaN or Inf in a {str(dtype).removeprefix('torch.')} model); "
        f"{hint}, a shorter seq_len, or exclude that tensor."
    )


def _local(tensor: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2), or the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


class Magnitude(Scorer):
    """|w|: needs no data (the loss is still measured for the summary)."""

    name = "magnitude"
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
    turn_taking = True

    def __init__(self, fisher_microbatch: int = 1) -> None:
        super().__init__()
        if fisher_microbatch < 1:
            raise CwaError(f"fisher_microbatch must be at least 1, got {fisher_microbatch}.")
        self.fisher_microbatch = fisher_microbatch

    def settings(self) -> dict:
        return {"fisher_microbatch": self.fisher_microbatch}

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


class HutchinsonDiag(Scorer):
    """Hutchinson estimate of the Hessian diagonal, E_v[v * (H v)] with Rademacher v.

    Stored signed; ranked by absolute value. Each (batch, probe) pair contributes
    v * (H_b v) with H_b the Hessian of the batch's summed NLL; dividing by the total token count
    and the probe count gives an unbiased estimate of diag of the Hessian of L.

    Finite differences divide by the step float32 actually applied, weight by weight: w + eps v rounds
    to a multiple of the weight's ulp, so for weights far above the tensor's rms (super weights) the
    applied step differs from eps by a factor, and below half an ulp it is 0. With the perturbation
    d = s * v elementwise (s >= 0 the applied step), the contribution v_i (H d)_i / s_i = (H d)_i / d_i
    keeps the diagonal term exact. The cross terms are zero-mean when s does not depend on the sign of
    v: always for ``central``; for ``forward`` except at weights within eps of a power of two, where the
    two signs round to steps one ulp apart. Weights whose applied step is 0 (for ``forward``: for either
    sign of v) cannot be moved by eps: they score 0, not inf or NaN, and their count per tensor is in
    ``zero_steps`` (and in ``settings()`` as ``fd_zero_steps``); a larger ``fd_eps`` reaches them.

    The accumulators hold sum v * (g(w + d) - g(w - d or w)) and are divided by s once, in ``compute``:
    s depends on the weight alone, except for the forward scheme's weights near a power of two, which
    get an exact correction by index each probe. That keeps each probe to a draw, one fused shift of
    the weights and one fused multiply-add per gradient (about 15 passes over the scored weights).

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
        if hvp not in ("autograd", "finite_difference"):
            raise CwaError(f"unknown hvp backend '{hvp}': use autograd or finite_difference.")
        if fd_scheme not in ("forward", "central"):
            raise CwaError(f"unknown fd_scheme '{fd_scheme}': use forward or central.")
        if not fd_eps > 0:
            raise CwaError(f"fd_eps must be positive, got {fd_eps}.")
        self.probes, self.hvp, self.fd_eps, self.seed, self.fd_scheme = probes, hvp, fd_eps, seed, fd_scheme
        self._generator: torch.Generator | None = None
        self._eps = 0.0
        self._backup: dict[str, Tensor] = {}
        self._v: dict[str, Tensor] = {}
        self._zero_index: dict[str, Tensor] = {}
        self._uneven: dict[str, tuple[Tensor, Tensor]] = {}
        self.zero_steps: dict[str, int] = {}
        """Weights per tensor (all ranks) whose finite-difference step rounds to 0: they score 0."""

    def settings(self) -> dict:
        settings = {"probes": self.probes, "hvp": self.hvp, "fd_eps": self.fd_eps, "seed": self.seed}
        if self.hvp == "finite_difference":
            settings["fd_scheme"] = self.fd_scheme
            settings["fd_zero_steps"] = {n: c for n, c in self.zero_steps.items() if c}
        return settings

    def required_attn_implementation(self) -> str | None:
        return "eager" if self.hvp == "autograd" else None

    @property
    def repeats_passes(self) -> bool:
        return self.hvp == "finite_difference"

    def bind(self, params: dict[str, nn.Parameter]) -> None:
        super().bind(params)
        self._backup, self._v = {}, {}
        device = next(iter(params.values())).device
        self._generator = torch.Generator(device=device)
        if self.sharded and self.hvp == "autograd":
            raise CwaError(
                "hutchinson_diag on sharded parameters (ModelParallelStrategy) needs hvp: finite_difference; "
                "double backward through FSDP is not supported."
            )
        if self.hvp == "finite_difference":
            bad = [n for n, p in params.items() if p.dtype != torch.float32]
            if bad:
                raise CwaError(
                    f"hutchinson_diag with hvp finite_difference needs float32 weights ('{bad[0]}' is "
                    f"{params[bad[0]].dtype}): a relative step of {self.fd_eps:g} is below the resolution "
                    "of 16-bit floats; set dtype: float32."
                )
            # ||w|| over the whole model: under sharding each rank sums its shards, then one all-reduce.
            norms = torch.zeros(2, dtype=torch.float64, device=device)
            for p in params.values():
                local = _local(p.detach())
                norms[0] += local.double().pow(2).sum()
                norms[1] += local.numel()
            if self.sharded:
                all_reduce_sum(norms)
            self._eps = self.fd_eps * math.sqrt(float(norms[0])) / math.sqrt(float(norms[1]))
            self._find_steps()

    def _shifted(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """(w + eps, w - eps) as float32 rounds them, computed with the kernel that shifts the weights
        (``_shift``): the forward scheme's steps are their distances to w, the central scheme's their
        difference."""
        ones = torch.ones_like(w)
        return torch.add(w, ones, alpha=self._eps), torch.add(w, ones, alpha=-self._eps)

    def _find_steps(self) -> None:
        """The weights that eps cannot move, and (forward scheme) those whose two steps differ."""
        self._zero_index, self._uneven = {}, {}
        counts = []
        for n, p in self.params.items():
            w = _local(p.detach()).reshape(-1)
            plus, minus = self._shifted(w)
            if self.fd_scheme == "central":
                zero = plus == minus
            else:
                up, down = plus.sub_(w), minus.sub_(w).neg_()
                zero = (up == 0) | (down == 0)
                uneven = torch.nonzero((up != down) & ~zero).squeeze(1)
                if uneven.numel():
                    # v = -1 there contributes diff / -down; the accumulator adds -diff and compute divides by up.
                    self._uneven[n] = (uneven, 1.0 - up[uneven] / down[uneven])
            index = torch.nonzero(zero).squeeze(1)
            if index.numel():
                self._zero_index[n] = index
            counts.append(index.numel())
        total = torch.tensor(counts, dtype=torch.float64, device=self._generator.device)
        if self.sharded:
            all_reduce_sum(total)
        self.zero_steps = dict(zip(self.params, (int(c) for c in total.tolist()), strict=True))

    def _probe(self, like: Tensor, out: Tensor | None = None) -> Tensor:
        """A float32 Rademacher probe for ``like`` (written into ``out`` when given); for a shard, its rows
        of the whole tensor's probe, so that every process count draws the same v.

        One random byte gives eight signs (drawing one random number per weight is the slowest part of a
        probe on a CPU), and each sign is written straight into the float32 sign bit: two passes, where
        unpacking bytes and converting them to floats takes five."""
        device = _local(like).device
        n = like.numel()
        words = torch.zeros((n + 31) // 32, dtype=torch.int32, device=device)
        octets = words.view(torch.uint8)  # little-endian: bit k of word j is sign 32 j + k
        octets[: (n + 7) // 8].random_(0, 256, generator=self._generator)
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
        self._generator.manual_seed(self.seed * 1_000_003 + self.step)
        if self.hvp == "autograd":
            self._update_autograd(batch, loss_fn)
            return
        if not self._backup:
            self._backup = {n: _local(p.detach()).clone() for n, p in self.params.items()}
            self._v = {n: torch.empty_like(b) for n, b in self._backup.items()}
        try:
            if self.fd_scheme == "forward":
                self._update_forward(batch, loss_fn)
            else:
                self._update_central(batch, loss_fn)
        finally:
            self._shift(0.0)

    def _update_autograd(self, batch: Batch, loss_fn: LossFn) -> None:
        names, params = list(self.params), list(self.params.values())
        nll, tokens = loss_fn(batch)
        self._count(nll, tokens, probes=self.probes)
        try:
            grads = torch.autograd.grad(nll, params, create_graph=True, materialize_grads=True)
        except RuntimeError as exc:
            raise CwaError(f"double backward failed ({str(exc).splitlines()[0]}); use hvp: finite_difference.") from exc
        for i in range(self.probes):
            vs = [self._probe(p).to(p.dtype) for p in params]
            hvs = torch.autograd.grad(
                grads, params, grad_outputs=vs, retain_graph=i < self.probes - 1, materialize_grads=True
            )
            for name, v, hv in zip(names, vs, hvs, strict=True):
                self.acc[name].addcmul_(v.float(), hv.float())

    def _update_forward(self, batch: Batch, loss_fn: LossFn) -> None:
        """v * (g(w + eps v) - g(w)) per probe, g(w) computed once for the batch and held."""
        held: dict[str, Tensor] = {}
        nll, tokens = loss_fn(batch)
        self._count(nll, tokens, probes=self.probes)
        with self._consume_grads(lambda n, g: held.__setitem__(n, g.float())):  # float32 weights: no copy
            nll.backward()
        del nll

        def consume(name: str, grad: Tensor) -> None:
            if name not in held:  # the loss does not depend on this tensor
                return
            difference = grad.float().sub_(held[name])  # the gradient is freed after this hook
            self.acc[name].addcmul_(self._v[name], difference)
            uneven = self._uneven.get(name)
            if uneven is not None:
                index, factor = uneven
                negative = self._v[name].view(-1)[index] < 0
                self.acc[name].view(-1).index_add_(0, index, difference.view(-1)[index] * factor * negative)

        for _ in range(self.probes):
            self._draw()
            self._shift(self._eps)
            nll, _ = loss_fn(batch)
            with self._consume_grads(consume):
                nll.backward()

    def _update_central(self, batch: Batch, loss_fn: LossFn) -> None:
        """v * (g(w + eps v) - g(w - eps v)) per probe: two gradients per probe."""
        for i in range(self.probes):
            self._draw()
            losses = []
            # p.grad accumulates grad(w + eps v) and then -grad(w - eps v): their difference.
            for sign in (1.0, -1.0):
                self._shift(sign * self._eps)
                nll, tokens = loss_fn(batch)
                losses.append(nll.detach())
                (sign * nll).backward()
            # (L(w + eps v) + L(w - eps v)) / 2 = L(w) + O(eps^2): the loss for the summary.
            if i == 0:
                self._count((losses[0] + losses[1]) / 2, tokens, probes=self.probes)
            for name, p in self.params.items():
                if p.grad is not None:  # None: the loss does not depend on this tensor
                    self.acc[name].addcmul_(self._v[name], _local(p.grad).float())
                    p.grad = None

    def _draw(self) -> None:
        """This probe's v for every scored tensor, in the buffers reused across probes and batches."""
        for n, p in self.params.items():
            self._probe(p, out=self._v[n])

    def _shift(self, step: float) -> None:
        """Set the scored weights to backup + step * v, one fused pass each (step 0 restores them bit for bit)."""
        with torch.no_grad():
            for n, p in self.params.items():
                local = _local(p.data)
                if step:
                    torch.add(self._backup[n], self._v[n], alpha=step, out=local)
                else:
                    local.copy_(self._backup[n])

    def compute(self) -> dict[str, Tensor]:
        self.check_finite()
        denom = self.tokens * self.probes  # each batch added one v * (H_b v) per probe
        scores = {}
        for n, p in self.params.items():
            scores[n] = self.acc[n].div_(denom)
            if self.hvp == "finite_difference":
                w = _local(p.detach())
                plus, minus = self._shifted(w)
                scores[n].div_(plus.sub_(w) if self.fd_scheme == "forward" else plus.sub_(minus))
                index = self._zero_index.get(n)
                if index is not None:  # 0 / 0 there: these weights were never moved
                    scores[n].view(-1).index_fill_(0, index, 0.0)
        return scores


def _sign_shifts(device: torch.device) -> Tensor:
    """Left shifts that move bit k of a 32-bit word to the sign bit, k = 0..31."""
    return torch.arange(31, -1, -1, dtype=torch.int32, device=device)
