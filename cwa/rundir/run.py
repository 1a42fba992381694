"""The reader of run directories: :class:`Run` (one complete fit-sensitivity run, read lazily),
:func:`load_runs` over many, and the removal of a failed run's directory."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from cwa.common.errors import CwaError
from cwa.common.io import read_regular
from cwa.model.params import ParamInfo
from cwa.rundir.files import ACCUMULATORS, CONFIG, FIGURES, SCORES, SUMMARY, TOPK, Key
from cwa.rundir.perturbation import Perturbation, read_perturbations
from cwa.rundir.scores import LazyScores, UnreadableScores
from cwa.rundir.summary import Summary
from cwa.rundir.topk import read_topk
from cwa.rundir.validate import CONFIG_BYTES, SUMMARY_BYTES
from cwa.scoring.topk import TopK, select_topk

PREFETCH_K = 1024


LEGACY_FACTS = ("unscored", "memory_bound_mib", "fd_zero_steps", "damping_raised")
"""The facts among the ``metric`` entry of summaries written before it listed its ``fact_keys``."""


@dataclass
class Run:
    """One complete fit-sensitivity run directory, read lazily.

    Args:
        path: the run directory (``lightning_logs/<experiment>/version_<n>``).
        summary: its validated ``summary.json``.
    """

    path: Path
    summary: Summary
    _topk: dict[int, TopK | None] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, path: str | Path) -> Run:
        """Read a run directory; one clear CwaError when it is not a complete fit-sensitivity run."""
        path = Path(path).expanduser()
        if not path.is_dir():
            raise CwaError(
                f"'{path}' is not a directory; pass fit-sensitivity run directories (lightning_logs/NAME/version_N)."
            )
        summary_path = path / SUMMARY
        if not summary_path.exists():
            raise CwaError(
                f"'{path}' has no summary.json: it is not a fit-sensitivity run directory, or the run did not finish."
            )
        try:
            data = json.loads(read_regular(summary_path, SUMMARY_BYTES, "summary").decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise CwaError(f"'{summary_path}' is not readable JSON ({exc}); rerun fit-sensitivity for it.") from None
        summary = Summary.from_json(data, summary_path)
        if not (path / TOPK).exists():
            raise CwaError(f"'{path}' has no topk.csv although its summary says complete; rerun fit-sensitivity.")
        return cls(path=path, summary=summary)

    # -- paths ---------------------------------------------------------------------------------
    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def scores_path(self) -> Path:
        return self.path / SCORES

    @property
    def figures_dir(self) -> Path:
        return self.path / FIGURES

    # -- identity ------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """``<experiment>/version_<n>``: short and unique within one lightning_logs tree."""
        return f"{self.path.parent.name}/{self.path.name}"

    @property
    def model(self) -> str:
        return self.summary.model

    @property
    def metric(self) -> str:
        return self.summary.metric_name

    @property
    def _fact_keys(self) -> tuple[str, ...]:
        keys = self.summary.metric.get("fact_keys")
        return tuple(keys) if isinstance(keys, list) else LEGACY_FACTS

    @property
    def metric_options(self) -> dict:
        """The metric's settings (what was asked for), without what the run found out (``metric_facts``)."""
        other = ("name", "signed", "description", "fact_keys", *self._fact_keys)
        return {k: v for k, v in self.summary.metric.items() if k not in other}

    @property
    def metric_facts(self) -> dict:
        """What the scorer reported about this run (``Scorer.facts()``): for the built-in metrics, tensors it
        cannot score, its memory bound, weights a finite-difference step cannot move, a raised damping."""
        return {k: v for k, v in self.summary.metric.items() if k in self._fact_keys}

    @property
    def metric_description(self) -> str | None:
        """The metric's one-line description as the run recorded it; for a run written before descriptions
        were recorded, the registered metric's of that name (None for an unregistered one)."""
        description = self.summary.metric.get("description")
        if isinstance(description, str):
            return description
        from cwa.scoring.metrics import METRICS

        registered = METRICS.get(self.metric)
        return registered.description if registered is not None else None

    @property
    def signed(self) -> bool:
        return bool(self.summary.metric.get("signed", False))

    @property
    def mode(self) -> str:
        return self.summary.mode

    @property
    def k(self) -> int:
        return int(self.summary.k)

    @property
    def data(self) -> dict:
        return self.summary.data

    @property
    def seed(self) -> int | None:
        seed = self.data.get("seed", self.summary.seed)
        return None if seed is None else int(seed)

    @property
    def samples(self) -> int | None:
        return self.summary.samples

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
            json.dumps(self.summary.include, sort_keys=True),
            json.dumps(self.summary.exclude, sort_keys=True),
        )

    # -- configuration (data only: never imports or calls anything named in it) -----------------
    @cached_property
    def config(self) -> dict:
        """The run's ``config.yaml`` as plain data ({} when absent)."""
        import yaml

        path = self.path / CONFIG
        if not path.exists():
            return {}
        try:
            config = yaml.safe_load(read_regular(path, CONFIG_BYTES, "configuration").decode("utf-8"))
        except (UnicodeDecodeError, yaml.YAMLError, RecursionError) as exc:
            raise CwaError(f"cannot read '{path}' ({exc}); rerun fit-sensitivity for this run.") from None
        if not isinstance(config, dict):
            raise CwaError(f"'{path}' is not a cwa configuration (expected a mapping).")
        return config

    # -- parameters ----------------------------------------------------------------------------
    @cached_property
    def infos(self) -> dict[str, ParamInfo]:
        """Scored parameters in model order, from the summary's per-tensor statistics and layout."""
        out = {}
        for name, stats in self.summary.tensors.items():
            place = self.summary.layout.get(name, {})
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
    @cached_property
    def has_scores(self) -> bool:
        if not self.scores_path.exists():
            return False
        try:
            self.scores()
        except UnreadableScores:  # a truncated or foreign file: absent, and said so where it matters
            return False
        return True

    def scores(self) -> LazyScores:
        if not self.scores_path.exists():
            raise CwaError(f"'{self.path}' has no scores.safetensors (the run used save_scores: off).")
        return LazyScores(self.scores_path, list(self.infos), self.shapes)

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
    def topk(self) -> TopK:
        """The run's own list (topk.csv), ranked by the one tie rule."""
        # A run without per-tensor statistics (sharded, save_scores off) has nothing to check the rows against.
        numels = {n: i.numel for n, i in self.infos.items()} or None
        return read_topk(self.path / TOPK, list(self.infos), numels)

    @property
    def max_global_k(self) -> int:
        """Largest K whose exact global top-K this run can give: any K with scores; else from topk.csv,
        where a per_layer selection of k per tensor contains the global top-K for every K <= k."""
        return self.num_scored if self.has_scores else self.csv_global_k

    @property
    def csv_global_k(self) -> int:
        rows = len(self.topk)
        return rows if self.mode == "global" else min(self.k, rows)

    def global_topk(self, k: int) -> TopK | None:
        """The exact global top-k (the one tie rule), or None when this run cannot give it (no scores
        and k beyond what topk.csv holds)."""
        if k in self._topk:
            return self._topk[k]
        larger = [c for c, top in self._topk.items() if c > k and top is not None]
        if larger:
            result: TopK | None = self._topk[min(larger)].prefix(k)
        elif k > self.max_global_k:
            result = None
        elif k <= self.csv_global_k:
            result = self.topk.prefix(k)
        else:
            # One pass over a scores file costs the same for any small K: fetch a margin for later calls.
            fetch = min(max(k, PREFETCH_K), self.num_scored)
            self._topk[fetch] = select_topk(self.scores(), fetch, "global")
            result = self._topk[fetch].prefix(k)
        self._topk[k] = result
        return result

    def cutoff_tie(self, k: int) -> int | None:
        """How many of the global top-k tie with the (k+1)-th |score| (their membership is decided by the
        tie-break, not the data); None when the (k+1)-th weight is not known."""
        top = self.global_topk(k + 1) if k + 1 <= self.max_global_k else None
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
    def perturbations(self) -> list[Perturbation]:
        """Every experiment of ``cwa perturb`` on this run, oldest first (``perturb/<n>/``, and the root-level
        ``perturb.csv`` of an earlier cwa first): :func:`~cwa.rundir.perturbation.read_perturbations`."""
        return read_perturbations(self.path)

    @property
    def perturbation(self) -> Perturbation | None:
        """The latest experiment of ``cwa perturb`` on this run (None when there is none)."""
        return self.perturbations[-1] if self.perturbations else None


