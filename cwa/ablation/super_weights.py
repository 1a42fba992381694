"""Super weights (Yu et al. 2024) from activations: forward hooks on every MLP output projection (pure torch).

A super weight W[row, col] of an MLP down-projection meets an input channel ``col`` that spikes (one
activation far above that layer's other channels) and writes the spike into output channel ``row``,
creating the "massive activation" of Sun et al. 2024 in the residual stream. One forward pass over a few
calibration blocks finds both spikes at every MLP output projection: the column is the channel of the
largest |input|, the row the channel of the largest |output|.

How far a spike stands out is its ratio to the layer's typical channel maximum: the median over channels
of each channel's largest |activation| over every (non-padding) token. A layer is a candidate when both
its input and its output spike clear ``threshold``; candidates are ranked by the output ratio (the
massive activation the weight creates), then the input ratio. Whether a candidate is a super weight is
decided by ablation (zeroing it alone must damage held-out perplexity), not here.

``row`` and ``col`` always mean (output channel, input channel), as in ``layers[l].mlp.down_proj.weight
[row, col]``; for GPT-2's ``Conv1D`` (weight stored (in, out)) the weight sits at ``weight[col, row]``,
which ``storage_index`` gives.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import Tensor, nn

from cwa.ablation.experts import ExpertScan, expert_scan, packed_experts, track_experts
from cwa.ablation.published import PublishedSuperWeight, published_super_weights
from cwa.common.errors import CwaError
from cwa.model.params import split_name

MLP_OUTPUT_PROJECTION = (
    r"(?:.*\.)?(?:layers|h|blocks|layer)\.\d+\.(?:mlp\.(?:down_proj|c_proj|dense_4h_to_h|fc_out|fc2)|fc2)"
)
"""The role "MLP output projection" by module name, matched against whole module names: ``mlp.down_proj``
(Llama, Mistral, Qwen2, Gemma, Phi-3, OLMo), ``mlp.c_proj`` (GPT-2 ``Conv1D``, GPT-BigCode),
``mlp.dense_4h_to_h`` (GPT-NeoX, Falcon, Bloom), ``mlp.fc_out`` (GPT-J), ``mlp.fc2`` (Phi-1/2) and ``fc2``
(OPT). Packed mixture-of-experts blocks (one 3-D ``down_proj`` for all experts) are scanned expert by expert
by :mod:`cwa.ablation.experts` in the same forward passes."""


@dataclass(frozen=True)
class Projection:
    """An MLP output projection: its layer index, module and weight names, and the weight's layout."""

    layer: int
    module: str
    parameter: str
    transposed: bool


def mlp_output_projections(model: nn.Module, pattern: str | None = None, required: bool = True) -> list[Projection]:
    """Every MLP output projection of ``model``, in layer order.

    Args:
        model: a causal LM.
        pattern: a regular expression matched against whole module names instead of the role rule
            ``MLP_OUTPUT_PROJECTION`` (e.g. ``.*\\.mlp\\.down_proj``); only ``Linear`` / ``Conv1D`` modules count.
        required: fail in one sentence when none matches (a model whose MLPs are all packed experts has none).
    """
    try:
        regex = re.compile(pattern or MLP_OUTPUT_PROJECTION)
    except re.error as exc:
        raise CwaError(f"projection pattern '{pattern}' is not a valid regular expression: {exc}.") from None
    found = []
    for name, module in model.named_modules():
        conv1d = type(module).__name__ == "Conv1D"
        if not (isinstance(module, nn.Linear) or conv1d) or not regex.fullmatch(name):
            continue
        layer, _ = split_name(f"{name}.weight")
        found.append(Projection(layer if layer is not None else len(found), name, f"{name}.weight", conv1d))
    if not found and required:
        raise CwaError(
            f"no MLP output projection matches '{pattern or 'the built-in rule'}' in {type(model).__name__}; "
            "pass a regular expression for the projection modules' names (e.g. '.*\\.mlp\\.down_proj')."
        )
    return found


@dataclass
class Spike:
    """The largest |activation| at one side of a projection and how far it stands out.

    Attributes:
        value: the largest |activation|.
        channel: its channel (the column for an input spike, the row for an output spike).
        block: the calibration block (sequence) where it occurs, counted over all batches.
        position: its token position in the block.
        token: the token id there.
        ratio: ``value`` over the median across channels of each channel's largest |activation|.
    """

    value: float
    channel: int
    block: int
    position: int
    token: int
    ratio: float


@dataclass
class LayerSpikes:
    """What one MLP output projection saw: the largest |input| (column) and |output| (row)."""

    layer: int
    module: str
    parameter: str
    input: Spike
    output: Spike


