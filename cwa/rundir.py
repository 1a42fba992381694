"""The run directory: the one owner of its paths, its summary schema, its loaders and its writers.

``cwa fit-sensitivity`` writes a run directory only through this module; ``perturb``, ``compare`` and
``report`` read it only through :class:`Run`. A run directory is complete when its ``summary.json`` says
``status: complete``: it is written last, after every other file of the run is on disk.

| file | written by | read by |
|---|---|---|
| ``config.yaml`` | LightningCLI (fit-sensitivity) | perturb (model and data settings, never code) |
| ``scores.safetensors`` | :func:`write_scores` / :func:`stream_scores` | :class:`LazyScores` |
| ``topk.csv`` | :func:`write_topk` | :func:`read_topk` (the one tie rule) |
| ``summary.json`` | :func:`write_summary`, last | :meth:`Run.load` (refuses incomplete runs) |
| ``perturb.csv`` + ``perturb.json`` | :func:`write_perturbation` (together or not at all) | :attr:`Run.perturbation` |
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import os
import signal
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any, get_type_hints

import numpy as np
import torch
from torch import Tensor

from cwa.errors import CwaError
from cwa.io import atomic_open, atomic_path, write_json
from cwa.params import ParamInfo
from cwa.topk import TopK, rank_order, select_topk

SCHEMA_VERSION = 1
"""Version of ``summary.json``. Runs without one were written before versioning (same fields)."""

CONFIG = "config.yaml"
SCORES = "scores.safetensors"
TOPK = "topk.csv"
SUMMARY = "summary.json"
PERTURB_CSV = "perturb.csv"
PERTURB_JSON = "perturb.json"
SUPER_WEIGHTS = "super_weights.csv"
FIGURES = "figures"
ACCUMULATORS = "accumulators"
SCORES_FORMAT = "cwa-scores/1"

Key = tuple[str, int]  # (parameter name, flat index into the stored tensor)


FIT_KIND = "fit-sensitivity"
SUPER_WEIGHTS_KIND = "find-super-weights"


# -- summary.json ----------------------------------------------------------------------------------
@dataclass
class Summary:
    """``summary.json``: what a fit-sensitivity run did and found (the contract in DESIGN.md)."""

    model: str
    metric: dict  # {"name", "signed", **the scorer's settings}
    mode: str
    k: int
    tensors: dict[str, dict]  # per-tensor statistics: shape, numel, mean, std, min, max, abs_sum, zeros, topk_count
    status: str = "complete"
    schema: int = SCHEMA_VERSION
    kind: str = FIT_KIND
    created: str | None = None
    model_class: str | None = None
    dtype: str | None = None
    num_parameters: int | None = None
    num_scored: int | None = None
    scored_tensors: int | None = None
    topk_rows: int | None = None
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    samples: int | None = None
    tokens: int | None = None
    mean_loss: float | None = None
    perplexity: float | None = None
    seed: int | None = None
    data: dict = field(default_factory=dict)
    data_fingerprint: str | None = None
    world_size: int | None = None
    strategy: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    memory_ranks: list[dict] | None = None
    resumed_from: int = 0
    environment: dict = field(default_factory=dict)
    layout: dict[str, dict] = field(default_factory=dict)  # name -> {layer, module, transposed}

    REQUIRED = ("model", "metric", "mode", "k", "tensors")

    @classmethod
    def from_json(cls, data: object, path: Path) -> Summary:
        """Validate a parsed ``summary.json``; one CwaError sentence when it is not a complete cwa run."""
        if not isinstance(data, dict) or data.get("status") != "complete":
            raise CwaError(f"'{path.parent}' is not a complete run (summary.json status is not 'complete'); rerun it.")
        kind = data.get("kind", FIT_KIND)
        if kind != FIT_KIND:
            raise CwaError(
                f"'{path.parent}' is a {kind} run, not a fit-sensitivity run; pass fit-sensitivity run directories."
            )
        schema = data.get("schema", 0)
        if not isinstance(schema, int) or schema > SCHEMA_VERSION:
            raise CwaError(
                f"'{path}' has summary schema {schema!r}, newer than this cwa understands ({SCHEMA_VERSION}); "
                "upgrade cwa."
            )
        missing = [key for key in cls.REQUIRED if key not in data]
        if missing:
            raise CwaError(f"'{path}' lacks '{missing[0]}': it was not written by cwa fit-sensitivity.")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["schema"] = schema
        for key in ("include", "exclude"):
            values[key] = list(values.get(key) or [])
        for key in ("data", "timings", "memory", "environment", "layout"):
            values[key] = dict(values.get(key) or {})
        if not isinstance(values["metric"], dict) or not isinstance(values["tensors"], dict):
            raise CwaError(f"'{path}' has a malformed metric or tensors entry; rerun fit-sensitivity for it.")
        return cls(**values)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def metric_name(self) -> str:
        return str(self.metric.get("name", "?"))


def write_summary(run_dir: Path, summary: Summary) -> None:
    """Write ``summary.json`` (atomically). Call it last: its presence marks the run complete."""
    write_json(Path(run_dir) / SUMMARY, summary.to_json())


# -- topk.csv --------------------------------------------------------------------------------------
TOPK_COLUMNS = ["rank", "parameter", "layer", "module", "row", "col", "index", "score", "weight"]


def write_topk(path: Path, topk: TopK, infos: Mapping[str, ParamInfo], weights: Mapping[str, Tensor]) -> None:
    """One row per selected weight, in ``topk``'s order. ``row``/``col`` are (output unit, input unit) for
    2-D tensors (also for GPT-2's transposed Conv1D); ``index`` is the flat index into the stored tensor.
    ``weights`` gives the weights' values unless ``topk.weight`` carries them (sharded runs)."""
    with atomic_open(path, newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(TOPK_COLUMNS)
        for rank, (p, index, score) in enumerate(
            zip(topk.param.tolist(), topk.index.tolist(), topk.score.tolist(), strict=True), start=1
        ):
            name = topk.names[p]
            info = infos[name]
            rc = info.row_col(torch.tensor(index))
            row, col = ("", "") if rc is None else (int(rc[0]), int(rc[1]))
            if topk.weight is not None:
                weight = float(topk.weight[rank - 1])
            else:
                weight = float(weights[name].detach().reshape(-1)[index])
            layer = "" if info.layer is None else info.layer
            writer.writerow([rank, name, layer, info.module, row, col, index, f"{score:.9g}", f"{weight:.9g}"])


def read_topk(path: Path, names: list[str] | None = None) -> TopK:
    """``topk.csv`` as a :class:`TopK` ranked by the one tie rule (|score| descending, then parameter order,
    then flat index). A ``per_layer`` list (K per tensor, tensors in turn) is thereby re-ranked globally,
    so that its first K rows are the K highest scores in it.

    Args:
        path: the ``topk.csv`` file.
        names: the scored parameters in model order (from the summary); by first appearance where None.
    """
    try:
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
    order = rank_order(score.abs(), param, index)
    return TopK(names=names, param=param[order], index=index[order], score=score[order])


# -- scores.safetensors ----------------------------------------------------------------------------
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _score_dtype(dtype: str) -> torch.dtype:
    return torch.bfloat16 if dtype == "bfloat16" else torch.float32


def scores_metadata(metric: str, model: str) -> dict[str, str]:
    return {"metric": metric, "model": model, "format": SCORES_FORMAT}


def write_scores(path: Path, scores: Mapping[str, Tensor], dtype: str, metadata: dict[str, str]) -> None:
    """All score tensors in one safetensors file (``dtype``: ``float32`` or ``bfloat16``)."""
    from safetensors.torch import save_file

    target = _score_dtype(dtype)
    tensors = {n: s.detach().to("cpu", target).contiguous() for n, s in scores.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def stream_scores(
    path: Path,
    shapes: Mapping[str, tuple[int, ...]],
    tensors: Iterator[tuple[str, Tensor]],
    dtype: str,
    metadata: dict[str, str],
    write: bool = True,
) -> None:
    """Write a safetensors file one tensor at a time: the header is known from the shapes alone, then
    each tensor's bytes are appended as ``tensors`` yields it (in the order of ``shapes``). Only the
    tensor being written is ever in memory. With ``write=False`` the iterator is only drained (the
    other ranks of a collective gather)."""
    target = _score_dtype(dtype)
    size = torch.tensor([], dtype=target).element_size()
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, shape in shapes.items():
        n = int(np.prod(shape, dtype=np.int64)) if shape else 1
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[target],
            "shape": list(shape),
            "data_offsets": [offset, offset + n * size],
        }
        offset += n * size
    if not write:
        for _ in tensors:
            pass
        return
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with atomic_open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for (name, tensor), expected in zip(tensors, shapes, strict=True):
            if name != expected or tuple(tensor.shape) != tuple(shapes[name]):
                raise RuntimeError(f"stream_scores got '{name}' {tuple(tensor.shape)}, expected '{expected}'")
            data = tensor.detach().to("cpu", target).contiguous().reshape(-1)
            handle.write(data.view(torch.uint8).numpy().tobytes())


class LazyScores(Mapping[str, Tensor]):
    """A read-only ``{parameter: float32 score tensor}`` over a ``scores.safetensors`` that loads one
    tensor per access (the last one is cached), so a whole run's scores are never in memory at once."""

    def __init__(self, path: Path, names: list[str] | None = None) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        try:
            with safe_open(str(self.path), framework="pt") as handle:
                stored = list(handle.keys())
        except Exception as exc:  # safetensors raises its own error types for a truncated or foreign file
            raise CwaError(f"'{self.path}' is not a readable safetensors file ({exc}).") from None
        self.names = stored if names is None else list(names)
        missing = [n for n in self.names if n not in stored]
        if missing:
            raise CwaError(f"'{self.path}' has no scores for '{missing[0]}'; rerun fit-sensitivity for it.")
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


# -- perturb.csv -----------------------------------------------------------------------------------
@dataclass
class PerturbRow:
    """One row of ``perturb.csv``: a condition's held-out result against the unperturbed baseline.

    ``delta_*`` are condition minus baseline with their confidence interval (``_low``, ``_high``);
    ``p_value`` tests the condition against ``p_value_vs`` (``baseline``, or ``topk`` for a control).
    ``broken_fraction`` is the share of held-out sequences with a non-finite NLL (the model broke on
    them; ``delta_*`` are then NaN and ``p_value`` empty); None in a perturb.csv written before it existed.
    """

    condition: str
    perturbation: str
    target: str
    k: int | None
    rank: int | None
    seed: int | None
    n_weights: int
    perplexity: float
    nll: float
    accuracy: float
    delta_perplexity: float
    delta_perplexity_low: float
    delta_perplexity_high: float
    delta_nll: float
    delta_nll_low: float
    delta_nll_high: float
    delta_accuracy: float
    delta_accuracy_low: float
    delta_accuracy_high: float
    p_value: float | None
    p_value_vs: str
    broken_fraction: float | None = None

    @classmethod
    def columns(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def cells(self) -> list[str]:
        return [_cell(getattr(self, name)) for name in self.columns()]

    @classmethod
    def parse(cls, row: Mapping[str, str]) -> PerturbRow:
        """A row from its CSV cells, each converted to its field's type (empty cell: None)."""
        hints = get_type_hints(cls)
        values = {}
        for name in cls.columns():
            text = row.get(name)
            kind = hints[name]
            if text is None or text == "":
                values[name] = "" if kind is str else None
            elif kind is str:
                values[name] = text
            elif int in getattr(kind, "__args__", (kind,)):
                values[name] = int(text)
            else:
                values[name] = float(text)
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.9g}"
    return str(value)


def write_perturb_csv(path: Path, rows: Iterable[PerturbRow]) -> None:
    with atomic_open(path, newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(PerturbRow.columns())
        for row in rows:
            writer.writerow(row.cells())


def read_perturb_csv(path: Path) -> list[PerturbRow]:
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            return [PerturbRow.parse(row) for row in csv.DictReader(handle)]
    except (OSError, UnicodeDecodeError, csv.Error, ValueError, TypeError) as exc:
        raise CwaError(f"cannot read '{path}' ({exc}); rerun cwa perturb for this run.") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while a few renames run, so an interrupt cannot split a set of outputs."""
    blocked = {signal.SIGINT, signal.SIGTERM}
    try:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    except (AttributeError, ValueError, OSError):  # not the main thread, or no pthread_sigmask
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class OutputSet:
    """Files that must change together or not at all: each is written under a temporary name by
    ``stage``; ``commit`` renames them all, the marker file last, with interrupts held. An exception
    before the commit removes the temporaries and leaves the previous set untouched."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._staged: list[tuple[Path, Path]] = []

    def stage(self, relative: str) -> Path:
        """A temporary path whose file will become ``directory / relative`` at the commit."""
        final = self.directory / relative
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.staged.tmp")
        self._staged.append((tmp, final))
        return tmp

    def commit(self) -> None:
        with _signals_deferred():
            for tmp, final in self._staged:
                os.replace(tmp, final)
        self._staged = []

    def discard(self) -> None:
        for tmp, _ in self._staged:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self._staged = []


def write_perturbation(
    run_dir: Path,
    rows: list[PerturbRow],
    meta: dict,
    figures: Mapping[str, Callable[[Path], None]] | None = None,
) -> None:
    """Write ``perturb.csv``, the figures and ``perturb.json`` as one set: either all of them are the new
    ones or, after any failure or interrupt, all are the previous ones. ``perturb.json`` records the
    checksum of ``perturb.csv``, so a reader can tell a set that was split by a hard kill.

    Args:
        run_dir: the run directory.
        rows: the table, baseline first.
        meta: the contents of ``perturb.json`` (``status`` and the csv checksum are added).
        figures: ``{file name under figures/: function drawing into a given path}``.
    """
    outputs = OutputSet(Path(run_dir))
    try:
        csv_tmp = outputs.stage(PERTURB_CSV)
        write_perturb_csv(csv_tmp, rows)
        for name, draw in (figures or {}).items():
            draw(outputs.stage(f"{FIGURES}/{name}"))
        json_tmp = outputs.stage(PERTURB_JSON)
        write_json(json_tmp, {"status": "complete", **meta, "perturb_csv_sha256": _sha256(csv_tmp)})
        outputs.commit()
    finally:
        outputs.discard()


# -- find-super-weights ------------------------------------------------------------------------------
def write_super_weights(
    run_dir: Path, rows: list[dict], summary: dict, figures: Mapping[str, Callable[[Path], None]] | None = None
) -> None:
    """A find-super-weights run: ``super_weights.csv`` (one row per MLP output projection), the figures and
    ``summary.json`` (``kind: find-super-weights``, written last) as one set."""
    outputs = OutputSet(Path(run_dir))
    try:
        with open(outputs.stage(SUPER_WEIGHTS), "w", newline="", encoding="utf-8") as handle:
            columns = list(dict.fromkeys(key for row in rows for key in row))
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)
        for name, draw in (figures or {}).items():
            draw(outputs.stage(f"{FIGURES}/{name}"))
        full = {"status": "complete", "schema": SCHEMA_VERSION, "kind": SUPER_WEIGHTS_KIND, **summary}
        write_json(outputs.stage(SUMMARY), full)
        outputs.commit()
    finally:
        outputs.discard()


# -- reading a run -----------------------------------------------------------------------------------
@dataclass
class Perturbation:
    """A run's perturbation results (``perturb.csv`` and ``perturb.json``), or absent."""

    rows: list[PerturbRow]
    meta: dict

    @property
    def baseline(self) -> PerturbRow | None:
        return next((r for r in self.rows if r.target == "baseline"), None)


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
            data = json.loads(summary_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
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
    def metric_options(self) -> dict:
        return {k: v for k, v in self.summary.metric.items() if k not in ("name", "signed")}

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
            with open(path, encoding="utf-8") as handle:
                config = yaml.safe_load(handle)
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
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
        except CwaError:  # a truncated or foreign file: absent, and said so where it matters
            return False
        return True

    def scores(self) -> LazyScores:
        if not self.scores_path.exists():
            raise CwaError(f"'{self.path}' has no scores.safetensors (the run used save_scores: off).")
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
    def topk(self) -> TopK:
        """The run's own list (topk.csv), ranked by the one tie rule."""
        return read_topk(self.path / TOPK, list(self.infos))

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
    def perturbation(self) -> Perturbation | None:
        """The run's perturbation results, None when it has none; one CwaError sentence when the set is
        inconsistent (perturb.csv replaced without its perturb.json, as a hard kill could leave it)."""
        csv_path, json_path = self.path / PERTURB_CSV, self.path / PERTURB_JSON
        if not csv_path.exists() and not json_path.exists():
            return None
        if not (csv_path.exists() and json_path.exists()):
            raise CwaError(f"'{self.path}' has only one of perturb.csv and perturb.json; rerun cwa perturb for it.")
        try:
            meta = json.loads(json_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CwaError(f"'{json_path}' is not readable JSON ({exc}); rerun cwa perturb for this run.") from None
        expected = meta.get("perturb_csv_sha256") if isinstance(meta, dict) else None
        if not isinstance(meta, dict) or meta.get("status") != "complete":
            raise CwaError(f"'{json_path}' does not describe a complete perturbation; rerun cwa perturb for it.")
        if expected is not None and expected != _sha256(csv_path):
            raise CwaError(
                f"'{csv_path}' does not match its perturb.json (an interrupted cwa perturb); rerun cwa perturb for it."
            )
        return Perturbation(read_perturb_csv(csv_path), meta)


PREFETCH_K = 1024


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
            raise CwaError(f"none of the given directories is a complete run ({notes[0][len('skipped ') :]})")
        raise CwaError("no run directories given; pass lightning_logs/NAME/version_N directories.")
    return runs, notes


def unique_names(runs: list[Run]) -> list[str]:
    """Run names for tables: ``experiment/version_n``, or the full path where those collide."""
    names = [r.name for r in runs]
    if len(set(names)) == len(names):
        return names
    return [str(r.path) for r in runs]
