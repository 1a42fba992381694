"""Where a run's critical weights live: module types and layers that hold more than their share of the
global top-K, rows/columns that recur, and residual-stream dimensions shared across module types.

:func:`placement_of` computes the statistics from a run; :func:`placement_findings` turns them into
:class:`~cwa.report.findings.Finding` objects gated on the thresholds in ``cwa.report.findings``.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

from cwa.model.params import ParamInfo
from cwa.report.findings import ALPHA, ENRICHED_FACTOR, RECUR_MIN, STRUCTURAL_P_FLOOR, Finding
from cwa.rundir import Run
from cwa.scoring import agreement
from cwa.scoring.topk import TopK

LOCATION_K = 100


@dataclass
class Placement:
    """Where a run's global top-K sit, with enrichment tests against the share of weights."""

    k: int
    tied: int = 0
    by_module: list[dict] = field(default_factory=list)
    by_layer: list[dict] = field(default_factory=list)
    recurring: list[dict] = field(default_factory=list)
    residual: list[dict] = field(default_factory=list)


def _enrichment(counts: Counter, sizes: dict, k: int, total: int) -> list[dict]:
    tests = len(sizes)
    out = []
    for key, size in sizes.items():
        count = counts.get(key, 0)
        expected_share = size / total
        share = count / k
        p = floored(min(1.0, tests * agreement.binomial_tail(count, k, expected_share))) if count else 1.0
        out.append(
            {
                "where": key,
                "count": count,
                "share": share,
                "weight_share": expected_share,
                "enrichment": share / expected_share if expected_share > 0 else math.inf,
                "p_adjusted": p,
            }
        )
    out.sort(key=lambda d: (-d["count"], str(d["where"])))
    return out


# Modules whose output is added to the residual stream (their output rows index it); every other 2-D
# tensor with a hidden-sized input reads the residual stream through its input columns.
_WRITES_RESIDUAL = ("o_proj", "down_proj", "c_proj", "out_proj", "dense_4h_to_h", "fc2", "w2")


def _axes(module: str) -> tuple[str, str]:
    """Names of a 2-D tensor's (row, column): an embedding's rows are tokens, its columns hidden dimensions."""
    if "embed" in module or module in ("wte", "wpe", "lm_head"):
        return "token row" if module != "wpe" else "position row", "hidden dimension"
    return "output row", "input column"


def hidden_size(run: Run) -> int | None:
    """The residual-stream width: the most common size of the 1-D tensors (layer norms), else None."""
    sizes = Counter(i.numel for i in run.infos.values() if len(i.shape) == 1)
    return sizes.most_common(1)[0][0] if sizes else None


def residual_coordinate(info, index: int, hidden: int) -> int | None:
    """The residual-stream dimension a weight reads from or writes to, where its tensor says so."""
    if len(info.shape) == 1:
        return index if info.numel == hidden else None
    rc = info.row_col(np.int64(index))
    if rc is None:
        return None
    out_dim, in_dim = (info.shape[1], info.shape[0]) if info.transposed else info.shape
    if info.module.split(".")[-1] in _WRITES_RESIDUAL:
        return int(rc[0]) if out_dim == hidden else None
    return int(rc[1]) if in_dim == hidden else None  # embeddings, q/k/v, gate/up, lm_head


def _residual_dimensions(run: Run, top) -> list[dict]:
    """Residual-stream dimensions shared by top-K weights of several module types (binomial test against a
    uniform spread over the hidden dimensions, Bonferroni over them) — the pattern of "super weights" and
    massive-activation channels."""
    hidden = hidden_size(run)
    if not hidden or hidden < 2:
        return []
    where: dict[int, list[tuple[str, int | None]]] = defaultdict(list)
    trials = 0
    for p, index in zip(top.param.tolist(), top.index.tolist(), strict=True):
        info = run.infos[top.names[p]]
        d = residual_coordinate(info, index, hidden)
        if d is not None:
            trials += 1
            where[d].append((info.module, info.layer))
    out = []
    for d, hits in where.items():
        modules = sorted({m for m, _ in hits})
        if len(hits) < RECUR_MIN or len(modules) < 2:
            continue
        p = floored(min(1.0, hidden * agreement.binomial_tail(len(hits), trials, 1.0 / hidden)))
        if p < ALPHA:
            out.append(
                {
                    "dimension": d,
                    "count": len(hits),
                    "of": trials,
                    "hidden": hidden,
                    "modules": modules,
                    "layers": sorted({layer for _, layer in hits if layer is not None}),
                    "p_adjusted": p,
                }
            )
    out.sort(key=lambda r: (r["p_adjusted"], -r["count"]))
    return out


def untied_topk(run: Run, k: int) -> TopK | None:
    """The run's global top-k (k capped at what it can give) without the weights tied with the first one left out:
    those are in the top-K by the tie-break alone, so where they sit says nothing about the data. None when the
    run gives no top-K."""
    k = min(k, run.max_global_k)
    top = run.global_topk(k)
    if top is None or len(top) == 0:
        return None
    tied = run.cutoff_tie(k) or 0
    return top.prefix(len(top) - tied) if tied else top


