"""Disk bytes of a fit-sensitivity run's artifacts, planned from shapes alone (``--dry_run`` prints them).

A safetensors file is an 8-byte header length, a JSON header padded to 8 bytes, then the raw tensor bytes,
so its size follows from names, shapes, dtypes and metadata: :func:`safetensors_bytes` computes it. The plan
covers ``scores.safetensors`` at the chosen ``save_scores`` dtype (exact up to the header's key order),
``topk.csv`` (every number counted at its widest; a global top-K's tensors estimated) and the checkpoints of
``accumulators/`` (every process's newest file, the metadata's data fingerprint estimated). For
Llama-3.1-8B the float32 scores file alone is 32 GB; bfloat16 halves it and ``save_scores: off`` keeps only
``topk.csv``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from cwa.model.params import ParamInfo
from cwa.rundir.files import ACCUMULATORS, SCORES, TOPK
from cwa.rundir.scores import scores_metadata
from cwa.rundir.topk import TOPK_COLUMNS

SAFETENSORS_CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}
SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_WIDEST_FLOAT = len("-1.23456789e-05")  # the %.9g of topk.csv's score and weight at its widest
_FINGERPRINT_ALLOWANCE = 256  # the data fingerprint in a checkpoint's metadata (hashes and settings)


@dataclass
class DiskPlan:
    """Bytes each artifact of one run takes on disk.

    Attributes:
        files: artifact (a path inside the run directory) -> bytes.
        notes: artifact -> how the figure was obtained (exact, upper bound, estimate).
    """

    files: dict[str, int] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.files.values())


def safetensors_bytes(tensors: Mapping[str, tuple[tuple[int, ...], torch.dtype]], metadata: Mapping[str, str]) -> int:
    """Size of a safetensors file holding ``tensors`` (name -> (shape, dtype)) with ``metadata``.

    Args:
        tensors: the stored tensors in file order (the order changes only the header's digits).
        metadata: the file's ``__metadata__`` strings (empty: none).
    """
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, (shape, dtype) in tensors.items():
        size = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
        header[name] = {
            "dtype": SAFETENSORS_CODES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    return 8 + len(encoded) + (-len(encoded) % 8) + offset


def topk_csv_bytes(infos: Mapping[str, ParamInfo], k: int, mode: str) -> int:
    """``topk.csv``'s size with every number at its widest: an upper bound for ``per_layer``; for ``global``
    an estimate, the rows spread over the tensors in proportion to their size.

    Args:
        infos: the scored tensors.
        k: the run's K.
        mode: ``global`` (K rows) or ``per_layer`` (K per tensor, at most its size).
    """
    size = len(",".join(TOPK_COLUMNS)) + 2  # csv's \r\n line ends
    if mode == "per_layer":
        rows = {n: min(k, i.numel) for n, i in infos.items()}
        rank_width = len(str(sum(rows.values())))
        return size + sum(count * _row_width(infos[n], rank_width) for n, count in rows.items())
    # Which tensors a global top-K lands in is unknown before the run: rows weighted by tensor size.
    numel = sum(i.numel for i in infos.values())
    count = min(k, numel)
    rank_width = len(str(count))
    mean = sum(i.numel * _row_width(i, rank_width) for i in infos.values()) / max(numel, 1)
    return size + math.ceil(count * mean)


def _row_width(info: ParamInfo, rank_width: int) -> int:
    dims = [len(str(max(d - 1, 0))) for d in info.shape] if len(info.shape) == 2 else [0, 0]
    layer = 0 if info.layer is None else len(str(info.layer))
    index = len(str(max(info.numel - 1, 0)))
    fields = rank_width + len(info.name) + layer + len(info.module) + sum(dims) + index + 2 * _WIDEST_FLOAT
    return fields + len(TOPK_COLUMNS) - 1 + 2


def checkpoint_states(
    scorer: object, model: torch.nn.Module, params: Mapping[str, torch.nn.Parameter], world: int, sharded: bool
) -> tuple[list[dict[str, tuple[tuple[int, ...], torch.dtype]]], dict] | None:
    """Each process's accumulators (name -> (shape, dtype)) and the metric's settings once bound, from a copy
    of ``scorer`` bound on the meta device.

    Accumulators of a parameter hold that process's row shard under FSDP2 (``ceil(rows / world)`` rows, the
    last ranks fewer); per-input statistics (``wanda``, ``obs``) and DDP's replicas are whole on every process.

    Args:
        scorer: the metric, unbound (it is copied, never bound itself).
        model: the model on the meta device.
        params: the selected parameters of ``model``.
        world: processes.
        sharded: FSDP2 rather than DDP or one process.

    Returns:
        (one mapping per process, the bound metric's settings), or None where the metric cannot be bound on
        the meta device.
    """
    import copy

    probe = copy.deepcopy(scorer)
    try:
        probe.bind(dict(params))
        probe.attach(model)
        acc = probe.state_dict()["acc"]
    except Exception:  # a metric whose setup reads values (not shapes): no checkpoint figure, said so
        return None
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    # A parameter's accumulator is keyed by its name (after a member's prefix in a shared pass) and has its shape.
    owned = {key for key, t in acc.items() if any(key.endswith(n) and tuple(t.shape) == s for n, s in shapes.items())}
    states = []
    for rank in range(world):
        state = {}
        for key, tensor in acc.items():
            shape = tuple(tensor.shape)
            if sharded and key in owned and shape:
                per = math.ceil(shape[0] / world)
                shape = (max(0, min(per, shape[0] - rank * per)), *shape[1:])
            state[key] = (shape, tensor.dtype)
        states.append(state)
    return states, probe.settings()


def checkpoint_bytes(state: Mapping[str, tuple[tuple[int, ...], torch.dtype]], fingerprint: Mapping) -> int:
    """One process's checkpoint file (``cwa.scoring.checkpoint.save``): its accumulators and counters.

    Args:
        state: accumulator name -> (this process's shape, dtype).
        fingerprint: the run's settings fingerprint as the module builds it (the data part estimated).
    """
    tensors = {f"acc.{n}": v for n, v in state.items()} | {"counters": ((4,), torch.float64)}
    meta = json.dumps({"batches": 0, "fingerprint": {**fingerprint, "data": "x" * _FINGERPRINT_ALLOWANCE}})
    return safetensors_bytes(tensors, {"cwa_checkpoint": meta})


def plan_disk(
    infos: Mapping[str, ParamInfo],
    metric: str,
    model: str,
    save_scores: str,
    k: int,
    mode: str,
    checkpoints: list[Mapping[str, tuple[tuple[int, ...], torch.dtype]]] | None = None,
    fingerprint: Mapping | None = None,
) -> DiskPlan:
    """Bytes of a run's ``scores.safetensors``, ``topk.csv`` and, when checkpointing, ``accumulators/``.

    Args:
        infos: the scored tensors in model order.
        metric: the metric's name (stored in the scores file's metadata).
        model: ``model.pretrained`` (stored in the same metadata).
        save_scores: ``float32``, ``bfloat16`` or ``off``.
        k: the run's K.
        mode: ``global`` or ``per_layer``.
        checkpoints: each process's accumulator shapes and dtypes (None: the run keeps no checkpoints).
        fingerprint: the settings fingerprint written into each checkpoint's metadata.
    """
    plan = DiskPlan()
    if save_scores != "off":
        dtype = SAVE_DTYPES[save_scores]
        tensors = {n: (i.shape, dtype) for n, i in infos.items()}
        plan.files[SCORES] = safetensors_bytes(tensors, scores_metadata(metric, model))
        plan.notes[SCORES] = f"{save_scores}, exact"
    plan.files[TOPK] = topk_csv_bytes(infos, k, mode)
    plan.notes[TOPK] = "upper bound" if mode == "per_layer" else "estimate"
    if checkpoints:
        plan.files[f"{ACCUMULATORS}/"] = sum(checkpoint_bytes(s, fingerprint or {}) for s in checkpoints)
        plan.notes[f"{ACCUMULATORS}/"] = f"{len(checkpoints)} process(es), newest only; removed at the end"
    return plan


def format_disk(plan: DiskPlan, title: str) -> str:
    """A plain-text table of the run's files, each size in its own unit, and the total."""
    rows = [*plan.files.items(), ("total", plan.total)]
    width = max(len(name) for name, _ in rows)
    lines = [title, f"{'file':<{width}}   {'size':>10}"]
    lines += [f"{name:<{width}}   {_size(size):>10}   {plan.notes.get(name, '')}".rstrip() for name, size in rows]
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit, label in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= unit:
            return f"{n / unit:.2f} {label}"
    return f"{n} B"
