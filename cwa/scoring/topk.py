"""Exact top-K selection over per-parameter score tensors without concatenating them.

Weights are ranked by |score| (Hutchinson scores are signed). Ties are broken deterministically:
earlier parameter (in model order) first, then lower flat index.

Sharded runs (``select_topk_sharded``): every rank selects on its own row shards, maps its candidates to
global flat indices, and the candidates (at most k per rank, or k per tensor per rank) are gathered and
merged under the same order, which gives exactly the single-process selection.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from cwa.common.errors import CwaError

Mode = Literal["global", "per_layer"]


@dataclass
class TopK:
    """Selected weights, best first: parallel 1-D tensors plus the parameter names they index."""

    names: list[str]
    param: Tensor  # int64 index into ``names``
    index: Tensor  # int64 flat index into the parameter
    score: Tensor  # float32 signed score
    weight: Tensor | None = None  # the weights' values, when known without the whole tensor (sharded runs)

    def __len__(self) -> int:
        return int(self.param.numel())

    def prefix(self, k: int) -> TopK:
        """The first k entries: a ranked list's top-k."""
        weight = None if self.weight is None else self.weight[:k]
        return TopK(self.names, self.param[:k], self.index[:k], self.score[:k], weight)

    def within(self, names: Collection[str]) -> TopK:
        """The entries in the parameters ``names``, in their order: the ranked list restricted to those tensors."""
        allowed = torch.tensor([n in names for n in self.names], dtype=torch.bool)
        keep = allowed[self.param] if len(self) else torch.zeros(0, dtype=torch.bool)
        weight = None if self.weight is None else self.weight[keep]
        return TopK(self.names, self.param[keep], self.index[keep], self.score[keep], weight)


def rank_order(key: Tensor, param: Tensor, index: Tensor) -> Tensor:
    """The one ranking rule of cwa: ``key`` (|score|) descending, ties by parameter order, then by flat
    index. Returns the permutation (three stable sorts, least significant key first)."""
    order = torch.sort(index, stable=True).indices
    order = order[torch.sort(param[order], stable=True).indices]
    return order[torch.sort(key[order], descending=True, stable=True).indices]


