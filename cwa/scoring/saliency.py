"""Activation-aware and second-order saliencies from the pruning literature (no Lightning here).

* ``wanda`` (Sun et al. 2023): |W_ij| * ||X_j||_2, X_j the j-th input feature of the layer over every
  calibration token (padding excluded).
* ``obs`` (Optimal Brain Surgeon, the SparseGPT saliency): w_ij^2 / [H^-1]_jj with
  H = (2/n) X^T X + lambda * mean(diag H) * I per distinct layer input.
* ``obd`` (LeCun's Optimal Brain Damage, :mod:`cwa.scoring.obd`, re-exported here): 1/2 * H_ii * w^2 with
  diag(H) from the empirical Fisher or from Hutchinson.

``wanda`` and ``obs`` score only weights that multiply a layer input: the weights of ``nn.Linear`` and of
transformers' ``Conv1D`` (GPT-2, whose weight is stored (in, out); scores keep each parameter's own storage
layout, and row / column in cwa's outputs still mean (output, input)). Every other selected tensor
(embeddings, norms, biases) is left out of the scores (not scored as 0, so a top-K never contains it) and
listed with the reason in ``scorer.unscored``, which the summary shows among the metric's facts. A weight
tied to an embedding and used by a linear head (GPT-2's ``wte`` / ``lm_head``) is scored through the head.

Layer inputs are read by forward pre-hooks during forward passes only (no backward). Layers that read the
same input tensor (q/k/v projections, gate/up) share one accumulator: the grouping is found by tensor
identity in one two-token forward pass when the scorer is attached to the model. Accumulators are sums over
tokens, so processes (DDP, and FSDP2, where activations are not sharded) sum them with one all-reduce each.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cwa.common.errors import CwaError
from cwa.model.sharding import local_slice
from cwa.scoring.base import Batch, LossFn, Scorer, _local
from cwa.scoring.obd import OBD
from cwa.scoring.sizing import Layout, MetricMemory, float32_accumulators

__all__ = ["OBD", "OBS", "FLOAT64_MAX_WIDTH", "LinearTarget", "Wanda", "inverse_diagonal", "obs_memory_bytes"]

FLOAT64_MAX_WIDTH = 2048
"""``obs`` accumulates X^T X in float64 for inputs at most this wide (32 MiB each), float32 above."""


@dataclass(frozen=True)
class LinearTarget:
    """A scored weight that multiplies a layer input.

    Attributes:
        param: the scored parameter's name.
        module: the name of the module whose input it multiplies.
        transposed: True for ``Conv1D`` (weight stored (in, out)).
        width: the layer's input width d_in.
    """

    param: str
    module: str
    transposed: bool
    width: int


def linear_targets(model: nn.Module, params: dict[str, nn.Parameter]) -> tuple[dict[str, LinearTarget], dict[str, str]]:
    """Which of ``params`` are weights of a ``Linear`` / ``Conv1D`` layer, and why the others are not.

    Args:
        model: the model holding the parameters.
        params: the scored parameters by name.

    Returns:
        (targets by parameter name, {unscored parameter name: reason}).
    """
    by_id = {id(p): n for n, p in params.items()}
    targets: dict[str, LinearTarget] = {}
    owners: dict[str, nn.Module] = {}
    for mod_name, module in model.named_modules():
        for _, p in module.named_parameters(recurse=False):
            owners.setdefault(by_id.get(id(p), ""), module)
        weight = getattr(module, "weight", None)
        name = by_id.get(id(weight)) if weight is not None else None
        conv1d = type(module).__name__ == "Conv1D"
        if name is None or name in targets or not (isinstance(module, nn.Linear) or conv1d) or weight.dim() != 2:
            continue
        targets[name] = LinearTarget(name, mod_name, conv1d, int(weight.shape[0] if conv1d else weight.shape[1]))
    unscored = {n: _unscored_reason(n, owners.get(n)) for n in params if n not in targets}
    return targets, unscored


def _unscored_reason(name: str, owner: nn.Module | None) -> str:
    kind = type(owner).__name__ if owner is not None else "unknown module"
    if name.endswith(".bias") or name == "bias":
        return "bias: added to a layer's output, multiplies no layer input"
    if isinstance(owner, nn.Embedding):
        return "embedding table: looked up by token id, multiplies no layer input"
    if "norm" in kind.lower():
        return f"{kind} scale: multiplies its input elementwise, not through a weight matrix"
    return f"{kind} parameter: not the weight of a Linear or Conv1D layer"


def input_groups(model: nn.Module, modules: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Group modules that read the same input tensor, from one two-token forward pass.

    Args:
        model: a causal LM taking ``input_ids``.
        modules: names of the modules to group.

    Returns:
        ({leader module: every module reading the leader's input, leader first}, modules never called).
        A module called more than once per forward pass forms a group of its own.
    """
    wanted = dict(model.named_modules())
    seen: dict[str, list[Tensor]] = {name: [] for name in modules}
    handles = [
        wanted[name].register_forward_pre_hook(lambda _m, args, name=name: seen[name].append(args[0]))
        for name in modules
    ]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros((1, 2), dtype=torch.long, device=device))
    finally:
        for handle in handles:
            handle.remove()
    groups: dict[str, list[str]] = {}
    leader_input: list[tuple[Tensor, str]] = []
    for name in modules:
        calls = seen[name]
        if len(calls) != 1:
            if calls:
                groups[name] = [name]
            continue
        leader = next((lead for x, lead in leader_input if x is calls[0]), None)
        if leader is None:
            leader_input.append((calls[0], name))
            groups[name] = [name]
        else:
            groups[leader].append(name)
    return groups, [name for name in modules if not seen[name]]


