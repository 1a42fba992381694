"""Mixture-of-experts blocks whose experts are packed into 3-D tensors (pure torch).

transformers stores the experts of Mixtral, Qwen-MoE and OLMoE blocks as two parameters of one module:
``gate_up_proj`` (experts, 2·intermediate, hidden) and ``down_proj`` (experts, hidden, intermediate). A weight
of such a tensor is named by (expert, row, column): ``down_proj[e, row, col]``, row the output channel.

The expert module is called with the routed tokens' hidden states, each token's chosen experts and their
routing weights; a forward hook recomputes, for every expert, its down-projection's input (``act(gate) ·
up``) and output over the tokens routed to it (before the routing weight scales it), from the module's own
parameters. That gives, per expert, the largest |output| (super experts, Su et al. 2025: an expert whose
largest output magnitude is above the 99.5th percentile of all experts' and above a tenth of its layer's
largest) and the input and output spikes of its down-projection (super weights inside an expert, found as
``cwa.ablation.super_weights`` finds them in dense MLPs).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cwa.model.params import split_name


@dataclass(frozen=True)
class PackedExperts:
    """One expert module: its layer, module name, the down-projection parameter's name and the expert count."""

    layer: int
    module: str
    parameter: str
    experts: int


def packed_experts(model: nn.Module) -> list[PackedExperts]:
    """Every module holding packed experts (a 3-D ``gate_up_proj`` and ``down_proj`` and an ``act_fn``)."""
    found = []
    for name, module in model.named_modules():
        gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
        if not (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter)) or down.dim() != 3:
            continue
        if not callable(getattr(module, "act_fn", None)):
            continue
        layer, _ = split_name(f"{name}.down_proj")
        found.append(
            PackedExperts(layer if layer is not None else len(found), name, f"{name}.down_proj", down.shape[0])
        )
    return found


@dataclass
class ExpertSpikes:
    """What one expert's down-projection saw over the tokens routed to it.

    Attributes:
        tokens: tokens routed to the expert.
        output_max: its largest |output| (the super-expert statistic).
        row, col: channels of the largest |output| and |input|.
        output_ratio, input_ratio: each over the median across channels of each channel's largest |value|.
    """

    layer: int
    expert: int
    parameter: str
    tokens: int
    output_max: float
    row: int
    col: int
    output_ratio: float
    input_ratio: float


@dataclass
class ExpertCandidate:
    """A weight ``down_proj[expert, row, col]`` whose expert's input and output spikes both clear the threshold."""

    rank: int
    layer: int
    expert: int
    parameter: str
    row: int
    col: int
    storage_index: tuple[int, int, int]
    weight: float
    weight_rank: int
    input_ratio: float
    output_ratio: float


class _ExpertTracker:
    """Running per-channel maxima of one expert's down-projection input and output."""

    def __init__(self) -> None:
        self.tokens = 0
        self.inputs: Tensor | None = None
        self.outputs: Tensor | None = None

    def update(self, h: Tensor, y: Tensor) -> None:
        self.tokens += h.shape[0]
        a, b = h.abs().amax(0).float(), y.abs().amax(0).float()
        self.inputs = a if self.inputs is None else torch.maximum(self.inputs, a)
        self.outputs = b if self.outputs is None else torch.maximum(self.outputs, b)

    def result(self, layer: int, expert: int, parameter: str) -> ExpertSpikes:
        if self.inputs is None:
            return ExpertSpikes(layer, expert, parameter, 0, 0.0, -1, -1, 0.0, 0.0)

        def ratio(channels: Tensor) -> float:
            median = float(channels.median())
            return float(channels.max()) / median if median > 0 else float("inf")

        return ExpertSpikes(
            layer,
            expert,
            parameter,
            self.tokens,
            float(self.outputs.max()),
            int(self.outputs.argmax()),
            int(self.inputs.argmax()),
            ratio(self.outputs),
            ratio(self.inputs),
        )


def _routed(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor]:
    """(hidden states (tokens, d), chosen experts (tokens, k)) from an expert module's call."""
    values = list(args) + [kwargs[k] for k in ("hidden_states", "top_k_index") if k in kwargs]
    return values[0], values[1]