def tensor_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(|score| values, flat indices) of the k largest |scores|, ties resolved to the lowest indices,
    sorted by value descending then index ascending."""
    flat = scores.detach().reshape(-1)
    key = flat.abs() if flat.is_floating_point() else flat
    k = min(k, key.numel())
    threshold = key.min() if k == key.numel() else torch.topk(key, k, sorted=False).values.min()
    chosen = key > threshold
    at = torch.nonzero(key == threshold).squeeze(1)[: k - int(chosen.sum())]
    chosen[at] = True
    index = torch.nonzero(chosen).squeeze(1)  # ascending: a stable sort then resolves ties to low indices
    order = torch.sort(key[index], descending=True, stable=True).indices
    index = index[order]
    return key[index], index


def check_k(sizes: Mapping[str, int], k: int, mode: Mode) -> None:
    """Fail with one sentence when ``k`` cannot be selected from tensors of these sizes."""
    if not sizes:
        raise CwaError("there are no scores to select from.")
    if mode not in ("global", "per_layer"):
        raise CwaError(f"unknown mode '{mode}': use global or per_layer.")
    if k < 1:
        raise CwaError(f"k must be at least 1, got {k}.")
    total = sum(sizes.values())
    if mode == "global" and k > total:
        raise CwaError(f"k={k} is larger than the {total} selected weights.")
    if mode == "per_layer":
        smallest = min(sizes, key=sizes.get)
        if k > sizes[smallest]:
            raise CwaError(
                f"k={k} per tensor is larger than '{smallest}' ({sizes[smallest]} weights); "
                "lower k or exclude that tensor."
            )


def nonfinite_counts(scores: Mapping[str, Tensor]) -> dict[str, int]:
    """Tensor name -> how many of its scores are NaN or infinite (tensors without any are left out)."""
    counts = {}
    for name, tensor in scores.items():
        if tensor.is_floating_point() and tensor.numel():
            bad = int((~torch.isfinite(tensor.detach())).sum())
            if bad:
                counts[name] = bad
    return counts


def check_finite(counts: Mapping[str, int]) -> None:
    """Refuse to rank scores that hold NaN or infinity, in one sentence naming the first such tensor and
    the count: |NaN| compares false with everything, so a ranking would silently drop it, or return
    nothing when the selection falls back to sorting all scores."""
    if not counts:
        return
    name, count = next(iter(counts.items()))
    more = f" ({len(counts) - 1} more tensors too)" if len(counts) > 1 else ""
    raise CwaError(
        f"the scores of '{name}' hold {count} non-finite values (NaN or inf){more}, which have no rank; "
        "check the model's weights and the metric's settings (e.g. a finite-difference step or dtype)."
    )


def select_topk(scores: Mapping[str, Tensor], k: int, mode: Mode = "global") -> TopK:
    """Top-K over ``scores`` (one tensor per parameter, in model order).

    ``global``: the k highest |scores| over all tensors; memory O(k + largest tensor), or a float32 copy
    of all scores when k is at least 1/8 of them (a sort's cost, whatever k).
    ``per_layer``: the k highest within each tensor, tensors in model order.
    """
    names = list(scores)
    check_k({n: s.numel() for n, s in scores.items()}, k, mode)
    check_finite(nonfinite_counts(scores))
    if mode == "global":
        param, index, score = _global_topk(scores, k)
    else:
        parts = [tensor_topk(scores[name], k)[1] for name in names]
        param = torch.cat([torch.full((len(ix),), i, dtype=torch.long) for i, ix in enumerate(parts)])
        index = torch.cat([ix.cpu() for ix in parts])
        score = _gather(scores, names, param, index)
    return TopK(names=names, param=param, index=index, score=score)


def _key(scores: Tensor) -> Tensor:
    flat = scores.detach().reshape(-1)
    return flat.abs() if flat.is_floating_point() and bool((flat < 0).any()) else flat


def _global_topk(scores: Mapping[str, Tensor], k: int, sample_size: int = 1 << 21) -> tuple[Tensor, Tensor, Tensor]:
    """Exact global top-K by threshold: estimate a value below the k-th largest |score| from a strided
    sample, collect every weight at or above it (one comparison pass per tensor), and rank only those
    candidates. If the estimate was too high (fewer than k candidates), raise the sampled quantile and
    retry. When k is a large share of the weights (or the retries run out), the candidates would be most
    weights anyway: rank the concatenation at the cost of one selection and one sort of k keys.

    Returns (parameter number, flat index, signed float32 score), best first."""
    names = list(scores)
    total = sum(s.numel() for s in scores.values())
    stride = max(1, total // sample_size)
    sample = torch.cat([_key(scores[n])[::stride].float().cpu() for n in names])
    margin = 2.0
    while margin * k < 0.25 * total:
        # Aim for about margin * k candidates (plus slack for sampling noise in the tail).
        above = int(margin * k * sample.numel() / total) + 32
        if above >= sample.numel():
            break
        threshold = torch.kthvalue(sample, sample.numel() - above).values
        keys, values, params, indices = [], [], [], []
        for i, name in enumerate(names):
            key = _key(scores[name])
            index = torch.nonzero(key >= threshold.to(key.device, key.dtype)).squeeze(1)
            keys.append(key[index].float().cpu())
            values.append(scores[name].detach().reshape(-1)[index].float().cpu())
            params.append(torch.full((index.numel(),), i, dtype=torch.long))
            indices.append(index.cpu())
        key = torch.cat(keys)
        if key.numel() >= k:
            # Candidates are in (parameter, index) order; a stable sort keeps that order among ties.
            order = torch.sort(key, descending=True, stable=True).indices[:k]
            return torch.cat(params)[order], torch.cat(indices)[order], torch.cat(values)[order]
        margin *= 4
    return _concatenated_topk(scores, k)


def _concatenated_topk(scores: Mapping[str, Tensor], k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-K over the float32 concatenation of all scores (memory: 8 bytes per weight for the scores and
    their |score|, plus 16 per selected weight). The concatenation is in (parameter, index) order, so
    ``tensor_topk``'s rule (ties to the lowest position) is the tie rule across tensors too."""
    names = list(scores)
    sizes = torch.tensor([scores[n].numel() for n in names], dtype=torch.long)
    flat = torch.cat([scores[n].detach().reshape(-1).float().cpu() for n in names])
    _, position = tensor_topk(flat, k)
    offsets = sizes.cumsum(0)
    param = torch.searchsorted(offsets, position, right=True)
    return param, position - (offsets - sizes)[param], flat[position]


def _groups(param: Tensor, count: int) -> list[tuple[int, Tensor]]:
    """(parameter number, positions in ``param`` that point at it) for each parameter present: one sort
    instead of one full comparison per parameter, which matters when k is most of the weights."""
    order = torch.sort(param, stable=True).indices
    sizes = torch.bincount(param, minlength=count).tolist()
    return [(i, chunk) for i, chunk in enumerate(torch.split(order, sizes)) if chunk.numel()]


def _gather(scores: Mapping[str, Tensor], names: list[str], param: Tensor, index: Tensor) -> Tensor:
    out = torch.empty(param.numel(), dtype=torch.float32)
    for i, positions in _groups(param, len(names)):
        scores_i = scores[names[i]]
        out[positions] = scores_i.reshape(-1)[index[positions].to(scores_i.device)].float().cpu()
    return out


Candidates = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]
"""(|score| key, parameter index, global flat index, signed score, weight), parallel 1-D CPU tensors."""


