"""Memory per rank of ``cwa fit-sensitivity``, from a model's layout alone (no Lightning, no weights).

One pure function, :func:`plan_memory`, serves both the dry run (``cwa fit-sensitivity --dry_run true``)
and ``scripts/sizing.py``. It reads only parameter shapes, so it runs on a model built on the meta device.

What is counted, per rank, for the rank holding the most (rank 0: FSDP2 gives each rank ``ceil(rows / W)``
rows of every tensor, the last ranks fewer):

* weights: every parameter's row shard in the model's dtype, plus, when sharded over more than one rank,
  one unsharded FSDP unit while it runs (the largest of: a decoder layer; the root's own parameters, i.e.
  embeddings, final norm and an untied LM head). DDP and one process hold the whole model.
* the metric's part (:class:`MetricMemory`), which each scorer states in its ``memory`` method: the gradients
  it keeps (only scored tensors get gradients; the rest are frozen), its accumulators (float32, one per
  scored weight by default) and its extras (probes, weight backups, layer-input statistics...). The helpers
  below count the common cases.
* sharded, one whole float32 score tensor gathered while ``scores.safetensors`` is written.

Not counted: activations (batch x seq_len dependent; double backward's graph is one), the framework's own
memory (CUDA context, allocator caches; on a CPU 0.5-1 GB for Python, torch and transformers) and
communication buffers. The total is the sum of the parts, an upper bound: not every transient peaks at once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn

from cwa.common.errors import CwaError

if TYPE_CHECKING:  # the scorers import this module for their memory models
    from cwa.scoring.base import Scorer

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Layout:
    """Parameter counts of a model under a sharding plan (numbers of elements, not bytes).

    Attributes:
        world: processes; ``shards``: ranks each tensor is split over (``world`` under FSDP2, else 1).
        total / rank_total: every parameter (tied ones once), whole / on the fullest rank.
        scored / rank_scored: the scored tensors, whole / on the fullest rank.
        largest_scored / rank_largest_scored: the largest scored tensor, whole / its shard.
        largest_unit / largest_unit_scored: the largest FSDP unit (all its parameters / its scored ones).
        input_widths: d_in of every distinct layer input the metric reads (``wanda``, ``obs``).
    """

    world: int
    shards: int
    total: int
    rank_total: int
    scored: int
    rank_scored: int
    largest_scored: int
    rank_largest_scored: int
    largest_unit: int
    largest_unit_scored: int
    input_widths: tuple[int, ...] = ()

    @property
    def sharded(self) -> bool:
        return self.shards > 1


@dataclass
class Memory:
    """Bytes per rank: the parts of :func:`plan_memory`'s estimate."""

    weights: int
    gradients: int
    accumulators: int
    extras: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.accumulators + sum(self.extras.values())


@dataclass(frozen=True)
class MetricMemory:
    """A metric's side of :class:`Memory` (bytes on the fullest rank): what a scorer's ``memory`` returns.

    Attributes:
        gradients: gradients held at the peak (with their graph, for double backward).
        accumulators: the accumulators, which become the scores.
        extras: anything else, by what it is (probes, a weight backup, layer-input statistics).
    """

    gradients: int
    accumulators: int
    extras: dict[str, int] = field(default_factory=dict)


def shard_numel(shape: tuple[int, ...], shards: int) -> int:
    """Elements of the fullest rank's row shard (``Shard(0)``, ``ceil(rows / shards)`` rows) of a tensor."""
    if not shape:
        return 1
    rows = math.ceil(shape[0] / shards)
    return rows * math.prod(shape[1:])


def model_layout(
    model: nn.Module, scored: Iterable[str], world: int, sharded: bool, input_widths: Iterable[int] = ()
) -> Layout:
    """Count what each rank holds of ``model`` (on any device, the meta device included).

    Args:
        model: the causal LM.
        scored: names of the scored parameters (as ``model.named_parameters()`` gives them).
        world: number of processes (devices x nodes).
        sharded: FSDP2 (row shards over all ``world`` ranks, one unit per decoder layer and the root);
            False for DDP and one process, which replicate the model.
        input_widths: d_in of each distinct layer input read by ``wanda`` / ``obs``.
    """
    from cwa.model.sharding import decoder_layers

    if world < 1:
        raise CwaError(f"the world size must be at least 1, got {world}.")
    shards = world if sharded else 1
    params = dict(model.named_parameters())  # tied weights once
    chosen = set(scored)
    if not chosen <= set(params):
        raise CwaError(f"'{sorted(chosen - set(params))[0]}' is not a parameter of the model.")
    in_layers = {id(p) for layer in decoder_layers(model) for p in layer.parameters()}
    units = [list(layer.parameters()) for layer in decoder_layers(model)]
    units.append([p for p in params.values() if id(p) not in in_layers])  # the root's own parameters
    scored_ids = {id(params[n]) for n in chosen}
    scored_shapes = [tuple(params[n].shape) for n in chosen]
    largest = max(scored_shapes, key=math.prod, default=())
    return Layout(
        world=world,
        shards=shards,
        total=sum(p.numel() for p in params.values()),
        rank_total=sum(shard_numel(tuple(p.shape), shards) for p in params.values()),
        scored=sum(math.prod(s) for s in scored_shapes),
        rank_scored=sum(shard_numel(s, shards) for s in scored_shapes),
        largest_scored=math.prod(largest) if chosen else 0,
        rank_largest_scored=shard_numel(largest, shards) if chosen else 0,
        largest_unit=max(sum(p.numel() for p in unit) for unit in units),
        largest_unit_scored=max(sum(p.numel() for p in unit if id(p) in scored_ids) for unit in units),
        input_widths=tuple(input_widths),
    )