class _InputScorer(Scorer):
    """Base of the scorers that read layer inputs with forward pre-hooks (forward passes only).

    ``self.acc`` holds, per input group (keyed by its leader module), the statistic ``_statistic`` and its
    token count under ``<leader>#tokens``; both are sums over tokens, reduced by sum over processes.
    """

    def __init__(self) -> None:
        super().__init__()
        self.targets: dict[str, LinearTarget] = {}
        self.unscored: dict[str, str] = {}
        self.groups: dict[str, list[str]] = {}
        self._model: nn.Module | None = None
        self._mask: Tensor | None = None

    def bind(self, params: dict[str, nn.Parameter], sharded: bool = False) -> None:
        """Remember the parameters; accumulators are allocated by ``attach`` (they follow layer inputs)."""
        self.params = dict(params)
        self.sharded = sharded
        self.acc = {}
        self.counters = torch.zeros(4, dtype=torch.float64)

    def attach(self, model: nn.Module) -> None:
        """Find the scored layers and their shared inputs and allocate one accumulator per input group.

        Args:
            model: the model the bound parameters belong to (every process calls this: one forward pass).
        """
        if not self.params:
            raise CwaError(f"{self.name}: bind the scorer to parameters before attaching it to the model.")
        self._model = model
        self.targets, self.unscored = linear_targets(model, self.params)
        by_module = {t.module: t for t in self.targets.values()}
        self.groups, unused = input_groups(model, list(by_module))
        for module in unused:
            target = by_module[module]
            self.unscored[target.param] = "its layer is not called in the model's forward pass"
            del self.targets[target.param]
        if not self.targets:
            raise CwaError(
                f"{self.name} scores only weights of Linear or Conv1D layers and none is selected; "
                "include weight matrices such as mlp or self_attn."
            )
        self.acc = {}
        for leader, members in self.groups.items():
            self.acc[leader] = self._allocate(by_module[members[0]].width, next(iter(self.params.values())).device)
            self.acc[f"{leader}#tokens"] = torch.zeros((), dtype=torch.float64, device=self.acc[leader].device)

    def _allocate(self, width: int, device: torch.device) -> Tensor:
        raise NotImplementedError

    def _statistic(self, x: Tensor, acc: Tensor) -> None:
        raise NotImplementedError

    def facts(self) -> dict:
        return {"unscored": dict(self.unscored)} if self.unscored else {}

    def plan_scored(self, model: nn.Module, params: dict[str, nn.Parameter]) -> tuple[list[str], list[int]]:
        """Only weights of Linear / Conv1D layers called in the forward pass, and one width per distinct input:
        found as ``attach`` finds them, with one two-token forward pass (which runs on the meta device too)."""
        targets, _ = linear_targets(model, params)
        groups, _ = input_groups(model, [t.module for t in targets.values()])
        called = {module for members in groups.values() for module in members}
        scored = [name for name, t in targets.items() if t.module in called]
        if not scored:
            raise CwaError(
                f"{self.name} scores only weights of Linear or Conv1D layers and none is selected; "
                "include weight matrices such as mlp or self_attn."
            )
        width = {t.module: t.width for t in targets.values()}
        return scored, [width[leader] for leader in groups]

    @contextlib.contextmanager
    def _reading_inputs(self, batch: Batch, counting: bool = True) -> Iterator[None]:
        """Read the layer inputs of the forward passes run inside; ``counting`` False (another rank's turn or a
        filler batch under sharding) adds nothing."""
        modules = dict(self._model.named_modules())
        mask = batch.get("attention_mask")

        def hook_for(leader: str, width: int):
            def hook(_module: nn.Module, args: tuple) -> None:
                if not counting:
                    return  # another rank's turn or a filler batch under sharding: weighs nothing
                x = args[0].detach().reshape(-1, width)
                if mask is not None:  # (batch, tokens, d), or (batch·tokens, d) in OPT's MLP: the same token order
                    x = x[mask.reshape(-1).bool()]
                self._statistic(x, self.acc[leader])
                self.acc[f"{leader}#tokens"] += x.shape[0]

            return hook

        widths = {t.module: t.width for t in self.targets.values()}
        handles = [modules[lead].register_forward_pre_hook(hook_for(lead, widths[lead])) for lead in self.groups]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def update(self, batch: Batch, loss_fn: LossFn) -> None:
        if self._model is None:
            raise CwaError(f"{self.name} reads layer inputs: call scorer.attach(model) after bind.")
        with torch.no_grad(), self._reading_inputs(batch, self._counting):
            nll, tokens = loss_fn(batch)
        self._count(nll, tokens)

    def reduce(self, all_reduce) -> None:
        """Sum the per-input accumulators over processes, sharded or not: activations are never sharded,
        so unlike gradients nothing has summed them yet."""
        for tensor in self.acc.values():
            all_reduce(tensor)
        self._reduce_counters(all_reduce)

    def load_state_dict(self, state: dict) -> None:
        if set(state["acc"]) != set(self.acc):
            raise CwaError(f"the saved {self.name} accumulators do not match this model's layer inputs.")
        super().load_state_dict(state)

    def _per_input(self, leader: str) -> Tensor:
        """The per-input-channel factor of the score (d_in), computed from the group's accumulator."""
        raise NotImplementedError

    def compute(self) -> dict[str, Tensor]:
        self.check_finite()
        by_module = {t.module: t for t in self.targets.values()}
        scores: dict[str, Tensor] = {}
        for leader in list(self.groups):
            factor = self._per_input(leader)
            for module in self.groups[leader]:
                target = by_module[module]
                weight = _local(self.params[target.param].detach()).float()
                if target.transposed:  # Conv1D (in, out): rows are input channels (a row shard under FSDP2)
                    scores[target.param] = self._combine(
                        weight, local_slice(self.params[target.param], factor)[:, None]
                    )
                else:
                    scores[target.param] = self._combine(weight, factor[None, :])
        return {n: scores[n] for n in self.params if n in scores}  # parameter order

    @staticmethod
    def _combine(weight: Tensor, factor: Tensor) -> Tensor:
        raise NotImplementedError