def merge_candidates(parts: Sequence[Candidates], k: int, mode: Mode = "global") -> Candidates:
    """Merge candidate sets from several ranks under the single-process order: |score| descending, then
    parameter order, then flat index. ``global`` keeps k in all, ``per_layer`` k per parameter."""
    key, param, index, score, weight = (torch.cat(column) for column in zip(*parts, strict=True))
    order = rank_order(key, param, index)
    if mode == "global":
        order = order[:k]
    else:
        # Within each parameter keep the first k in that order; then list parameters in model order.
        ranked = param[order]
        seen: dict[int, int] = {}
        keep = []
        for position, p in enumerate(ranked.tolist()):
            if seen.get(p, 0) < k:
                seen[p] = seen.get(p, 0) + 1
                keep.append(position)
        order = order[torch.tensor(keep, dtype=torch.long)]
        order = order[torch.sort(param[order], stable=True).indices]
    return key[order], param[order], index[order], score[order], weight[order]


def local_candidates(
    scores: Mapping[str, Tensor], params: Mapping[str, Tensor], k: int, mode: Mode = "global"
) -> Candidates:
    """This rank's candidates: its best k (``global``) or best k per tensor (``per_layer``) over its
    local shards, with flat indices into the whole tensors."""
    from cwa.model.sharding import global_flat_index, local_of

    names = list(scores)
    live = {n: s for n, s in scores.items() if s.numel() > 0}  # a shard can be empty (more ranks than rows)
    empty = torch.empty(0)
    if not live:
        return empty, empty.long(), empty.long(), empty, empty
    if mode == "global":
        local = {n: s for n, s in live.items()}
        param_local, index, score = _global_topk(local, min(k, sum(s.numel() for s in local.values())))
        param = torch.tensor([names.index(n) for n in local], dtype=torch.long)[param_local]
    else:
        pieces = [(names.index(n), tensor_topk(s, k)[1].cpu()) for n, s in live.items()]
        param = torch.cat([torch.full((ix.numel(),), i, dtype=torch.long) for i, ix in pieces])
        index = torch.cat([ix for _, ix in pieces])
        score = _gather(scores, names, param, index)
    weight = torch.empty(param.numel(), dtype=torch.float32)
    global_index = torch.empty_like(index)
    for i, positions in _groups(param, len(names)):
        w = local_of(params[names[i]]).detach().reshape(-1)
        weight[positions] = w[index[positions].to(w.device)].float().cpu()
        global_index[positions] = global_flat_index(params[names[i]], index[positions])
    return score.abs(), param, global_index, score, weight


def select_topk_sharded(scores: Mapping[str, Tensor], params: Mapping[str, Tensor], k: int, mode: Mode) -> TopK:
    """Exact top-K when ``scores`` are this rank's row shards of ``params`` (a collective: every rank
    calls it and gets the same result). Gathers at most k (per tensor) candidates per rank."""
    from cwa.model.sharding import all_gather_objects

    names = list(scores)
    check_k({n: p.numel() for n, p in params.items()}, k, mode)
    counts: dict[str, int] = {}
    for part in all_gather_objects(nonfinite_counts(scores)):  # every rank refuses, none waits in a gather
        for name, count in part.items():
            counts[name] = counts.get(name, 0) + count
    check_finite({name: counts[name] for name in names if name in counts})
    parts = all_gather_objects(local_candidates(scores, params, k, mode))
    _, param, index, score, weight = merge_candidates(parts, k, mode)
    return TopK(names=names, param=param, index=index, score=score, weight=weight)
