"""Memory per rank of ``cwa fit-sensitivity``, from a model's layout alone (no Lightning, no weights).

One pure function, :func:`plan_memory`, serves both the dry run (``cwa fit-sensitivity --dry_run true``)
and ``scripts/sizing.py``. It reads only parameter shapes, so it runs on a model built on the meta device.

What is counted, per rank, for the rank holding the most (rank 0: FSDP2 gives each rank ``ceil(rows / W)``
rows of every tensor, the last ranks fewer):

* weights: every parameter's row shard in the model's dtype, plus, when sharded over more than one rank,
  one unsharded FSDP unit while it runs (the largest of: a decoder layer; the root's own parameters, i.e.
  embeddings, final norm and an untied LM head). DDP and one process hold the whole model.
* gradients: only scored tensors get gradients (the rest are frozen). ``grad_x_weight``, ``grad_squared``
  and ``obd`` with the Fisher consume each gradient in a hook and free it: at most one FSDP unit's unsharded
  scored gradients plus one tensor's shard. Finite-difference ``hutchinson_diag`` keeps every scored
  gradient shard over two backward passes; double-backward (``autograd``) keeps the first-order gradients
  with their graph and two Hessian-vector products at the hand-over between probes.
* accumulators: the float32 accumulator (the scores, computed in place) of every scored weight's shard;
  ``obd`` with ``signed_taylor`` has a second one; ``magnitude``, ``wanda`` and ``obs`` hold their float32
  scores at the end instead. ``wanda`` and ``obs`` score only weights of Linear / Conv1D layers.
* extras (metric-specific): the finite-difference weight backup and float32 probes of every scored shard,
  the transient of drawing one whole-tensor probe (random bytes, bits, a float32 copy), float32 casts of
  16-bit gradients, ``wanda``'s float64 sums and ``obs``'s X^T X per distinct layer input (never sharded:
  activations are not) and its inversion (``cwa.scoring.saliency.obs_memory_bytes``), and, sharded, one whole
  float32 score tensor gathered while ``scores.safetensors`` is written.

Not counted: activations (batch x seq_len dependent; double backward's graph is one), the framework's own
memory (CUDA context, allocator caches; on a CPU 0.5-1 GB for Python, torch and transformers) and
communication buffers. The total is the sum of the parts, an upper bound: not every transient peaks at once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from cwa.common.errors import CwaError

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


def input_scored(model: nn.Module, params: dict[str, nn.Parameter], scorer: object) -> tuple[list[str], list[int]]:
    """The tensors ``scorer`` scores among ``params`` and the widths of the distinct layer inputs it reads.

    ``wanda`` and ``obs`` (scorers with input ``groups``) score only weights of Linear / Conv1D layers called
    in the forward pass and keep one statistic per distinct input: found as ``attach`` finds them, with one
    two-token forward pass (which runs on the meta device too). Other metrics score every parameter given.

    Args:
        model: the model (on any device, the meta device included).
        params: the selected parameters by name.
        scorer: the metric (a ``cwa.scoring.scorers.Scorer``).

    Returns:
        (scored parameter names, d_in of each distinct input; empty for the other metrics).
    """
    members = getattr(scorer, "members", None)  # a shared pass: every tensor some member scores
    if members is not None:
        readers = [m for m in members.values() if hasattr(m, "groups")]
        return list(params), input_scored(model, params, readers[0])[1] if readers else []
    if not hasattr(scorer, "groups"):
        return list(params), []
    from cwa.scoring.saliency import input_groups, linear_targets

    targets, _ = linear_targets(model, params)
    groups, _ = input_groups(model, [t.module for t in targets.values()])
    called = {module for members in groups.values() for module in members}
    scored = [name for name, t in targets.items() if t.module in called]
    if not scored:
        raise CwaError(
            f"{getattr(scorer, 'name', 'this metric')} scores only weights of Linear or Conv1D layers and none is "
            "selected; include weight matrices such as mlp or self_attn."
        )
    width = {t.module: t.width for t in targets.values()}
    return scored, [width[leader] for leader in groups]


def _consumed_gradients(layout: Layout, b: int) -> int:
    """Gradients consumed by a hook as each is ready: one unit's unsharded ones plus one shard (sharded)."""
    if layout.sharded:
        return layout.largest_unit_scored * b + layout.rank_largest_scored * b
    return layout.largest_scored * b


def _probe_draw(layout: Layout) -> int:
    """Transient of drawing one whole-tensor Rademacher probe (``HutchinsonDiag._probe``): random bytes (n/8),
    two uint8 bit tensors and, sharded, the whole float32 probe before this rank's rows are copied out."""
    n = layout.largest_scored
    return math.ceil(n / 8) + (n + 4 * n if layout.sharded else 2 * n)


def _hutchinson(
    layout: Layout, b: int, hvp: str, probes: int, fd_scheme: str = "central"
) -> tuple[int, dict[str, int]]:
    """(gradient bytes, extras) of a Hutchinson estimator of the Hessian diagonal."""
    if hvp == "finite_difference":
        gradients = layout.rank_scored * b + (layout.largest_unit_scored * b if layout.sharded else 0)
        extras = {
            "weight backup (finite differences)": layout.rank_scored * b,
            "float32 probes": layout.rank_scored * 4,
            "drawing one whole probe": _probe_draw(layout),
        }
        if fd_scheme == "forward":  # the unperturbed gradient of the batch, held in float32 for every probe
            extras["float32 unperturbed gradient (forward scheme)"] = layout.rank_scored * 4
        return gradients, extras
    held = min(probes, 2)  # the next probe's set is built while the previous one is still referenced
    gradients = layout.scored * b * (1 + held)  # first-order gradients (with graph) + Hessian-vector products
    extras = {"probes": layout.scored * b * held, "drawing one whole probe": _probe_draw(layout)}
    if b < 4:
        extras["float32 casts of one probe and its product"] = 2 * layout.largest_scored * 4
    return gradients, extras


