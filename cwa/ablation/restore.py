"""Activation restore: while weights are perturbed, write back the unperturbed output of their layer at
their output channels, and measure how much of the damage that recovers (pure torch, no Lightning).

A weight acts on the model through the output of the module that holds it: ``W[row, col]`` of a
``Linear`` only ever changes output channel ``row`` of that module (``Conv1D`` stores its weight
(in, out), so its output channel is the storage column), a bias or a norm's scale entry ``i`` only
channel ``i``, an embedding entry ``E[token, dim]`` only channel ``dim``. A :class:`Recorder` (forward
hooks) keeps those channels of the module outputs during an unperturbed pass, batch by batch; a
:class:`Replayer` (forward hooks) writes the recorded values back into the perturbed pass. Restoring
every token of the channels undoes a perturbation that only acts through them exactly (the module
outputs, and so everything after them, are the baseline's bits); restoring only the *spike* tokens,
where the baseline channel is massive, is the Super Weight paper's experiment (Yu et al. 2024 restore
the super activation while the super weight stays zeroed).

The recovered fraction of the damage, with mean NLL over held-out tokens,
``f = (NLL_perturbed − NLL_restored) / (NLL_perturbed − NLL_baseline)``, gets a paired studentized
bootstrap interval over sequences (:func:`recovered_fraction`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from cwa.ablation.stats import SequenceStats, studentized_interval
from cwa.common.errors import CwaError
from cwa.model.params import ParamInfo

RestoreMode = Literal["all", "spikes"]
RESTORE_MODES: tuple[str, ...] = ("all", "spikes")
MAX_RESTORE_CHANNELS = 4096
"""At most this many (module, channel) pairs are recorded: all held-out tokens of each are kept in memory."""

Channels = dict[str, Tensor]
"""Module name -> sorted, unique int64 output channels."""


# -- which channels a selection touches ------------------------------------------------------------
def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"  # transformers.pytorch_utils.Conv1D: weight is (in, out)


def _param_channels(name: str, module: nn.Module, index: Tensor, info: ParamInfo | None) -> Tensor:
    """Output channels of ``module`` that the flat ``index`` entries of its parameter ``name`` write into."""
    attribute = name.rsplit(".", 1)[-1]
    param = getattr(module, attribute)
    if isinstance(module, nn.Embedding) and attribute == "weight":
        return index % param.shape[1]  # E[token, dim] writes output channel dim
    if param.dim() == 1:
        return index  # a bias, or a norm's scale or shift: entry i is output channel i
    if param.dim() == 2 and (isinstance(module, nn.Linear) or _is_conv1d(module)):
        transposed = info.transposed if info is not None else _is_conv1d(module)
        layout = ParamInfo(name, tuple(param.shape), None, "", transposed)
        return layout.row_col(index)[0]  # the output row (layout-aware)
    raise CwaError(
        f"activation restore cannot tell which output channel '{name}' writes ({type(module).__name__}, "
        f"{param.dim()}-D); restore works on Linear, Conv1D, Embedding weights and 1-D parameters."
    )


def output_channels(
    model: nn.Module, selection: Mapping[str, Tensor], infos: Mapping[str, ParamInfo] | None = None
) -> Channels:
    """The modules that hold the selected weights and the output channels those weights write into.

    Args:
        model: the model whose parameters ``selection`` names.
        selection: parameter name -> flat indices (a :data:`cwa.ablation.perturbations.Selection`).
        infos: parameter layouts (``transposed`` for GPT-2 ``Conv1D``); a parameter not in it is read
            from its module's type.
    """
    channels: dict[str, list[Tensor]] = {}
    for name, index in selection.items():
        if index.numel() == 0:
            continue
        module_name = name.rsplit(".", 1)[0] if "." in name else ""
        module = model.get_submodule(module_name)
        found = _param_channels(name, module, index.cpu().long(), (infos or {}).get(name))
        channels.setdefault(module_name, []).append(found)
    out = {m: torch.unique(torch.cat(parts)) for m, parts in channels.items()}
    total = sum(int(c.numel()) for c in out.values())
    if total > MAX_RESTORE_CHANNELS:
        raise CwaError(
            f"activation restore would record {total} output channels (at most {MAX_RESTORE_CHANNELS}, every "
            "held-out token of each is kept in memory); restore fewer weights (lower ks or single)."
        )
    return out


def _subset_positions(recorded: Tensor, wanted: Tensor) -> Tensor:
    """Positions of ``wanted`` channels in the sorted ``recorded`` channels (each must be there)."""
    position = torch.searchsorted(recorded, wanted).clamp(max=max(recorded.numel() - 1, 0))
    if recorded.numel() == 0 or not torch.equal(recorded[position], wanted):
        raise ValueError("a restored channel was not recorded in the baseline pass.")
    return position


def _module_output(module_name: str, output: object) -> Tensor:
    if not isinstance(output, Tensor):
        raise CwaError(f"activation restore needs module '{module_name}' to return one tensor, not {type(output)}.")
    return output


# -- recording and replaying -----------------------------------------------------------------------
@dataclass
class Recorder:
    """Channels of module outputs, kept per batch of one pass: ``values[module][batch]`` is a
    (sequences, tokens, channels) tensor on the CPU, in the module's output dtype (bit for bit)."""

    channels: Channels
    values: dict[str, list[Tensor]] = field(default_factory=dict)
    batch: int = 0

    def at_batch(self, batch: int) -> None:
        """The evaluation loop's hook point: the next forward pass is batch ``batch``."""
        self.batch = batch

    def hook(self, module_name: str):
        index = self.channels[module_name]

        def record(module: nn.Module, args: object, output: object) -> None:
            out = _module_output(module_name, output)
            batches = self.values.setdefault(module_name, [])
            if self.batch != len(batches):
                raise RuntimeError(f"module '{module_name}' ran twice in one batch or batches came out of order.")
            batches.append(out.index_select(-1, index.to(out.device)).detach().cpu())

        return record

    def magnitude_median(self, module_name: str) -> Tensor:
        """Per channel, the median over every recorded token of |value| (the mean of the two middle values
        for an even count), as float64."""
        flat = torch.cat([v.reshape(-1, v.shape[-1]) for v in self.values[module_name]]).double().abs()
        ordered = flat.sort(dim=0).values
        n = ordered.shape[0]
        return (ordered[(n - 1) // 2] + ordered[n // 2]) / 2

    def spikes(self, module_name: str, threshold: float) -> list[Tensor]:
        """Per batch, (sequences, tokens, channels): True where |value| ≥ ``threshold`` · the channel's median
        |value| over every recorded token."""
        limit = threshold * self.magnitude_median(module_name)
        return [v.double().abs() >= limit for v in self.values[module_name]]


@contextmanager
def recording(model: nn.Module, channels: Channels) -> Iterator[Recorder]:
    """Record ``channels`` of each module's output during the block; the hooks are removed on exit, also on error.

    Args:
        model: the model.
        channels: module name -> output channels (from :func:`output_channels`).
    """
    recorder = Recorder({m: c.long() for m, c in channels.items()})
    with ExitStack() as stack:
        for module_name in recorder.channels:
            handle = model.get_submodule(module_name).register_forward_hook(recorder.hook(module_name))
            stack.callback(handle.remove)
        yield recorder


@dataclass
class Replayer:
    """Writes recorded channel values into module outputs, batch by batch; counts what it restored."""

    recorder: Recorder
    channels: Channels
    masks: dict[str, list[Tensor]] | None  # None: every token; else per module, per batch, where to restore
    batch: int = 0
    restored: int = 0  # (token, channel) values written back, over the whole pass

    def at_batch(self, batch: int) -> None:
        """The evaluation loop's hook point: the next forward pass is batch ``batch``."""
        self.batch = batch

    def hook(self, module_name: str):
        recorded = self.recorder.channels[module_name]
        wanted = self.channels[module_name].long()
        position = _subset_positions(recorded, wanted)

        def replay(module: nn.Module, args: object, output: object) -> Tensor:
            out = _module_output(module_name, output)
            value = self.recorder.values[module_name][self.batch].index_select(-1, position)
            if value.shape[:-1] != out.shape[:-1]:
                raise RuntimeError(f"module '{module_name}' output does not match its recording in batch {self.batch}.")
            value = value.to(device=out.device, dtype=out.dtype)
            index = wanted.to(out.device)
            if self.masks is None:
                self.restored += value.numel()
            else:
                mask = self.masks[module_name][self.batch].index_select(-1, position).to(out.device)
                value = torch.where(mask, value, out.index_select(-1, index))
                self.restored += int(mask.sum())
            return out.index_copy(-1, index, value)

        return replay


@contextmanager
def replaying(
    model: nn.Module, recorder: Recorder, channels: Channels, mode: RestoreMode = "all", threshold: float = 10.0
) -> Iterator[Replayer]:
    """Overwrite ``channels`` of the module outputs with ``recorder``'s values during the block; the hooks are
    removed on exit, also on error.

    Args:
        model: the model (perturbed or not).
        recorder: a finished recording of an unperturbed pass over the same batches, holding ``channels``.
        channels: module name -> output channels to restore (a subset of the recorded ones).
        mode: ``all`` (every token) or ``spikes`` (only tokens where the baseline |value| is at least
            ``threshold`` times the channel's median |value| over all recorded tokens).
        threshold: the spike threshold of ``spikes``.
    """
    if mode not in RESTORE_MODES:
        raise CwaError(f"unknown restore mode '{mode}': use {' or '.join(RESTORE_MODES)}.")
    masks = None if mode == "all" else {m: recorder.spikes(m, threshold) for m in channels}
    replayer = Replayer(recorder, channels, masks)
    with ExitStack() as stack:
        for module_name in channels:
            handle = model.get_submodule(module_name).register_forward_hook(replayer.hook(module_name))
            stack.callback(handle.remove)
        yield replayer


# -- the recovered fraction ------------------------------------------------------------------------
def fraction_replicates(
    base: SequenceStats, perturbed: SequenceStats, restored: SequenceStats, weights: Tensor
) -> tuple[Tensor, Tensor]:
    """f = (P − R) / (P − B) on the full sample and on each resample, with its delta-method standard error.

    P, R, B are the token-weighted mean NLLs Σ w_i x_i / Σ w_i t_i of the perturbed, restored and baseline
    passes (the same sequences and token counts). With N = P − R and D = P − B, sequence i's influence on N
    is (xp_i − xr_i − N t_i) / Σ w t, on D (xp_i − xb_i − D t_i) / Σ w t, and on f = N / D
    u_i = (u_N,i − f u_D,i) / D; the standard error is sqrt(Σ w_i u_i²).

    Args:
        base: the unperturbed pass.
        perturbed: the perturbed pass.
        restored: the perturbed pass with the activations restored.
        weights: (resamples, n) multiplicities from :func:`cwa.ablation.stats.bootstrap_weights`.

    Returns:
        (f, se), each (1 + resamples,): index 0 is the full sample, then one per resample.
    """
    w = torch.cat([torch.ones_like(weights[:1]), weights])
    total = base.tokens @ w.T
    lost = perturbed.nll - restored.nll  # per sequence: P − R before dividing by tokens
    damage = perturbed.nll - base.nll
    numerator, denominator = (lost @ w.T) / total, (damage @ w.T) / total
    fraction = numerator / denominator
    u_n = lost.unsqueeze(0) - numerator.unsqueeze(-1) * base.tokens
    u_d = damage.unsqueeze(0) - denominator.unsqueeze(-1) * base.tokens
    u = (u_n - fraction.unsqueeze(-1) * u_d) / (denominator * total).unsqueeze(-1)
    return fraction, (u.square() * w).sum(-1).sqrt()


def recovered_fraction(
    base: SequenceStats,
    perturbed: SequenceStats,
    restored: SequenceStats,
    weights: Tensor,
    confidence: float = 0.95,
    damage_interval: tuple[float, float] | None = None,
) -> tuple[float, float | None, float | None]:
    """The fraction of the NLL damage recovered by restoring, with a paired studentized bootstrap interval.

    Undefined (NaN, no interval) where a pass is non-finite or there is no damage; the interval is None
    when ``damage_interval`` (the perturbed pass's Δ NLL interval) includes 0: a ratio whose
    denominator may be zero has no finite bounds.

    Args:
        base: the unperturbed pass.
        perturbed: the perturbed pass.
        restored: the perturbed and restored pass.
        weights: resample multiplicities shared with the other intervals.
        confidence: coverage of the interval.
        damage_interval: (low, high) of the perturbed pass's Δ mean NLL against the baseline.

    Returns:
        (fraction, low, high).
    """
    if any(bool(s.broken.any()) for s in (base, perturbed, restored)):
        return math.nan, None, None
    theta, se = fraction_replicates(base, perturbed, restored, weights)
    estimate = float(theta[0])
    if not math.isfinite(estimate):
        return math.nan, None, None
    if damage_interval is not None and damage_interval[0] <= 0 <= damage_interval[1]:
        return estimate, None, None
    finite = torch.isfinite(theta) & torch.isfinite(se)
    theta, se = theta[finite], se[finite]  # a resample without damage has no ratio
    low, high = studentized_interval(theta, se, confidence)
    return estimate, float(low), float(high)