class Wanda(_InputScorer):
    """Wanda: |W_ij| * ||X_j||_2 over every calibration token (padding excluded); forward passes only.

    Per distinct layer input cwa keeps d_in float64 sums of squares. Tensors that are not weights of a
    Linear or Conv1D layer are not scored: see ``unscored``.
    """

    name = "wanda"
    description = "|w_ij|·‖X_j‖₂, X_j the j-th input feature over all calibration tokens (Wanda)"

    def memory(self, layout: Layout, weight_bytes: int) -> MetricMemory:
        """No gradients: its float32 scores at the end, and d_in float64 sums per distinct layer input."""
        extras = {"float64 input sums (per distinct layer input)": sum(layout.input_widths) * 8}
        return MetricMemory(0, float32_accumulators(layout), extras)

    def _allocate(self, width: int, device: torch.device) -> Tensor:
        return torch.zeros(width, dtype=torch.float64, device=device)

    def _statistic(self, x: Tensor, acc: Tensor) -> None:
        acc += x.float().pow(2).sum(0)

    def _per_input(self, leader: str) -> Tensor:
        return self.acc[leader].sqrt().float()

    @staticmethod
    def _combine(weight: Tensor, factor: Tensor) -> Tensor:
        return weight.abs() * factor


def obs_memory_bytes(widths: Iterable[int]) -> dict[str, int]:
    """Memory ``obs`` needs for the given distinct layer-input widths.

    Args:
        widths: d_in of every distinct scored layer input.

    Returns:
        ``accumulators``: the X^T X sums held during accumulation (d_in^2 float64 up to
        ``FLOAT64_MAX_WIDTH``, float32 above); ``compute_extra``: what inverting adds at once (one Cholesky
        factor and one inverse of the widest input, inverted one group at a time); ``peak``: their sum.
    """
    widths = list(widths)
    item = [8 if w <= FLOAT64_MAX_WIDTH else 4 for w in widths]
    accumulators = sum(w * w * b for w, b in zip(widths, item, strict=True))
    extra = max((2 * w * w * b for w, b in zip(widths, item, strict=True)), default=0)
    return {"accumulators": accumulators, "compute_extra": extra, "peak": accumulators + extra}