@dataclass
class Candidate:
    """A layer whose input and output spikes both clear the threshold, with the weight they point at.

    Attributes:
        rank: 1 for the strongest output spike.
        row: output channel (the output spike's channel); col: input channel (the input spike's).
        storage_index: (row, col) for ``Linear``, (col, row) for ``Conv1D``, (expert, row, col) for packed experts.
        weight: the weight's value; weight_rank: its rank within its tensor (its expert's matrix) by |w|.
        expert: the expert of a packed expert tensor, None for a dense MLP.
    """

    rank: int
    layer: int
    parameter: str
    row: int
    col: int
    storage_index: tuple[int, ...]
    weight: float
    weight_rank: int
    input_ratio: float
    output_ratio: float
    expert: int | None = None


@dataclass
class SuperWeightScan:
    """The result: every projection's spikes and the ranked candidates."""

    threshold: float
    blocks: int
    tokens: int
    layers: list[LayerSpikes]
    candidates: list[Candidate] = field(default_factory=list)
    experts: ExpertScan | None = None

    def to_rows(self) -> list[dict]:
        """One flat row per layer (dense MLP) or per expert (packed experts) for a CSV; candidate columns are
        empty where the layer or expert is not one."""
        by_layer = {(c.layer, c.parameter): c for c in self.candidates if c.expert is None}
        rows = []
        for record in self.layers:
            row: dict = {"layer": record.layer, "parameter": record.parameter}
            for side in ("input", "output"):
                row.update({f"{side}_{k}": v for k, v in asdict(getattr(record, side)).items()})
            candidate = by_layer.get((record.layer, record.parameter))
            row.update(
                {
                    "candidate_rank": candidate.rank if candidate else "",
                    "row": candidate.row if candidate else "",
                    "col": candidate.col if candidate else "",
                    "weight": candidate.weight if candidate else "",
                    "weight_rank": candidate.weight_rank if candidate else "",
                }
            )
            rows.append(row)
        return rows + self._expert_rows()

    def _expert_rows(self) -> list[dict]:
        if self.experts is None:
            return []
        by_expert = {(c.layer, c.expert): c for c in self.candidates if c.expert is not None}
        supers = {(e.layer, e.expert) for e in self.experts.super_experts}
        rows = []
        for e in self.experts.experts:
            candidate = by_expert.get((e.layer, e.expert))
            rows.append(
                {
                    "layer": e.layer,
                    "parameter": e.parameter,
                    "expert": e.expert,
                    "tokens": e.tokens,
                    "super_expert": (e.layer, e.expert) in supers,
                    "input_channel": e.col,
                    "input_ratio": e.input_ratio,
                    "output_value": e.output_max,
                    "output_channel": e.row,
                    "output_ratio": e.output_ratio,
                    "candidate_rank": candidate.rank if candidate else "",
                    "row": candidate.row if candidate else "",
                    "col": candidate.col if candidate else "",
                    "weight": candidate.weight if candidate else "",
                    "weight_rank": candidate.weight_rank if candidate else "",
                }
            )
        return rows


class _SideTracker:
    """Running per-channel maxima and the overall largest |activation| of one side of one projection."""

    def __init__(self) -> None:
        self.channel_max: Tensor | None = None
        self.best = Spike(-1.0, -1, -1, -1, -1, 0.0)

    def update(self, activation: Tensor, input_ids: Tensor, mask: Tensor | None, first_block: int) -> None:
        a = activation.detach().abs().float()
        if a.shape[:-1].numel() == input_ids.numel():
            # (batch, tokens, d) for most models, (batch·tokens, d) for OPT's MLP: the same token order
            a = a.reshape(*input_ids.shape[:2], a.shape[-1])
        elif a.dim() == 2:
            a = a.unsqueeze(0)
        if mask is not None and a.shape[:2] == mask.shape:
            a = a * mask[..., None].to(a.dtype)  # padding never counts
        per_channel = a.amax(dim=(0, 1))
        self.channel_max = per_channel if self.channel_max is None else torch.maximum(self.channel_max, per_channel)
        flat = int(a.reshape(-1).argmax())
        value = float(a.reshape(-1)[flat])
        if value > self.best.value:
            block, rest = divmod(flat, a.shape[1] * a.shape[2])
            position, channel = divmod(rest, a.shape[2])
            token = int(input_ids[block, position]) if input_ids.shape[:2] == a.shape[:2] else -1
            self.best = Spike(value, channel, first_block + block, position, token, 0.0)

    def result(self) -> Spike:
        median = float(self.channel_max.median()) if self.channel_max is not None else 0.0
        ratio = self.best.value / median if median > 0 else float("inf")
        return Spike(**{**asdict(self.best), "ratio": ratio})