def _metric_parts(scorer: object, layout: Layout, b: int) -> tuple[int, int, dict[str, int]]:
    """(gradients, accumulators, extras) in bytes for ``scorer`` (a ``cwa.scoring.scorers.Scorer``)."""
    from cwa.scoring.scorers import GradSquared, GradXWeight, HutchinsonDiag, Magnitude

    members = getattr(scorer, "members", None)
    if members is not None:  # a shared pass: one backward serves every member; each keeps its accumulators
        parts = {name: _metric_parts(member, layout, b) for name, member in members.items()}
        extras = {f"{name}: {what}": n for name, part in parts.items() for what, n in part[2].items()}
        return max(p[0] for p in parts.values()), sum(p[1] for p in parts.values()), extras
    acc = layout.rank_scored * 4
    cast = {"float32 casts of one gradient": 2 * layout.rank_largest_scored * 4} if b < 4 else {}
    if isinstance(scorer, Magnitude):
        return 0, acc, {}
    if isinstance(scorer, GradXWeight):
        return _consumed_gradients(layout, b), acc, {}
    if isinstance(scorer, GradSquared):
        return _consumed_gradients(layout, b), acc, cast
    if isinstance(scorer, HutchinsonDiag):
        gradients, extras = _hutchinson(layout, b, scorer.hvp, scorer.probes, scorer.fd_scheme)
        return gradients, acc, extras
    from cwa.scoring.saliency import OBD, OBS, Wanda, obs_memory_bytes

    if isinstance(scorer, Wanda):
        return 0, acc, {"float64 input sums (per distinct layer input)": sum(layout.input_widths) * 8}
    if isinstance(scorer, OBS):
        obs = obs_memory_bytes(layout.input_widths)
        return 0, acc, {"X^T X per distinct layer input": obs["accumulators"], "inverting one": obs["compute_extra"]}
    if isinstance(scorer, OBD):
        if scorer.hessian == "hutchinson":
            diag = scorer.diag
            gradients, extras = _hutchinson(layout, b, diag.hvp, diag.probes, diag.fd_scheme)
        else:
            gradients, extras = _consumed_gradients(layout, b), dict(cast)
        if scorer.signed_taylor:
            extras["second accumulator (signed_taylor gradient)"] = layout.rank_scored * 4
        return gradients, acc, extras
    raise CwaError(f"no memory model for the metric '{getattr(scorer, 'name', type(scorer).__name__)}'.")


def plan_memory(layout: Layout, scorer: object, dtype: str, save_scores: str = "float32") -> Memory:
    """Bytes per rank (the fullest rank) of a fit-sensitivity run; see the module docstring for the model.

    Args:
        layout: what each rank holds (:func:`model_layout`).
        scorer: the metric, a ``cwa.scoring.scorers.Scorer`` instance with its options.
        dtype: the weights' dtype (``float32``, ``bfloat16``, ``float16``).
        save_scores: ``scores.safetensors``'s dtype or ``off``: a sharded run gathers one whole float32
            score tensor at a time to write it.
    """
    if dtype not in DTYPE_BYTES:
        raise CwaError(f"unknown dtype '{dtype}': use float32, bfloat16 or float16.")
    b = DTYPE_BYTES[dtype]
    weights = layout.rank_total * b + (layout.largest_unit * b if layout.sharded else 0)
    gradients, accumulators, extras = _metric_parts(scorer, layout, b)
    if layout.sharded and save_scores != "off":
        extras["writing scores: one whole score tensor"] = layout.largest_scored * 4
    return Memory(weights, gradients, accumulators, {k: v for k, v in extras.items() if v})


def gib(n: int | float, unit: int = GIB) -> str:
    """``n`` bytes in ``unit`` (GiB by default) with two decimals."""
    return f"{n / unit:.2f}"


def check_metric_plan(scorer: object, dtype: str, sharded: bool) -> None:
    """Refuse, before anything is built, the metric settings a run would refuse once its weights are loaded.

    Args:
        scorer: the metric (a ``cwa.scoring.scorers.Scorer``).
        dtype: the weights' dtype.
        sharded: whether the run shards the model with FSDP2.
    """
    hutchinson = getattr(scorer, "diag", scorer)  # obd drives a HutchinsonDiag or a GradSquared
    hvp = getattr(hutchinson, "hvp", None)
    if hvp == "autograd" and sharded:
        raise CwaError(
            "hutchinson_diag on sharded parameters (ModelParallelStrategy) needs hvp: finite_difference; "
            "double backward through FSDP is not supported."
        )
    if hvp == "finite_difference" and dtype != "float32":
        raise CwaError(
            f"hutchinson_diag with hvp finite_difference needs float32 weights (dtype is {dtype}): a relative "
            "step of 1e-4 is below the resolution of 16-bit floats; set dtype: float32."
        )


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