def remove_unfinished_run(path: Path) -> bool:
    """Remove a run directory whose run failed (no ``summary.json``), unless it holds checkpoints to
    resume from (then it stays, and ``resume_from`` can use it). Returns whether it was removed."""
    import shutil

    path = Path(path)
    if not path.is_dir() or (path / SUMMARY).exists():
        return False
    accumulators = path / ACCUMULATORS
    if accumulators.is_dir() and any(accumulators.iterdir()):
        return False
    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):  # the experiment folder the logger made for it, when now empty
        path.parent.rmdir()
    return True


def is_complete(path: str | Path) -> bool:
    """Whether ``path`` holds a complete run (cheap: reads only the summary's status)."""
    try:
        Run.load(path)
    except CwaError:
        return False
    return True


def load_runs(paths: Iterable[str | Path], skip_incomplete: bool = False) -> tuple[list[Run], list[str]]:
    """Load every run (the same directory given twice is read once).

    Args:
        paths: run directories.
        skip_incomplete: leave out directories that are not complete runs (a shell glob over
            ``lightning_logs/*/version_*`` also matches failed or running ones) with a note each,
            instead of failing on the first.

    Returns:
        The runs and the notes on what was left out.
    """
    runs, notes, seen = [], [], set()
    for path in paths:
        resolved = Path(path).expanduser().resolve()
        if resolved in seen:
            continue
        seen.add(resolved)
        try:
            runs.append(Run.load(path))
        except CwaError as exc:
            if not skip_incomplete:
                raise
            notes.append(f"skipped {exc}")
    if not runs:
        if notes:
            raise CwaError(f"none of the given directories is a complete run: {notes[0][len('skipped ') :]}")
        raise CwaError("no run directories given; pass lightning_logs/NAME/version_N directories.")
    return runs, notes


def unique_names(runs: list[Run]) -> list[str]:
    """Run names for tables: ``experiment/version_n``, or the full path where those collide."""
    names = [r.name for r in runs]
    if len(set(names)) == len(names):
        return names
    return [str(r.path) for r in runs]