def placement_of(run: Run, k: int = LOCATION_K) -> Placement | None:
    """Global top-k by module type and layer (enrichment vs. each one's share of the scored weights, binomial
    test, Bonferroni-adjusted), and rows/columns that hold more top-k weights than chance allows."""
    k = min(k, run.max_global_k)
    top = untied_topk(run, k)
    if top is None:
        return None
    tied = k - len(top)
    if len(top) == 0:
        return Placement(k=0, tied=tied)
    infos = run.infos
    total = run.num_scored
    module_sizes, layer_sizes = Counter(), Counter()
    for info in infos.values():
        module_sizes[info.module] += info.numel
        layer_sizes[_layer_key(info)] += info.numel
    members = [infos[top.names[p]] for p in top.param.tolist()]
    place = Placement(k=len(top), tied=tied)
    place.by_module = _enrichment(Counter(i.module for i in members), dict(module_sizes), len(top), total)
    place.by_layer = _enrichment(Counter(_layer_key(i) for i in members), dict(layer_sizes), len(top), total)
    place.residual = _residual_dimensions(run, top)
    place.recurring = _recurring(infos, top)
    return place


def _layer_key(info: ParamInfo) -> int | str:
    return "outside" if info.layer is None else info.layer


def _axis_sizes(infos: dict[str, ParamInfo]) -> dict[tuple[str, str], int]:
    """{(module type, axis name): how many rows/columns/channels that axis has}."""
    dims = {}
    for info in infos.values():
        if len(info.shape) == 2:
            out_dim, in_dim = (info.shape[1], info.shape[0]) if info.transposed else info.shape
            row_axis, col_axis = _axes(info.module)
            dims[(info.module, row_axis)] = out_dim
            dims[(info.module, col_axis)] = in_dim
        else:
            dims[(info.module, "channel")] = info.numel
    return dims


def _recurring(infos: dict[str, ParamInfo], top: TopK) -> list[dict]:
    """Rows, columns or channels of one module type shared by more of its top-K weights than a uniform
    spread allows (binomial test, Bonferroni over that axis), lowest p first."""
    coords: dict[tuple[str, str, int], list] = defaultdict(list)
    per_module_top = Counter()
    for p, index in zip(top.param.tolist(), top.index.tolist(), strict=True):
        info = infos[top.names[p]]
        per_module_top[info.module] += 1
        rc = info.row_col(np.int64(index))
        row_axis, col_axis = _axes(info.module)
        if rc is None:
            coords[(info.module, "channel", index)].append(info.layer)
        else:
            coords[(info.module, row_axis, int(rc[0]))].append(info.layer)
            coords[(info.module, col_axis, int(rc[1]))].append(info.layer)
    dims = _axis_sizes(infos)
    out = []
    for (module, axis, coord), where in coords.items():
        count, trials, dim = len(where), per_module_top[module], dims[(module, axis)]
        if count < RECUR_MIN or dim <= 1:
            continue
        p = floored(min(1.0, dim * agreement.binomial_tail(count, trials, 1.0 / dim)))
        if p < ALPHA:
            out.append(
                {
                    "module": module,
                    "axis": axis,
                    "coordinate": coord,
                    "count": count,
                    "of": trials,
                    "layers": sorted({w for w in where if w is not None}),
                    "p_adjusted": p,
                }
            )
    out.sort(key=lambda d: (d["p_adjusted"], -d["count"]))
    return out


def floored(p: float) -> float:
    """A placement p-value, raised to :data:`~cwa.report.findings.STRUCTURAL_P_FLOOR`: it describes where one
    run's top-K sit against a uniform spread, not how surely another seed or calibration set puts them there
    (the stability section measures that), so no certainty beyond the floor is claimed for it."""
    return max(p, STRUCTURAL_P_FLOOR)


def _strength(p: float) -> float:
    return -math.log10(max(p, 1e-300))


def placement_findings(position: int, place: Placement) -> list[Finding]:
    """Module types and layers enriched among the top-K (≥ 2× their share, adjusted p < 0.01), recurring
    rows/columns/channels and residual-stream dimensions (adjusted p < 0.01); strongest first within each."""
    out = []
    if place.k == 0:
        return out
    runs = (position,)
    for kind, rows in (("module", place.by_module), ("layer", place.by_layer)):
        for r in rows:
            if r["enrichment"] >= ENRICHED_FACTOR and r["p_adjusted"] < ALPHA:
                out.append(
                    Finding(
                        section="placement",
                        verdict=f"enriched_{kind}",
                        runs=runs,
                        statistic=f"share of the global top-{place.k} in this {kind} over its share of the weights",
                        value=r["enrichment"],
                        threshold=ENRICHED_FACTOR,
                        strength=_strength(r["p_adjusted"]),
                        numbers={**r, "k": place.k},
                    )
                )
    recurrences = (
        (place.residual, "residual_dimension_recurs", "the top-K weights on this residual-stream dimension"),
        (place.recurring, "recurs", "the module type's top-K weights on this row/column"),
    )
    for rows, verdict, what in recurrences:
        out += [
            Finding(
                section="placement",
                verdict=verdict,
                runs=runs,
                statistic=f"Bonferroni-adjusted binomial p of {what}",
                value=r["p_adjusted"],
                threshold=ALPHA,
                strength=_strength(r["p_adjusted"]),
                numbers={**r, "k": place.k},
            )
            for r in rows
        ]
    return out
