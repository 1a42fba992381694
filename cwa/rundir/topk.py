"""``topk.csv``: the selected weights, one row each, read back by the one tie rule."""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from cwa.common.errors import CwaError
from cwa.common.io import atomic_open, check_regular
from cwa.model.params import ParamInfo
from cwa.scoring.topk import TopK, rank_order

TOPK_COLUMNS = ["rank", "parameter", "layer", "module", "row", "col", "index", "score", "weight"]
EXPERT_COLUMN = "expert"
"""Written after ``TOPK_COLUMNS`` (files from before it lack it, and stay readable): the expert of a weight
of packed experts, whose ``row`` / ``col`` are then within that expert's matrix."""


def write_topk(path: Path, topk: TopK, infos: Mapping[str, ParamInfo], weights: Mapping[str, Tensor]) -> None:
    """One row per selected weight, in ``topk``'s order. ``row``/``col`` are (output unit, input unit) for
    2-D tensors (also for GPT-2's transposed Conv1D) and within its expert (``expert``) for packed experts;
    ``index`` is the flat index into the stored tensor.
    ``weights`` gives the weights' values unless ``topk.weight`` carries them (sharded runs)."""
    with atomic_open(path, newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*TOPK_COLUMNS, EXPERT_COLUMN])
        for rank, (p, index, score) in enumerate(
            zip(topk.param.tolist(), topk.index.tolist(), topk.score.tolist(), strict=True), start=1
        ):
            name = topk.names[p]
            info = infos[name]
            rc = info.row_col(torch.tensor(index))
            row, col = ("", "") if rc is None else (int(rc[0]), int(rc[1]))
            packed = info.expert_row_col(index)
            expert = "" if packed is None else packed[0]
            if packed is not None:
                row, col = packed[1], packed[2]
            if topk.weight is not None:
                weight = float(topk.weight[rank - 1])
            else:
                weight = float(weights[name].detach().reshape(-1)[index])
            layer = "" if info.layer is None else info.layer
            writer.writerow([rank, name, layer, info.module, row, col, index, f"{score:.9g}", f"{weight:.9g}", expert])


def read_topk(path: Path, names: list[str] | None = None, numels: Mapping[str, int] | None = None) -> TopK:
    """``topk.csv`` as a :class:`TopK` ranked by the one tie rule (|score| descending, then parameter order,
    then flat index). A ``per_layer`` list (K per tensor, tensors in turn) is thereby re-ranked globally,
    so that its first K rows are the K highest scores in it.

    Args:
        path: the ``topk.csv`` file.
        names: the scored parameters in model order (from the summary); by first appearance where None.
        numels: each scored parameter's number of weights (from the summary): a row naming another
            parameter, or an index outside its tensor, is refused.
    """
    try:
        check_regular(Path(path), os.stat(path), None, "top-K table")
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CwaError(f"cannot read '{path}': {exc}.") from None
    if rows and not set(TOPK_COLUMNS) <= set(rows[0]):
        raise CwaError(f"'{path}' lacks the columns {TOPK_COLUMNS}; it was not written by cwa fit-sensitivity.")
    names = list(names or [])
    position = {n: i for i, n in enumerate(names)}
    for row in rows:
        if row["parameter"] not in position:
            position[row["parameter"]] = len(names)
            names.append(row["parameter"])
    try:
        param = torch.tensor([position[r["parameter"]] for r in rows], dtype=torch.long)
        index = torch.tensor([int(r["index"]) for r in rows], dtype=torch.long)
        score = torch.tensor([float(r["score"]) for r in rows], dtype=torch.float32)
    except (TypeError, ValueError) as exc:
        raise CwaError(f"'{path}' has a malformed row ({exc}); rerun fit-sensitivity for it.") from None
    if numels is not None:
        _check_rows(path, rows, index, numels)
    order = rank_order(score.abs(), param, index)
    return TopK(names=names, param=param[order], index=index[order], score=score[order])


def _check_rows(path: Path, rows: list[dict], index: Tensor, numels: Mapping[str, int]) -> None:
    """Every row names a scored parameter and an index inside it (a -1 would silently address the last weight)."""
    for line, (row, flat) in enumerate(zip(rows, index.tolist(), strict=True), start=2):
        name = row["parameter"]
        if name not in numels:
            raise CwaError(
                f"'{path}' line {line} names parameter '{name}', which the run's summary.json does not list; "
                "the file was altered or damaged, so rerun fit-sensitivity for this run."
            )
        if not 0 <= flat < numels[name]:
            raise CwaError(
                f"'{path}' line {line} has index {flat} for '{name}', outside its {numels[name]} weights; "
                "the file was altered or damaged, so rerun fit-sensitivity for this run."
            )