class OBS(_InputScorer):
    """Optimal Brain Surgeon saliency (SparseGPT): w_ij^2 / [H^-1]_jj, H = (2/n) X^T X + lambda*mean(diag H)*I.

    One H per distinct layer input (q/k/v share one, gate/up share one), n the tokens that input saw.
    Memory: d_in^2 per distinct scored input, float32 (float64 up to ``FLOAT64_MAX_WIDTH`` wide), all held
    during accumulation; inverting (Cholesky, then ``cholesky_inverse``) runs one group at a time and frees
    each accumulator after use, adding at most two d_in^2 matrices of the widest input. One 14336-wide input
    (Llama-3.1-8B's down_proj) is 14336^2 * 4 B = 0.77 GiB; all 32 layers of that model hold about 33 GB, so
    score a subset of layers with ``include`` there. ``memory_bytes()`` states this run's bound.

    Args:
        damping: lambda, the damping relative to the mean of diag(H) (SparseGPT's percdamp). When the
            Cholesky factorization fails the damping is multiplied by 10 (up to 5 times) for that input; the
            raised values are reported in the facts under ``damping_raised``.
    """

    name = "obs"
    description = "w_ij² / [H⁻¹]_jj, H = (2/n)·XᵀX + λ·mean(diag H)·I per layer input (Optimal Brain Surgeon)"

    def __init__(self, damping: float = 0.01) -> None:
        super().__init__()
        if not damping > 0:
            raise CwaError(f"damping must be positive, got {damping}.")
        self.damping = damping
        self.damping_raised: dict[str, float] = {}

    def settings(self) -> dict:
        return {"damping": self.damping}

    def facts(self) -> dict:
        out = super().facts()
        if self.groups:
            out["memory_bound_mib"] = round(self.memory_bytes()["peak"] / 2**20, 3)
        if self.damping_raised:
            out["damping_raised"] = dict(self.damping_raised)
        return out

    def memory(self, layout: Layout, weight_bytes: int) -> MetricMemory:
        """No gradients: its float32 scores at the end, X^T X per distinct layer input and inverting one."""
        obs = obs_memory_bytes(layout.input_widths)
        extras = {"X^T X per distinct layer input": obs["accumulators"], "inverting one": obs["compute_extra"]}
        return MetricMemory(0, float32_accumulators(layout), extras)

    def memory_bytes(self) -> dict[str, int]:
        """The bound of ``obs_memory_bytes`` for this run's distinct inputs (after ``attach``)."""
        widths = {t.module: t.width for t in self.targets.values()}
        return obs_memory_bytes(widths[leader] for leader in self.groups)

    def _allocate(self, width: int, device: torch.device) -> Tensor:
        dtype = torch.float64 if width <= FLOAT64_MAX_WIDTH else torch.float32
        return torch.zeros((width, width), dtype=dtype, device=device)

    def _statistic(self, x: Tensor, acc: Tensor) -> None:
        x = x.to(acc.dtype)
        acc.addmm_(x.T, x)

    def _per_input(self, leader: str) -> Tensor:
        hessian = self.acc[leader]
        hessian.mul_(2.0 / max(float(self.acc[f"{leader}#tokens"]), 1.0))
        mean_diag = float(hessian.diagonal().mean())
        if mean_diag == 0.0:  # an input that was always zero: removing its weights changes nothing
            del self.acc[leader]
            return torch.full((hessian.shape[0],), math.inf, device=hessian.device)
        del hessian  # inverse_diagonal takes the accumulator out of self.acc and frees it early
        return inverse_diagonal(self.acc, leader, self.damping, mean_diag, self.damping_raised)

    @staticmethod
    def _combine(weight: Tensor, factor: Tensor) -> Tensor:
        return weight.pow(2) / factor


def inverse_diagonal(
    store: dict[str, Tensor], key: str, damping: float, mean_diag: float, raised: dict[str, float], tries: int = 6
) -> Tensor:
    """diag((H + damping * mean_diag * I)^-1) by Cholesky, H taken out of ``store[key]`` and freed as soon as
    its factor exists, so that at most two d x d matrices live at once (the factor and the inverse).

    Args:
        store: the accumulators; ``store[key]`` is the symmetric positive semi-definite H (removed).
        key: H's name, for ``raised`` and the messages.
        damping: the damping relative to ``mean_diag``.
        mean_diag: the mean of diag(H).
        raised: receives ``key -> relative damping used`` when the factorization needed more damping.
        tries: factorization attempts, the damping multiplied by 10 after each failure.
    """
    hessian = store.pop(key)
    added = 0.0
    for attempt in range(tries):
        relative = damping * 10**attempt
        hessian.diagonal().add_(relative * mean_diag - added)
        added = relative * mean_diag
        factor, info = torch.linalg.cholesky_ex(hessian)
        if int(info) == 0:
            del hessian
            if attempt:
                raised[key] = relative
                warnings.warn(
                    f"obs: H of '{key}' was not positive definite; damping raised to {relative:g}.", stacklevel=2
                )
            return torch.cholesky_inverse(factor).diagonal().float().clone()
        del factor
    raise CwaError(f"obs: H of '{key}' is not positive definite even with damping {damping * 10 ** (tries - 1):g}.")