@contextmanager
def track_experts(
    model: nn.Module, blocks: list[PackedExperts], state: dict
) -> Iterator[dict[str, list[_ExpertTracker]]]:
    """Hooks on the expert modules ``blocks`` while inside; ``state["mask"]`` is the current batch's attention
    mask (or None). Yields module name -> one tracker per expert."""
    modules = dict(model.named_modules())
    trackers = {b.module: [_ExpertTracker() for _ in range(b.experts)] for b in blocks}

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, _output: object) -> None:
            hidden, chosen = _routed(args, kwargs)
            hidden = hidden.reshape(-1, hidden.shape[-1])
            chosen = chosen.reshape(hidden.shape[0], -1)
            mask = state.get("mask")
            if mask is not None and mask.numel() == hidden.shape[0]:  # the tokens in input order: drop padding
                keep = mask.reshape(-1).bool()
                hidden, chosen = hidden[keep], chosen[keep]
            for expert, tracker in enumerate(trackers[name]):
                tokens = (chosen == expert).any(dim=1)
                if not bool(tokens.any()):
                    continue
                x = hidden[tokens]
                gate, up = nn.functional.linear(x, module.gate_up_proj[expert]).chunk(2, dim=-1)
                h = module.act_fn(gate) * up
                tracker.update(h, nn.functional.linear(h, module.down_proj[expert]))

        return hook

    handles = [modules[b.module].register_forward_hook(hook_for(b.module), with_kwargs=True) for b in blocks]
    try:
        yield trackers
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class ExpertScan:
    """Every expert's spikes, the super experts and the in-expert super-weight candidates."""

    experts: list[ExpertSpikes]
    super_experts: list[ExpertSpikes]
    candidates: list[ExpertCandidate]
    percentile: float


def scan_experts(
    model: nn.Module, batches: Iterable[dict[str, Tensor]], threshold: float = 10.0, percentile: float = 99.5
) -> ExpertScan | None:
    """Forward passes over ``batches`` with hooks on every packed expert module; None for a model without one.

    Args:
        model: a causal LM (not sharded).
        batches: batches with ``input_ids`` and optionally ``attention_mask`` (padding is ignored).
        threshold: an expert's down-projection weight is a candidate when its input and output spikes are both
            at least this many times the expert's median channel maximum on that side.
        percentile: a super expert's largest |output| is above this percentile of all experts'.
    """
    blocks = packed_experts(model)
    if not blocks:
        return None
    state: dict = {}
    with track_experts(model, blocks, state) as trackers, torch.no_grad():
        for batch in batches:
            state["mask"] = batch.get("attention_mask")
            model(input_ids=batch["input_ids"], attention_mask=state["mask"])
    return expert_scan(model, blocks, trackers, threshold, percentile)


def expert_scan(
    model: nn.Module,
    blocks: list[PackedExperts],
    trackers: dict[str, list[_ExpertTracker]],
    threshold: float = 10.0,
    percentile: float = 99.5,
) -> ExpertScan:
    """The result of tracked forward passes (``track_experts``): every expert, the super experts, the candidates.

    Args:
        model: the model the trackers watched.
        blocks: its expert modules.
        trackers: what ``track_experts`` yielded.
        threshold: see ``scan_experts``.
        percentile: see ``scan_experts``.
    """
    experts = [t.result(b.layer, e, b.parameter) for b in blocks for e, t in enumerate(trackers[b.module])]
    return ExpertScan(experts, super_experts(experts, percentile), _candidates(model, experts, threshold), percentile)


def super_experts(experts: list[ExpertSpikes], percentile: float = 99.5) -> list[ExpertSpikes]:
    """Su et al. 2025's rule: largest |output| above the ``percentile``-th percentile over all experts and above
    a tenth of the largest in its layer; strongest first."""
    routed = [e for e in experts if e.tokens]
    if not routed:
        return []
    cut = float(torch.quantile(torch.tensor([e.output_max for e in routed], dtype=torch.float64), percentile / 100))
    layer_max: dict[int, float] = {}
    for e in routed:
        layer_max[e.layer] = max(layer_max.get(e.layer, 0.0), e.output_max)
    chosen = [e for e in routed if e.output_max > cut and e.output_max > layer_max[e.layer] / 10]
    return sorted(chosen, key=lambda e: (-e.output_max, e.layer, e.expert))


def _candidates(model: nn.Module, experts: list[ExpertSpikes], threshold: float) -> list[ExpertCandidate]:
    params = dict(model.named_parameters())
    chosen = [e for e in experts if e.tokens and min(e.input_ratio, e.output_ratio) >= threshold]
    chosen.sort(key=lambda e: (-e.output_ratio, -e.input_ratio, e.layer, e.expert))
    out = []
    for rank, e in enumerate(chosen, start=1):
        weight = params[e.parameter].detach()[e.expert]
        value = weight[e.row, e.col]
        out.append(
            ExpertCandidate(
                rank=rank,
                layer=e.layer,
                expert=e.expert,
                parameter=e.parameter,
                row=e.row,
                col=e.col,
                storage_index=(e.expert, e.row, e.col),
                weight=float(value),
                weight_rank=int((weight.abs() > value.abs()).sum()) + 1,
                input_ratio=e.input_ratio,
                output_ratio=e.output_ratio,
            )
        )
    return out