@contextmanager
def _tracking(
    model: nn.Module, projections: list[Projection], state: dict
) -> Iterator[dict[str, tuple[_SideTracker, _SideTracker]]]:
    modules = dict(model.named_modules())
    trackers = {p.module: (_SideTracker(), _SideTracker()) for p in projections}

    def hook_for(name: str):
        def hook(_module: nn.Module, args: tuple, output: Tensor) -> None:
            ids, mask, first = state["input_ids"], state["mask"], state["first_block"]
            trackers[name][0].update(args[0], ids, mask, first)
            trackers[name][1].update(output, ids, mask, first)

        return hook

    handles = [modules[p.module].register_forward_hook(hook_for(p.module)) for p in projections]
    try:
        yield trackers
    finally:
        for handle in handles:
            handle.remove()


def find_super_weights(
    model: nn.Module,
    batches: Iterable[dict[str, Tensor]],
    pattern: str | None = None,
    threshold: float = 10.0,
) -> SuperWeightScan:
    """Record the activation spikes at every MLP output projection over ``batches`` (forward passes only).

    Args:
        model: a causal LM (not sharded).
        batches: calibration batches with ``input_ids`` and optionally ``attention_mask`` (padding is ignored).
        pattern: regular expression for the projection modules' names; None uses ``MLP_OUTPUT_PROJECTION``.
        threshold: a layer is a candidate when its largest |input| and its largest |output| are both at least
            this many times the layer's median channel maximum on that side.
    """
    if not threshold > 0:
        raise CwaError(f"threshold must be positive, got {threshold}.")
    blocks = packed_experts(model)
    projections = mlp_output_projections(model, pattern, required=not blocks)
    state: dict = {"first_block": 0}
    tokens = 0
    with (
        _tracking(model, projections, state) as trackers,
        track_experts(model, blocks, state) as expert_trackers,
        torch.no_grad(),
    ):
        for batch in batches:
            ids, mask = batch["input_ids"], batch.get("attention_mask")
            state.update(input_ids=ids, mask=mask)
            model(input_ids=ids, attention_mask=mask)
            state["first_block"] += ids.shape[0]
            tokens += int(mask.sum()) if mask is not None else ids.numel()
    if state["first_block"] == 0:
        raise CwaError("find_super_weights got no calibration batch.")
    layers = [
        LayerSpikes(p.layer, p.module, p.parameter, trackers[p.module][0].result(), trackers[p.module][1].result())
        for p in projections
    ]
    scan = SuperWeightScan(threshold, state["first_block"], tokens, layers)
    scan.candidates = _candidates(model, projections, layers, threshold)
    if blocks:
        scan.experts = expert_scan(model, blocks, expert_trackers, threshold)
        in_experts = [Candidate(**asdict(c)) for c in scan.experts.candidates]
        ranked = sorted(scan.candidates + in_experts, key=lambda c: (-c.output_ratio, -c.input_ratio, c.layer))
        scan.candidates = [replace(c, rank=rank) for rank, c in enumerate(ranked, start=1)]
    return scan


def _candidates(
    model: nn.Module, projections: list[Projection], layers: list[LayerSpikes], threshold: float
) -> list[Candidate]:
    params = dict(model.named_parameters(remove_duplicate=False))
    chosen = [
        (p, r) for p, r in zip(projections, layers, strict=True) if min(r.input.ratio, r.output.ratio) >= threshold
    ]
    chosen.sort(key=lambda pr: (-pr[1].output.ratio, -pr[1].input.ratio, pr[0].layer))
    out = []
    for rank, (projection, record) in enumerate(chosen, start=1):
        weight = params[projection.parameter].detach()
        if callable(getattr(weight, "full_tensor", None)):
            weight = weight.full_tensor()
        row, col = record.output.channel, record.input.channel
        index = (col, row) if projection.transposed else (row, col)
        value = weight[index]
        out.append(
            Candidate(
                rank=rank,
                layer=projection.layer,
                parameter=projection.parameter,
                row=row,
                col=col,
                storage_index=index,
                weight=float(value),
                weight_rank=int((weight.abs() > value.abs()).sum()) + 1,
                input_ratio=record.input.ratio,
                output_ratio=record.output.ratio,
            )
        )
    return out


def recovered_published(scan: SuperWeightScan, model_name: str) -> list[tuple[PublishedSuperWeight, Candidate | None]]:
    """For a model with published super weights, each published coordinate and the candidate that recovered it.

    Args:
        scan: the result of ``find_super_weights``.
        model_name: the analysed model's hub name or local directory (matched as ``published_super_weights``
            matches it).

    Returns:
        (published coordinate, the candidate at the same (layer, row, col) or None), one pair per coordinate;
        empty when no coordinates are published for the model.
    """
    found = {(c.layer, c.row, c.col): c for c in scan.candidates}
    return [(p, found.get((p.layer, p.row, p.col))) for p in published_super_weights(model_name)]
