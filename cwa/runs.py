"""Reading finished fit-sensitivity run directories: summary, top-K table, scores (lazily), perturbation.

A run directory is complete when its ``summary.json`` says ``status: complete`` (it is written last).
Scores are read tensor by tensor with ``safetensors.safe_open``, so a 134.5M-weight run is never held
in memory as a whole unless a statistic needs every score.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cwa.errors import CwaError
from cwa.params import ParamInfo
from cwa.topk import TopK, select_topk

Key = tuple[str, int]  # (parameter name, flat index into the stored tensor)
PREFETCH_K = 1024


class LazyScores(Mapping[str, Tensor]):
    """A read-only ``{parameter: score tensor}`` that loads one tensor at a time from safetensors."""

    def __init__(self, path: Path, names: list[str]) -> None:
        self.path, self.names = path, names
        self._cached: tuple[str, Tensor] | None = None

    def __getitem__(self, name: str) -> Tensor:
        if self._cached is not None and self._cached[0] == name:
            return self._cached[1]
        if name not in self.names:
            raise KeyError(name)
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as handle:
            tensor = handle.get_tensor(name).float()
        self._cached = (name, tensor)
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class Run:
    """One complete fit-sensitivity run directory.

    Args:
        path: the run directory (``lightning_logs/<experiment>/version_<n>``).
        summary: its parsed ``summary.json``.
    """

    path: Path
    summary: dict
    _topk: dict[int, TopK | None] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, path: str | Path) -> Run:
        """Read a run directory; one clear CwaError when it is not a complete fit-sensitivity run."""
        path = Path(path)
        if not path.is_dir():
            raise CwaError(
                f"'{path}' is not a directory; pass fit-sensitivity run directories (lightning_logs/NAME/version_N)."
            )
        summary_path = path / "summary.json"
        if not summary_path.exists():
            raise CwaError(
                f"'{path}' has no summary.json: it is not a fit-sensitivity run directory, or the run did not finish."
            )
        try:
            summary = json.loads(summary_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CwaError(f"'{summary_path}' is not readable JSON ({exc}); rerun fit-sensitivity for it.") from None
        if not isinstance(summary, dict) or summary.get("status") != "complete":
            raise CwaError(f"'{path}' is not a complete run (summary.json status is not 'complete'); rerun it.")
        for key in ("model", "metric", "mode", "k", "tensors"):
            if key not in summary:
                raise CwaError(f"'{summary_path}' lacks '{key}': it was not written by cwa fit-sensitivity.")
        if not (path / "topk.csv").exists():
            raise CwaError(f"'{path}' has no topk.csv although its summary says complete; rerun fit-sensitivity.")
        return cls(path=path, summary=summary)

    # -- identity ------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """``<experiment>/version_<n>``: short and unique within one lightning_logs tree."""
        return f"{self.path.parent.name}/{self.path.name}"

    @property
    def model(self) -> str:
        return str(self.summary["model"])

    @property
    def metric(self) -> str:
        return str(self.summary["metric"].get("name", "?"))

    @property
    def metric_options(self) -> dict:
        return {k: v for k, v in self.summary["metric"].items() if k not in ("name", "signed")}

    @property
    def signed(self) -> bool:
        return bool(self.summary["metric"].get("signed", False))

    @property
    def mode(self) -> str:
        return str(self.summary["mode"])

    @property
    def k(self) -> int:
        return int(self.summary["k"])

    @property
    def data(self) -> dict:
        return self.summary.get("data") or {}

    @property
    def seed(self) -> int | None:
        seed = self.data.get("seed", self.summary.get("seed"))
        return None if seed is None else int(seed)

    @property
    def samples(self) -> int | None:
        return self.summary.get("samples")

    @property
    def label(self) -> str:
        """A short human label: metric, mode, k, samples, seed."""
        return f"{self.metric} {self.mode} k={self.k} n={self.samples} seed={self.seed}"

    def settings_key(self) -> tuple:
        """Everything that defines the experiment except the calibration seed (runs that share it are
        replicates over calibration subsets)."""
        data = {
            k: v for k, v in self.data.items() if k not in ("seed", "calibration_fingerprint", "heldout_fingerprint")
        }
        return (
            self.model,
            self.metric,
            json.dumps(self.metric_options, sort_keys=True),
            self.mode,
            self.k,
            json.dumps(data, sort_keys=True),
            json.dumps(self.summary.get("include"), sort_keys=True),
            json.dumps(self.summary.get("exclude"), sort_keys=True),
        )

    # -- parameters ----------------------------------------------------------------------------
    @cached_property
    def infos(self) -> dict[str, ParamInfo]:
        """Scored parameters in model order, from the summary's per-tensor statistics and layout."""
        layout = self.summary.get("layout") or {}
        out = {}
        for name, stats in self.summary["tensors"].items():
            place = layout.get(name, {})
            out[name] = ParamInfo(
                name=name,
                shape=tuple(int(s) for s in stats["shape"]),
                layer=place.get("layer"),
                module=str(place.get("module", name.rsplit(".", 2)[-2] if "." in name else name)),
                transposed=bool(place.get("transposed", False)),
            )
        return out

    @property
    def num_scored(self) -> int:
        return sum(i.numel for i in self.infos.values())

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: i.shape for n, i in self.infos.items()}

    # -- scores --------------------------------------------------------------------------------
    @property
    def scores_path(self) -> Path:
        return self.path / "scores.safetensors"

    @cached_property
    def has_scores(self) -> bool:
        if not self.scores_path.exists():
            return False
        try:
            from safetensors import safe_open

            with safe_open(str(self.scores_path), framework="pt") as handle:
                keys = set(handle.keys())
        except Exception:  # a truncated or foreign file: treat as absent and say so where it matters
            return False
        return set(self.infos) <= keys

    def scores(self) -> LazyScores:
        if not self.has_scores:
            raise CwaError(f"'{self.path}' has no usable scores.safetensors (the run used save_scores: off).")
        return LazyScores(self.scores_path, list(self.infos))

    def scores_at(self, wanted: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """|score| of the weights ``{parameter: flat indices}``, reading only the tensors needed."""
        lazy = self.scores()
        out = {}
        for name, index in wanted.items():
            if len(index):
                out[name] = lazy[name].reshape(-1)[torch.as_tensor(index, dtype=torch.long)].abs().numpy()
            else:
                out[name] = np.zeros(0, dtype=np.float32)
        return out

    def all_abs_scores(self) -> np.ndarray:
        """Every |score| in one float32 array (one copy of the scores: 538 MB for SmolLM2-135M)."""
        lazy = self.scores()
        out = np.empty(self.num_scored, dtype=np.float32)
        start = 0
        for name in lazy:
            flat = lazy[name].reshape(-1).abs().numpy()
            out[start : start + flat.size] = flat
            start += flat.size
        return out

    # -- top-K ---------------------------------------------------------------------------------
    @cached_property
    def topk_rows(self) -> list[dict]:
        from cwa.rundir import TOPK_COLUMNS

        path = self.path / "topk.csv"
        try:
            with open(path, newline="") as handle:
                rows = list(csv.DictReader(handle))
        except OSError as exc:
            raise CwaError(f"cannot read '{path}': {exc}.") from None
        if rows and not set(TOPK_COLUMNS) <= set(rows[0]):
            raise CwaError(f"'{path}' lacks the columns {TOPK_COLUMNS}; it was not written by cwa fit-sensitivity.")
        return rows

    def topk_table(self) -> TopK:
        """The run's own selection (topk.csv) as tensors, in the file's order."""
        names = list(self.infos)
        position = {n: i for i, n in enumerate(names)}
        rows = [r for r in self.topk_rows if r["parameter"] in position]
        return TopK(
            names=names,
            param=torch.tensor([position[r["parameter"]] for r in rows], dtype=torch.long),
            index=torch.tensor([int(r["index"]) for r in rows], dtype=torch.long),
            score=torch.tensor([float(r["score"]) for r in rows], dtype=torch.float32),
        )

    @property
    def max_global_k(self) -> int:
        """Largest K whose exact global top-K this run can give: any K with scores; else from topk.csv,
        where a per_layer selection of k per tensor contains the global top-K for every K ≤ k."""
        return self.num_scored if self.has_scores else self.csv_global_k

    @property
    def csv_global_k(self) -> int:
        rows = len(self.topk_rows)
        return rows if self.mode == "global" else min(self.k, rows)

    def global_topk(self, k: int) -> TopK | None:
        """The exact global top-k by |score| (ties: parameter order, then flat index), or None when this run
        cannot give it (no scores and k beyond what topk.csv holds)."""
        if k in self._topk:
            return self._topk[k]
        larger = [c for c, top in self._topk.items() if c > k and top is not None]
        if larger:
            # select_topk orders by |score| then the tie-break, so a top-k is the prefix of any larger top-K.
            top = self._topk[min(larger)]
            result = TopK(top.names, top.param[:k], top.index[:k], top.score[:k])
            self._topk[k] = result
            return result
        result: TopK | None = None
        if k <= self.max_global_k:
            if k > self.csv_global_k:
                # One pass over a scores file costs the same for any small K: fetch a margin for later calls.
                fetch = min(max(k, PREFETCH_K), self.num_scored)
                full = select_topk(self.scores(), fetch, "global")
                self._topk[fetch] = full
                result = TopK(full.names, full.param[:k], full.index[:k], full.score[:k])
            else:
                table = self.topk_table()
                # Stable sort on |score| over rows in (parameter, index) order reproduces select_topk's tie-break.
                order = np.lexsort((table.index.numpy(), table.param.numpy()))
                key = table.score.abs().numpy()[order]
                best = order[np.argsort(-key, kind="stable")][:k]
                best_t = torch.as_tensor(best, dtype=torch.long)
                result = TopK(table.names, table.param[best_t], table.index[best_t], table.score[best_t])
        self._topk[k] = result
        return result

    def cutoff_tie(self, k: int) -> int | None:
        """How many of the global top-k tie with the (k+1)-th |score| (their membership is decided by the
        tie-break, not the data); None when the (k+1)-th weight is not known."""
        if k + 1 > self.max_global_k:
            return None
        top = self.global_topk(k + 1)
        if top is None:
            return None
        key = top.score.abs()
        return int((key[:k] == key[k]).sum())

    def topk_keys(self, k: int) -> list[Key] | None:
        top = self.global_topk(k)
        if top is None:
            return None
        return [(top.names[p], i) for p, i in zip(top.param.tolist(), top.index.tolist(), strict=True)]

    # -- perturbation (optional, written by `cwa perturb`) -------------------------------------
    @cached_property
    def perturb_rows(self) -> list[dict]:
        path = self.path / "perturb.csv"
        if not path.exists():
            return []
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        for row in rows:
            for key, value in list(row.items()):
                row[key] = _number(value)
        return rows

    @cached_property
    def perturb_summary(self) -> dict:
        path = self.path / "perturb.json"
        if not path.exists():
            return {}
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}


def _number(value: str | None) -> object:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except ValueError:
        return value
    if math.isfinite(number) and number.is_integer() and "." not in value and "e" not in value.lower():
        return int(number)
    return number


def load_runs(paths: list[str | Path]) -> list[Run]:
    """Load every run; the same directory given twice is read once."""
    runs, seen = [], set()
    for path in paths:
        resolved = Path(path).resolve()
        if resolved in seen:
            continue
        seen.add(resolved)
        runs.append(Run.load(path))
    if not runs:
        raise CwaError("no run directories given; pass lightning_logs/NAME/version_N directories.")
    return runs


def unique_names(runs: list[Run]) -> list[str]:
    """Run names for tables: ``experiment/version_n``, or the full path where those collide."""
    names = [r.name for r in runs]
    if len(set(names)) == len(names):
        return names
    return [str(r.path) for r in runs]