def float32_accumulators(layout: Layout) -> int:
    """One float32 accumulator for every scored weight's shard."""
    return layout.rank_scored * 4


def consumed_gradients(layout: Layout, b: int) -> int:
    """Gradients consumed by a hook as each is ready: one unit's unsharded ones plus one shard (sharded)."""
    if layout.sharded:
        return layout.largest_unit_scored * b + layout.rank_largest_scored * b
    return layout.largest_scored * b


def gradient_casts(layout: Layout, b: int) -> dict[str, int]:
    """A 16-bit gradient squared in float32: the casts of one gradient shard (nothing for float32 weights)."""
    return {"float32 casts of one gradient": 2 * layout.rank_largest_scored * 4} if b < 4 else {}


def probe_draw(layout: Layout) -> int:
    """Transient of drawing one whole-tensor Rademacher probe (``HutchinsonDiag.probe``): random bytes (n/8),
    two uint8 bit tensors and, sharded, the whole float32 probe before this rank's rows are copied out."""
    n = layout.largest_scored
    return math.ceil(n / 8) + (n + 4 * n if layout.sharded else 2 * n)


def plan_memory(layout: Layout, scorer: Scorer, dtype: str, save_scores: str = "float32") -> Memory:
    """Bytes per rank (the fullest rank) of a fit-sensitivity run; see the module docstring for the model.

    Args:
        layout: what each rank holds (:func:`model_layout`).
        scorer: the metric with its options: its ``memory`` method gives its part.
        dtype: the weights' dtype (``float32``, ``bfloat16``, ``float16``).
        save_scores: ``scores.safetensors``'s dtype or ``off``: a sharded run gathers one whole float32
            score tensor at a time to write it.
    """
    if dtype not in DTYPE_BYTES:
        raise CwaError(f"unknown dtype '{dtype}': use float32, bfloat16 or float16.")
    b = DTYPE_BYTES[dtype]
    weights = layout.rank_total * b + (layout.largest_unit * b if layout.sharded else 0)
    metric = scorer.memory(layout, b)
    extras = dict(metric.extras)
    if layout.sharded and save_scores != "off":
        extras["writing scores: one whole score tensor"] = layout.largest_scored * 4
    return Memory(weights, metric.gradients, metric.accumulators, {k: v for k, v in extras.items() if v})


def gib(n: int | float, unit: int = GIB) -> str:
    """``n`` bytes in ``unit`` (GiB by default) with two decimals."""
    return f"{n / unit:.2f}"


def format_memory(memory: Memory, title: str, device: tuple[str, int] | None) -> str:
    """A plain-text table of one rank's memory, its parts named, and how it compares to the device.

    Args:
        memory: the estimate.
        title: the first line (what was planned).
        device: (name, bytes) of the GPU the run would use, or None where none is checked.
    """
    rows = [
        ("weights", memory.weights),
        ("gradients", memory.gradients),
        ("accumulators (float32)", memory.accumulators),
    ]
    rows += [(f"+ {name}", value) for name, value in memory.extras.items()]
    rows.append(("total", memory.total))
    width = max(len(name) for name, _ in rows)
    unit, label = (GIB, "GiB") if memory.total >= GIB else (2**20, "MiB")
    lines = [title, "", f"{'per rank':<{width}}   {label:>9}"]
    lines += [f"{name:<{width}}   {gib(value, unit):>9}" for name, value in rows]
    lines.append("")
    lines.append(
        "Not counted: activations (batch_size x seq_len dependent), the CUDA context and allocator caches, "
        "communication buffers. The total adds every part: an upper bound on their simultaneous peak."
    )
    if device is None:
        lines.append("Device memory: not checked (no GPU in use here).")
    else:
        name, capacity = device
        left = capacity - memory.total
        verdict = f"{gib(left)} GiB left for activations" if left > 0 else f"short by {gib(-left)} GiB: it does not fit"
        lines.append(f"Device memory: {name} has {gib(capacity)} GiB; {verdict}.")
    return "\n".join(lines)
